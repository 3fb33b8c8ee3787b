-- Brute-force protection (issue 10). No PII: an account is named by its login
-- ID's blind index (so an unknown login ID is counted the same way), a client
-- by an HMAC of its IP under a key derived from the index key.
--
-- login_failures: consecutive failed password checks per account, changed by one
-- INSERT ... ON CONFLICT DO UPDATE ... RETURNING (20 parallel guesses count 20).
-- A success or a password reset deletes the row, and so does the member's shred;
-- rows of login IDs no member has are purged once stale (the lifecycle).
CREATE TABLE login_failures (
    login_hmac      bytea       NOT NULL,
    failures        integer     NOT NULL,
    last_failure_at timestamptz NOT NULL,
    CONSTRAINT login_failures_pkey PRIMARY KEY (login_hmac)
);
CREATE INDEX login_failures_last_idx ON login_failures (last_failure_at);

-- ip_failures: failed logins per client IP in a fixed window (credential
-- stuffing across accounts); a window past its end starts again at 1.
CREATE TABLE ip_failures (
    ip_hmac      bytea       NOT NULL,
    window_start timestamptz NOT NULL,
    failures     integer     NOT NULL,
    CONSTRAINT ip_failures_pkey PRIMARY KEY (ip_hmac)
);
CREATE INDEX ip_failures_window_idx ON ip_failures (window_start);
