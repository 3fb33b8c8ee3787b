-- The lifecycle sidecar: a lease so only one sidecar acts, the inactivity
-- notice mark, and the transactional e-mail outbox. No PII in any of them.

CREATE TABLE leases (
    name       TEXT    PRIMARY KEY,
    holder     TEXT    NOT NULL,
    expires_at INTEGER NOT NULL
);

-- Set when the inactivity notice is enqueued; a login clears it.
ALTER TABLE members ADD COLUMN inactivity_notice_at INTEGER;
-- Partial indexes: the notice sweep reads only members without a notice, the
-- expiry sweep only those with one, each in last_seen_at order, so a sweep
-- costs what is due, not the member count.
CREATE INDEX members_notice_due_idx ON members (last_seen_at)
    WHERE inactivity_notice_at IS NULL;
CREATE INDEX members_expiry_due_idx ON members (last_seen_at)
    WHERE inactivity_notice_at IS NOT NULL;

-- The recipient is named by member id only and resolved at send time.
-- params: JSON object of template parameters without personal data.
CREATE TABLE outbox (
    message_id      TEXT    PRIMARY KEY,
    member_id       TEXT    NOT NULL REFERENCES members (member_id) ON DELETE CASCADE,
    kind            TEXT    NOT NULL,
    params          TEXT    NOT NULL,
    created_at      INTEGER NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL
);
CREATE INDEX outbox_next_attempt_idx ON outbox (next_attempt_at);
-- A shred deletes the member's pending mail.
CREATE INDEX outbox_member_idx ON outbox (member_id);
