-- Password reset tokens. Only the SHA-256 of a token is stored: the database
-- never holds a usable token. A token is single use (used_at) and short-lived
-- (expires_at); a shred deletes the member's rows.

CREATE TABLE password_resets (
    token_hash BLOB    PRIMARY KEY,
    member_id  TEXT    NOT NULL REFERENCES members (member_id) ON DELETE CASCADE,
    expires_at INTEGER NOT NULL,
    used_at    INTEGER
);
CREATE INDEX password_resets_member_idx ON password_resets (member_id);
