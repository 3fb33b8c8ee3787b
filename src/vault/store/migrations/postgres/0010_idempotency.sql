-- Idempotent writes (AIP-155): SignUp and RecordAccess with a request_id.
-- key_hash: HMAC of (caller identity, method, request_id); request_mac: HMAC of
-- the request's fields (it holds a password: never a plain hash). Written in the
-- transaction of the write it guards; the result is the member id. Purged after
-- 24 hours (the lifecycle); a shred deletes the member's rows (cascade).
CREATE TABLE idempotency_keys (
    key_hash    bytea       NOT NULL,
    request_mac bytea       NOT NULL,
    member_id   uuid        NOT NULL,
    created_at  timestamptz NOT NULL,
    CONSTRAINT idempotency_keys_pkey PRIMARY KEY (key_hash),
    CONSTRAINT idempotency_keys_member_id_fkey
        FOREIGN KEY (member_id) REFERENCES members (member_id) ON DELETE CASCADE
);
CREATE INDEX idempotency_keys_member_idx ON idempotency_keys (member_id);
CREATE INDEX idempotency_keys_created_idx ON idempotency_keys (created_at);
