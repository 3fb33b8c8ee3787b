-- Who did what to which key, and when. Never key bytes.
CREATE TABLE key_events (
    event_id    INTEGER PRIMARY KEY AUTOINCREMENT,
    at          INTEGER NOT NULL,
    actor       TEXT    NOT NULL,
    operation   TEXT    NOT NULL,
    kek_version INTEGER,
    member_id   TEXT,
    details     TEXT    NOT NULL
);
CREATE INDEX key_events_at_idx ON key_events (at);
