-- The vault schema for SQLite. Timestamps are INTEGER microseconds since the
-- Unix epoch (UTC); member ids are canonical lowercase UUID text.
-- Unique constraints hold only HMACs, never PII.

CREATE TABLE kek_versions (
    version      INTEGER PRIMARY KEY,
    state        TEXT    NOT NULL CHECK (state IN ('active', 'decrypt_only', 'destroyed')),
    created_at   INTEGER NOT NULL,
    destroyed_at INTEGER
);
-- At most one version wraps new DEKs.
CREATE UNIQUE INDEX kek_versions_one_active ON kek_versions (state) WHERE state = 'active';

CREATE TABLE index_keys (
    key_id      INTEGER PRIMARY KEY,
    kek_version INTEGER NOT NULL REFERENCES kek_versions (version),
    wrapped_key BLOB    NOT NULL,
    created_at  INTEGER NOT NULL
);

CREATE TABLE members (
    member_id          TEXT    PRIMARY KEY,
    created_at         INTEGER NOT NULL,
    last_seen_at       INTEGER NOT NULL,
    login_hmac         BLOB    NOT NULL CONSTRAINT members_login_hmac_key UNIQUE,
    email_hmac         BLOB    NOT NULL CONSTRAINT members_email_hmac_key UNIQUE,
    login_id_ct        BLOB    NOT NULL,
    password_hash_ct   BLOB    NOT NULL,
    name_ct            BLOB    NOT NULL,
    email_ct           BLOB    NOT NULL,
    mobile_phone_ct    BLOB    NOT NULL
);
-- The lifecycle sidecar sweeps inactive members by last_seen_at.
CREATE INDEX members_last_seen_at_idx ON members (last_seen_at);

CREATE TABLE member_keys (
    member_id   TEXT    PRIMARY KEY REFERENCES members (member_id) ON DELETE CASCADE,
    dek_id      INTEGER NOT NULL,
    kek_version INTEGER NOT NULL REFERENCES kek_versions (version),
    wrapped_dek BLOB    NOT NULL
);
-- Rotation counts and re-wraps DEKs per KEK version.
CREATE INDEX member_keys_kek_version_idx ON member_keys (kek_version);

CREATE TABLE consents (
    member_id      TEXT    NOT NULL REFERENCES members (member_id) ON DELETE CASCADE,
    purpose        TEXT    NOT NULL,
    granted        INTEGER NOT NULL CHECK (granted IN (0, 1)),
    policy_version TEXT    NOT NULL,
    recorded_at    INTEGER NOT NULL,
    PRIMARY KEY (member_id, purpose)
);

-- AUTOINCREMENT: entry ids are never reused after a purge, so paging cursors
-- stay unambiguous.
CREATE TABLE access_log (
    entry_id  INTEGER PRIMARY KEY AUTOINCREMENT,
    member_id TEXT    NOT NULL REFERENCES members (member_id) ON DELETE CASCADE,
    at        INTEGER NOT NULL,
    action_ct BLOB    NOT NULL,
    ip_ct     BLOB    NOT NULL
);
CREATE INDEX access_log_member_at_idx ON access_log (member_id, at DESC, entry_id DESC);
-- The 6-month retention purge deletes by age.
CREATE INDEX access_log_at_idx ON access_log (at);

CREATE TABLE tombstones (
    member_id    TEXT    PRIMARY KEY,
    destroyed_at INTEGER NOT NULL
);

-- Proof of destruction; carries no PII. items: JSON object name -> count;
-- kek_versions: JSON list of ints.
CREATE TABLE destruction_records (
    record_id    INTEGER PRIMARY KEY AUTOINCREMENT,
    member_id    TEXT    NOT NULL,
    destroyed_at INTEGER NOT NULL,
    reason       TEXT    NOT NULL,
    items        TEXT    NOT NULL,
    kek_versions TEXT    NOT NULL
);
CREATE INDEX destruction_records_member_idx ON destruction_records (member_id);
