-- Consent over time (issue 12). The consents table stays the current answer per
-- member and purpose (the member read aggregates it in its own query); every answer
-- is also appended to consent_events, the member's history, which is never updated
-- and goes only with the member (a shred, or the withdrawal's move into retention).
-- No PII: purposes, versions, times, and who recorded it (the member, or a service).
CREATE TABLE consent_events (
    event_id       bigint      GENERATED ALWAYS AS IDENTITY,
    member_id      uuid        NOT NULL,
    purpose        text        NOT NULL,
    granted        boolean     NOT NULL,
    policy_version text        NOT NULL,
    recorded_at    timestamptz NOT NULL,
    recorded_by    text        NOT NULL,
    caller         text        NOT NULL,
    CONSTRAINT consent_events_pkey PRIMARY KEY (event_id),
    CONSTRAINT consent_events_member_id_fkey
        FOREIGN KEY (member_id) REFERENCES members (member_id) ON DELETE CASCADE
);
CREATE INDEX consent_events_member_idx ON consent_events (member_id, event_id);
-- The answers given before this migration are each member's first events.
INSERT INTO consent_events
    (member_id, purpose, granted, policy_version, recorded_at, recorded_by, caller)
SELECT member_id, purpose, granted, policy_version, recorded_at, 'member', ''
FROM consents ORDER BY recorded_at, member_id, purpose;

-- Published privacy policy versions (the privacy officer's). changed_purposes: a
-- JSON array of purpose keys. notices_done / notice_cursor: the sidecar queues the
-- affected members' notices page by page, in member id order, each page in one
-- transaction with the cursor, so every affected member gets exactly one.
CREATE TABLE policy_versions (
    version          text        NOT NULL,
    published_at     timestamptz NOT NULL,
    effective_at     timestamptz NOT NULL,
    text_sha256      text        NOT NULL,
    changed_purposes jsonb       NOT NULL,
    published_by     text        NOT NULL,
    caller           text        NOT NULL,
    notices_done     boolean     NOT NULL DEFAULT false,
    notice_cursor    uuid,
    CONSTRAINT policy_versions_pkey PRIMARY KEY (version)
);
CREATE INDEX policy_versions_published_idx ON policy_versions (published_at);
-- One row per (version, changed purpose): what the member read joins on, by purpose.
CREATE TABLE policy_changes (
    purpose      text        NOT NULL,
    published_at timestamptz NOT NULL,
    effective_at timestamptz NOT NULL,
    version      text        NOT NULL,
    CONSTRAINT policy_changes_pkey PRIMARY KEY (purpose, published_at, version),
    CONSTRAINT policy_changes_version_fkey
        FOREIGN KEY (version) REFERENCES policy_versions (version)
);
