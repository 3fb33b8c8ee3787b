-- Password reset tokens. Only the SHA-256 of a token is stored: the database
-- never holds a usable token. A token is single use (used_at) and short-lived
-- (expires_at); a shred deletes the member's rows.

CREATE TABLE password_resets (
    token_hash bytea       NOT NULL,
    member_id  uuid        NOT NULL,
    expires_at timestamptz NOT NULL,
    used_at    timestamptz,
    CONSTRAINT password_resets_pkey PRIMARY KEY (token_hash),
    CONSTRAINT password_resets_token_hash_check CHECK (octet_length(token_hash) = 32),
    CONSTRAINT password_resets_member_id_fkey
        FOREIGN KEY (member_id) REFERENCES members (member_id) ON DELETE CASCADE
);
CREATE INDEX password_resets_member_idx ON password_resets (member_id);
