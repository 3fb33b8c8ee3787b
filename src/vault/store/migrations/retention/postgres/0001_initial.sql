-- The separated storage for withdrawn members' retained data (privacy policy
-- section 6), in a database of its own. Everything personal is ciphertext under
-- the member's DEK, whose wrapped form is here too: deleting the row is the
-- crypto-shred. No blind indexes: nothing here can be looked up by login ID or
-- e-mail.

CREATE TABLE retained_members (
    member_id       uuid        NOT NULL,
    retained_at     timestamptz NOT NULL,
    destroy_after   timestamptz NOT NULL,
    reason          text        NOT NULL,
    attempt         text        NOT NULL,
    confirmed       boolean     NOT NULL DEFAULT false,
    dek_id          integer     NOT NULL,
    kek_version     integer     NOT NULL,
    wrapped_dek     bytea       NOT NULL,
    login_id_ct     bytea       NOT NULL,
    name_ct         bytea       NOT NULL,
    email_ct        bytea       NOT NULL,
    mobile_phone_ct bytea       NOT NULL,
    -- [[purpose, granted, policy_version, recorded_at (us)], ...]: no PII.
    consents        jsonb       NOT NULL,
    CONSTRAINT retained_members_pkey PRIMARY KEY (member_id)
);
-- The sidecar destroys what is due, and reconciles copies a crash left unconfirmed.
CREATE INDEX retained_members_due_idx ON retained_members (destroy_after) WHERE confirmed;
CREATE INDEX retained_members_unconfirmed_idx ON retained_members (retained_at)
    WHERE NOT confirmed;
-- Key management counts and re-wraps retained DEKs per KEK version.
CREATE INDEX retained_members_kek_version_idx ON retained_members (kek_version);

-- entry_id: the id the entry had in the vault.
CREATE TABLE retained_access_log (
    member_id uuid        NOT NULL,
    entry_id  bigint      NOT NULL,
    at        timestamptz NOT NULL,
    action_ct bytea       NOT NULL,
    ip_ct     bytea       NOT NULL,
    CONSTRAINT retained_access_log_pkey PRIMARY KEY (member_id, entry_id),
    CONSTRAINT retained_access_log_member_id_fkey
        FOREIGN KEY (member_id) REFERENCES retained_members (member_id) ON DELETE CASCADE
);
-- The 6-month access-log rule holds here too.
CREATE INDEX retained_access_log_at_idx ON retained_access_log (at);

-- Every use of retained data (a disclosure required by law, an early destruction).
CREATE TABLE retention_events (
    event_id  bigint      GENERATED ALWAYS AS IDENTITY,
    at        timestamptz NOT NULL,
    actor     text        NOT NULL,
    operation text        NOT NULL,
    member_id uuid        NOT NULL,
    basis     text        NOT NULL,
    CONSTRAINT retention_events_pkey PRIMARY KEY (event_id)
);
CREATE INDEX retention_events_member_idx ON retention_events (member_id);
