-- Member sessions (Authenticate's session token). Only the SHA-256 of a token is
-- stored: the database never holds a usable token. A session ends at its idle
-- expiry (pushed forward on use, never past expires_at, the absolute lifetime);
-- EndSession, a password change or reset delete it, and a shred deletes the
-- member's rows (ON DELETE CASCADE). No PII: a hash, a member id and times.

CREATE TABLE member_sessions (
    token_hash      BLOB    PRIMARY KEY CHECK (length(token_hash) = 32),
    member_id       TEXT    NOT NULL REFERENCES members (member_id) ON DELETE CASCADE,
    created_at      INTEGER NOT NULL,
    idle_expires_at INTEGER NOT NULL,
    expires_at      INTEGER NOT NULL
);
-- A member's sessions, newest first (the per-member bound); expired ones (the purge).
CREATE INDEX member_sessions_member_idx ON member_sessions (member_id, created_at);
CREATE INDEX member_sessions_expiry_idx ON member_sessions (idle_expires_at);
