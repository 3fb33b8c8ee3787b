-- A withdrawal with retention: the destruction record says until when what the
-- member entered is kept in the separated storage (NULL: destroyed at once).
ALTER TABLE destruction_records ADD COLUMN retained_until INTEGER;
