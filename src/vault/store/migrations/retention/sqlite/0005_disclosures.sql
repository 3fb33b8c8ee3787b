-- A retained copy keeps the member's disclosure ledger (vault migration 0014):
-- a JSON array of [disclosure_id, recipient_id, purpose, fields, basis,
-- disclosed_at (us), details_ct (base64, still sealed under the member's DEK),
-- entry_id (the UUID the details are sealed to)],
-- oldest first.
ALTER TABLE retained_members ADD COLUMN disclosures TEXT NOT NULL DEFAULT '[]';
