-- Third-party provision (issue 12, policy section 4). recipients: the privacy
-- officer's registry of who may receive members' data, for which purposes and
-- fields (JSON arrays), on what basis and under which contract. A row is never
-- changed: a member's consent to provision names the recipient as registered. No
-- member data.
CREATE TABLE recipients (
    recipient_id       text        NOT NULL,
    legal_entity       text        NOT NULL,
    contact_email      text        NOT NULL,
    purposes           text        NOT NULL,
    fields             text        NOT NULL,
    legal_basis        text        NOT NULL,
    contract_reference text        NOT NULL,
    registered_at      timestamptz NOT NULL,
    registered_by      text        NOT NULL,
    CONSTRAINT recipients_pkey PRIMARY KEY (recipient_id)
);

-- The disclosure ledger: one row per provision (and per correction notice, policy
-- section 7: the corrected value sent to a recipient of the old one), never
-- updated, gone only with the member (a shred, or the withdrawal's move into
-- retention). recipient_id, purpose and the field names (a JSON array) are not
-- personal; details_ct (the caller and a legal basis's reference and approver) is
-- sealed under the member's DEK, so a shred destroys it with the rest.
CREATE TABLE disclosures (
    disclosure_id bigint      GENERATED ALWAYS AS IDENTITY,
    member_id     uuid        NOT NULL,
    recipient_id  text        NOT NULL,
    purpose       text        NOT NULL,
    fields        text        NOT NULL,
    basis         text        NOT NULL,
    disclosed_at  timestamptz NOT NULL,
    details_ct    bytea       NOT NULL,
    -- Made by the vault before the insert: details_ct is sealed to it (and to
    -- disclosed_at), so no two entries can trade their details.
    entry_id      uuid        NOT NULL,
    -- A correction notice's outbox message id: each is recorded (and sent) once.
    notice_id     text,
    CONSTRAINT disclosures_pkey PRIMARY KEY (disclosure_id),
    CONSTRAINT disclosures_entry_id_key UNIQUE (entry_id),
    CONSTRAINT disclosures_notice_id_key UNIQUE (notice_id),
    CONSTRAINT disclosures_member_id_fkey
        FOREIGN KEY (member_id) REFERENCES members (member_id) ON DELETE CASCADE,
    CONSTRAINT disclosures_recipient_id_fkey
        FOREIGN KEY (recipient_id) REFERENCES recipients (recipient_id),
    CONSTRAINT disclosures_basis_check CHECK (basis IN ('consent', 'legal', 'correction'))
);
CREATE INDEX disclosures_member_idx ON disclosures (member_id, disclosure_id);
-- Which members received a recipient's data (correction notices look it up).
CREATE INDEX disclosures_recipient_idx ON disclosures (recipient_id, member_id);

-- Policy section 7's notices, owed: UpdateMember's transaction that applies a
-- correction of a member with ledger entries sets notices_due; the sidecar queues
-- the notices (their ledger entries and outbox rows) and clears it in one
-- transaction per correction, so a crash between the two loses none and a retry
-- sends none twice. A shred takes the correction, and the debt, along.
ALTER TABLE corrections ADD COLUMN notices_due boolean     NOT NULL DEFAULT false;
CREATE INDEX corrections_notices_due_idx ON corrections (resolved_at, correction_id)
    WHERE notices_due;
