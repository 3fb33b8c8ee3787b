-- A withdrawn member's corrections (vault migration 0012) travel with the copy:
-- a JSON array of {correction_id, requested_at, requested_by, state, resolved_at,
-- resolved_by, fields, note_ct, reason_ct} with the sealed texts in base64, still
-- under the member's DEK.
ALTER TABLE retained_members ADD COLUMN corrections jsonb NOT NULL DEFAULT '[]';
