-- The separated storage for withdrawn members' retained data (privacy policy
-- section 6), in a database of its own. Everything personal is ciphertext under
-- the member's DEK, whose wrapped form is here too: deleting the row is the
-- crypto-shred. No blind indexes: nothing here can be looked up by login ID or
-- e-mail. Timestamps are INTEGER microseconds since the Unix epoch (UTC).

CREATE TABLE retained_members (
    member_id       TEXT    PRIMARY KEY,
    retained_at     INTEGER NOT NULL,
    destroy_after   INTEGER NOT NULL,
    reason          TEXT    NOT NULL,
    attempt         TEXT    NOT NULL,
    confirmed       INTEGER NOT NULL DEFAULT 0 CHECK (confirmed IN (0, 1)),
    dek_id          INTEGER NOT NULL,
    kek_version     INTEGER NOT NULL,
    wrapped_dek     BLOB    NOT NULL,
    login_id_ct     BLOB    NOT NULL,
    name_ct         BLOB    NOT NULL,
    email_ct        BLOB    NOT NULL,
    mobile_phone_ct BLOB    NOT NULL,
    -- JSON array of [purpose, granted, policy_version, recorded_at]: no PII.
    consents        TEXT    NOT NULL
);
-- The sidecar destroys what is due, and reconciles copies a crash left unconfirmed.
CREATE INDEX retained_members_due_idx ON retained_members (destroy_after) WHERE confirmed = 1;
CREATE INDEX retained_members_unconfirmed_idx ON retained_members (retained_at)
    WHERE confirmed = 0;
-- Key management counts and re-wraps retained DEKs per KEK version.
CREATE INDEX retained_members_kek_version_idx ON retained_members (kek_version);

-- entry_id: the id the entry had in the vault.
CREATE TABLE retained_access_log (
    member_id TEXT    NOT NULL REFERENCES retained_members (member_id) ON DELETE CASCADE,
    entry_id  INTEGER NOT NULL,
    at        INTEGER NOT NULL,
    action_ct BLOB    NOT NULL,
    ip_ct     BLOB    NOT NULL,
    PRIMARY KEY (member_id, entry_id)
);
-- The 6-month access-log rule holds here too.
CREATE INDEX retained_access_log_at_idx ON retained_access_log (at);

-- Every use of retained data (a disclosure required by law, an early destruction).
CREATE TABLE retention_events (
    event_id  INTEGER PRIMARY KEY AUTOINCREMENT,
    at        INTEGER NOT NULL,
    actor     TEXT    NOT NULL,
    operation TEXT    NOT NULL,
    member_id TEXT    NOT NULL,
    basis     TEXT    NOT NULL
);
