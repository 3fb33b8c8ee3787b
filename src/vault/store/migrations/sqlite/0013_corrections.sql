-- Corrections (privacy policy section 7, issue 12): "if the user requests the
-- correction of incorrect personal data, the company should not use or provide
-- the personal data in question until correction is complete". A correction
-- names fields; while a field of it is pending, every read of that field but the
-- member's own is refused (the member read's own query selects the pending
-- fields). The note and the closing reason are free text that may hold personal
-- data: sealed under the member's DEK like every field. Who asked and who
-- resolved are calling-service identities or "member" (no personal data).
-- Timestamps are INTEGER microseconds since the Unix epoch (UTC).
CREATE TABLE corrections (
    correction_id TEXT    PRIMARY KEY,
    member_id     TEXT    NOT NULL REFERENCES members (member_id) ON DELETE CASCADE,
    requested_at  INTEGER NOT NULL,
    requested_by  TEXT    NOT NULL,
    note_ct       BLOB,
    state         TEXT    NOT NULL CHECK (state IN ('pending', 'applied', 'closed')),
    resolved_at   INTEGER,
    resolved_by   TEXT,
    reason_ct     BLOB
);
CREATE INDEX corrections_member_idx ON corrections (member_id, requested_at);

-- One row per field a correction names; each is released on its own: corrected by
-- UpdateMember, or closed with its correction.
CREATE TABLE correction_fields (
    correction_id TEXT    NOT NULL REFERENCES corrections (correction_id) ON DELETE CASCADE,
    member_id     TEXT    NOT NULL REFERENCES members (member_id) ON DELETE CASCADE,
    field         TEXT    NOT NULL CHECK (field IN ('name', 'email', 'mobile_phone')),
    state         TEXT    NOT NULL CHECK (state IN ('pending', 'corrected', 'closed')),
    released_at   INTEGER,
    PRIMARY KEY (correction_id, field)
);
-- The member read's subquery: a member's pending fields, by index.
CREATE INDEX correction_fields_pending_idx ON correction_fields (member_id)
    WHERE state = 'pending';

-- Statistics (policy section 3(3)) that outlive the members they count: sign-ups
-- and withdrawals per UTC day of members who consented to statistics at that
-- moment. No member id: a shred leaves them whole.
CREATE TABLE statistics_days (
    day         TEXT    PRIMARY KEY,
    sign_ups    INTEGER NOT NULL DEFAULT 0,
    withdrawals INTEGER NOT NULL DEFAULT 0
);
