-- Consent over time (issue 12). The consents table stays the current answer per
-- member and purpose (the member read aggregates it in its own query); every answer
-- is also appended to consent_events, the member's history, which is never updated
-- and goes only with the member (a shred, or the withdrawal's move into retention).
-- No PII: purposes, versions, times, and who recorded it (the member, or a service).
CREATE TABLE consent_events (
    event_id       INTEGER PRIMARY KEY AUTOINCREMENT,
    member_id      TEXT    NOT NULL REFERENCES members (member_id) ON DELETE CASCADE,
    purpose        TEXT    NOT NULL,
    granted        INTEGER NOT NULL CHECK (granted IN (0, 1)),
    policy_version TEXT    NOT NULL,
    recorded_at    INTEGER NOT NULL,
    recorded_by    TEXT    NOT NULL,
    caller         TEXT    NOT NULL
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
    version          TEXT    NOT NULL PRIMARY KEY,
    published_at     INTEGER NOT NULL,
    effective_at     INTEGER NOT NULL,
    text_sha256      TEXT    NOT NULL,
    changed_purposes TEXT    NOT NULL,
    published_by     TEXT    NOT NULL,
    caller           TEXT    NOT NULL,
    notices_done     INTEGER NOT NULL DEFAULT 0 CHECK (notices_done IN (0, 1)),
    notice_cursor    TEXT
);
CREATE INDEX policy_versions_published_idx ON policy_versions (published_at);
-- One row per (version, changed purpose): what the member read joins on, by purpose.
CREATE TABLE policy_changes (
    purpose      TEXT    NOT NULL,
    published_at INTEGER NOT NULL,
    effective_at INTEGER NOT NULL,
    version      TEXT    NOT NULL REFERENCES policy_versions (version),
    PRIMARY KEY (purpose, published_at, version)
);
