-- A retained copy keeps the member's consent history (vault migration 0012): a JSON
-- array of [event_id, purpose, granted, policy_version, recorded_at (us),
-- recorded_by, caller], oldest first. No PII.
ALTER TABLE retained_members ADD COLUMN consent_history TEXT NOT NULL DEFAULT '[]';
