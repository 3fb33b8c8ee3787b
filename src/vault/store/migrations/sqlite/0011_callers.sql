-- Who called (issue 10): the calling service's identity (a SPIFFE ID, "local" or
-- "internal") with each access-log entry, sealed under the member's DEK like the
-- action beside it, since it links a service to the member's activity. NULL for
-- entries recorded before callers were known.
ALTER TABLE access_log ADD COLUMN caller_ct BLOB;

-- The calling service beside the actor of each key event. A key event holds no
-- member data (only a member id), so the service's name is kept in clear.
ALTER TABLE key_events ADD COLUMN caller TEXT NOT NULL DEFAULT '';
