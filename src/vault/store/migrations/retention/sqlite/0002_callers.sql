-- A retained copy of an access-log entry keeps its caller (vault migration 0011),
-- still sealed under the member's DEK. NULL where the entry had none.
ALTER TABLE retained_access_log ADD COLUMN caller_ct BLOB;
