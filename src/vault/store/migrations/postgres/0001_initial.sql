-- The vault schema for PostgreSQL. Constraint names are explicit: the store
-- maps a unique violation to the field by constraint name, never by message.
-- Unique constraints hold only HMACs, never PII.

CREATE TABLE kek_versions (
    version      integer     NOT NULL,
    state        text        NOT NULL,
    created_at   timestamptz NOT NULL,
    destroyed_at timestamptz,
    CONSTRAINT kek_versions_pkey PRIMARY KEY (version),
    CONSTRAINT kek_versions_state_check
        CHECK (state IN ('active', 'decrypt_only', 'destroyed'))
);
-- At most one version wraps new DEKs.
CREATE UNIQUE INDEX kek_versions_one_active ON kek_versions (state) WHERE state = 'active';

CREATE TABLE index_keys (
    key_id      integer     NOT NULL,
    kek_version integer     NOT NULL,
    wrapped_key bytea       NOT NULL,
    created_at  timestamptz NOT NULL,
    CONSTRAINT index_keys_pkey PRIMARY KEY (key_id),
    CONSTRAINT index_keys_kek_version_fkey
        FOREIGN KEY (kek_version) REFERENCES kek_versions (version)
);

CREATE TABLE members (
    member_id        uuid        NOT NULL,
    created_at       timestamptz NOT NULL,
    last_seen_at     timestamptz NOT NULL,
    login_hmac       bytea       NOT NULL,
    email_hmac       bytea       NOT NULL,
    login_id_ct      bytea       NOT NULL,
    password_hash_ct bytea       NOT NULL,
    name_ct          bytea       NOT NULL,
    email_ct         bytea       NOT NULL,
    mobile_phone_ct  bytea       NOT NULL,
    CONSTRAINT members_pkey PRIMARY KEY (member_id),
    CONSTRAINT members_login_hmac_key UNIQUE (login_hmac),
    CONSTRAINT members_email_hmac_key UNIQUE (email_hmac)
);
-- The lifecycle sidecar sweeps inactive members by last_seen_at.
CREATE INDEX members_last_seen_at_idx ON members (last_seen_at);

CREATE TABLE member_keys (
    member_id   uuid    NOT NULL,
    dek_id      integer NOT NULL,
    kek_version integer NOT NULL,
    wrapped_dek bytea   NOT NULL,
    CONSTRAINT member_keys_pkey PRIMARY KEY (member_id),
    CONSTRAINT member_keys_member_id_fkey
        FOREIGN KEY (member_id) REFERENCES members (member_id) ON DELETE CASCADE,
    CONSTRAINT member_keys_kek_version_fkey
        FOREIGN KEY (kek_version) REFERENCES kek_versions (version)
);
-- Rotation counts and re-wraps DEKs per KEK version.
CREATE INDEX member_keys_kek_version_idx ON member_keys (kek_version);

CREATE TABLE consents (
    member_id      uuid        NOT NULL,
    purpose        text        NOT NULL,
    granted        boolean     NOT NULL,
    policy_version text        NOT NULL,
    recorded_at    timestamptz NOT NULL,
    CONSTRAINT consents_pkey PRIMARY KEY (member_id, purpose),
    CONSTRAINT consents_member_id_fkey
        FOREIGN KEY (member_id) REFERENCES members (member_id) ON DELETE CASCADE
);

CREATE TABLE access_log (
    entry_id  bigint      GENERATED ALWAYS AS IDENTITY,
    member_id uuid        NOT NULL,
    at        timestamptz NOT NULL,
    action_ct bytea       NOT NULL,
    ip_ct     bytea       NOT NULL,
    CONSTRAINT access_log_pkey PRIMARY KEY (entry_id),
    CONSTRAINT access_log_member_id_fkey
        FOREIGN KEY (member_id) REFERENCES members (member_id) ON DELETE CASCADE
);
CREATE INDEX access_log_member_at_idx ON access_log (member_id, at DESC, entry_id DESC);
-- The 6-month retention purge deletes by age.
CREATE INDEX access_log_at_idx ON access_log (at);

CREATE TABLE tombstones (
    member_id    uuid        NOT NULL,
    destroyed_at timestamptz NOT NULL,
    CONSTRAINT tombstones_pkey PRIMARY KEY (member_id)
);

-- Proof of destruction; carries no PII.
CREATE TABLE destruction_records (
    record_id    bigint      GENERATED ALWAYS AS IDENTITY,
    member_id    uuid        NOT NULL,
    destroyed_at timestamptz NOT NULL,
    reason       text        NOT NULL,
    items        jsonb       NOT NULL,
    kek_versions jsonb       NOT NULL,
    CONSTRAINT destruction_records_pkey PRIMARY KEY (record_id)
);
CREATE INDEX destruction_records_member_idx ON destruction_records (member_id);
