-- Who did what to which key, and when. Never key bytes.
CREATE TABLE key_events (
    event_id    bigint      GENERATED ALWAYS AS IDENTITY,
    at          timestamptz NOT NULL,
    actor       text        NOT NULL,
    operation   text        NOT NULL,
    kek_version integer,
    member_id   uuid,
    details     jsonb       NOT NULL,
    CONSTRAINT key_events_pkey PRIMARY KEY (event_id)
);
CREATE INDEX key_events_at_idx ON key_events (at);
