-- Corrections (privacy policy section 7, issue 12): "if the user requests the
-- correction of incorrect personal data, the company should not use or provide
-- the personal data in question until correction is complete". A correction
-- names fields; while a field of it is pending, every read of that field but the
-- member's own is refused (the member read's own query selects the pending
-- fields). The note and the closing reason are free text that may hold personal
-- data: sealed under the member's DEK like every field. Who asked and who
-- resolved are calling-service identities or "member" (no personal data).
CREATE TABLE corrections (
    correction_id text        NOT NULL,
    member_id     uuid        NOT NULL,
    requested_at  timestamptz NOT NULL,
    requested_by  text        NOT NULL,
    note_ct       bytea,
    state         text        NOT NULL CHECK (state IN ('pending', 'applied', 'closed')),
    resolved_at   timestamptz,
    resolved_by   text,
    reason_ct     bytea,
    CONSTRAINT corrections_pkey PRIMARY KEY (correction_id),
    CONSTRAINT corrections_member_id_fkey
        FOREIGN KEY (member_id) REFERENCES members (member_id) ON DELETE CASCADE
);
CREATE INDEX corrections_member_idx ON corrections (member_id, requested_at);

-- One row per field a correction names; each is released on its own: corrected by
-- UpdateMember, or closed with its correction.
CREATE TABLE correction_fields (
    correction_id text        NOT NULL,
    member_id     uuid        NOT NULL,
    field         text        NOT NULL CHECK (field IN ('name', 'email', 'mobile_phone')),
    state         text        NOT NULL CHECK (state IN ('pending', 'corrected', 'closed')),
    released_at   timestamptz,
    CONSTRAINT correction_fields_pkey PRIMARY KEY (correction_id, field),
    CONSTRAINT correction_fields_correction_id_fkey
        FOREIGN KEY (correction_id) REFERENCES corrections (correction_id) ON DELETE CASCADE,
    CONSTRAINT correction_fields_member_id_fkey
        FOREIGN KEY (member_id) REFERENCES members (member_id) ON DELETE CASCADE
);
-- The member read's subquery: a member's pending fields, by index.
CREATE INDEX correction_fields_pending_idx ON correction_fields (member_id)
    WHERE state = 'pending';

-- Statistics (policy section 3(3)) that outlive the members they count: sign-ups
-- and withdrawals per UTC day of members who consented to statistics at that
-- moment. No member id: a shred leaves them whole.
CREATE TABLE statistics_days (
    day         text    NOT NULL,
    sign_ups    integer NOT NULL DEFAULT 0,
    withdrawals integer NOT NULL DEFAULT 0,
    CONSTRAINT statistics_days_pkey PRIMARY KEY (day)
);
