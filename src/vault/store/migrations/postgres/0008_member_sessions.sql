-- Member sessions (Authenticate's session token). Only the SHA-256 of a token is
-- stored: the database never holds a usable token. A session ends at its idle
-- expiry (pushed forward on use, never past expires_at, the absolute lifetime);
-- EndSession, a password change or reset delete it, and a shred deletes the
-- member's rows (ON DELETE CASCADE). No PII: a hash, a member id and times.

CREATE TABLE member_sessions (
    token_hash      bytea       NOT NULL,
    member_id       uuid        NOT NULL,
    created_at      timestamptz NOT NULL,
    idle_expires_at timestamptz NOT NULL,
    expires_at      timestamptz NOT NULL,
    CONSTRAINT member_sessions_pkey PRIMARY KEY (token_hash),
    CONSTRAINT member_sessions_token_hash_check CHECK (octet_length(token_hash) = 32),
    CONSTRAINT member_sessions_member_id_fkey
        FOREIGN KEY (member_id) REFERENCES members (member_id) ON DELETE CASCADE
);
-- A member's sessions, newest first (the per-member bound); expired ones (the purge).
CREATE INDEX member_sessions_member_idx ON member_sessions (member_id, created_at);
CREATE INDEX member_sessions_expiry_idx ON member_sessions (idle_expires_at);
