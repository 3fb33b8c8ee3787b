-- Third-party provision (issue 12, policy section 4). recipients: the privacy
-- officer's registry of who may receive members' data, for which purposes and
-- fields (JSON arrays), on what basis and under which contract. A row is never
-- changed: a member's consent to provision names the recipient as registered. No
-- member data.
CREATE TABLE recipients (
    recipient_id       TEXT    NOT NULL PRIMARY KEY,
    legal_entity       TEXT    NOT NULL,
    contact_email      TEXT    NOT NULL,
    purposes           TEXT    NOT NULL,
    fields             TEXT    NOT NULL,
    legal_basis        TEXT    NOT NULL,
    contract_reference TEXT    NOT NULL,
    registered_at      INTEGER NOT NULL,
    registered_by      TEXT    NOT NULL
);

-- The disclosure ledger: one row per provision (and per correction notice, policy
-- section 7: the corrected value sent to a recipient of the old one), never
-- updated, gone only with the member (a shred, or the withdrawal's move into
-- retention). recipient_id, purpose and the field names (a JSON array) are not
-- personal; details_ct (the caller and a legal basis's reference and approver) is
-- sealed under the member's DEK, so a shred destroys it with the rest.
CREATE TABLE disclosures (
    disclosure_id INTEGER PRIMARY KEY AUTOINCREMENT,
    member_id     TEXT    NOT NULL REFERENCES members (member_id) ON DELETE CASCADE,
    recipient_id  TEXT    NOT NULL REFERENCES recipients (recipient_id),
    purpose       TEXT    NOT NULL,
    fields        TEXT    NOT NULL,
    basis         TEXT    NOT NULL CHECK (basis IN ('consent', 'legal', 'correction')),
    disclosed_at  INTEGER NOT NULL,
    details_ct    BLOB    NOT NULL,
    -- Made by the vault before the insert: details_ct is sealed to it (and to
    -- disclosed_at), so no two entries can trade their details.
    entry_id      TEXT    NOT NULL UNIQUE,
    -- A correction notice's outbox message id: each is recorded (and sent) once.
    notice_id     TEXT    UNIQUE
);
CREATE INDEX disclosures_member_idx ON disclosures (member_id, disclosure_id);
-- Which members received a recipient's data (correction notices look it up).
CREATE INDEX disclosures_recipient_idx ON disclosures (recipient_id, member_id);

-- Policy section 7's notices, owed: UpdateMember's transaction that applies a
-- correction of a member with ledger entries sets notices_due; the sidecar queues
-- the notices (their ledger entries and outbox rows) and clears it in one
-- transaction per correction, so a crash between the two loses none and a retry
-- sends none twice. A shred takes the correction, and the debt, along.
ALTER TABLE corrections ADD COLUMN notices_due INTEGER NOT NULL DEFAULT 0;
CREATE INDEX corrections_notices_due_idx ON corrections (resolved_at, correction_id)
    WHERE notices_due = 1;
