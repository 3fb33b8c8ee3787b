-- Account-recovery mails (login-ID reminders, password resets) are requested
-- anonymously, so each member gets at most RECOVERY_MAILS_PER_HOUR of them in
-- any hour. One row per member: the times of its recovery mails in the last hour
-- (older times are dropped at the next mail, so it never holds more than the
-- limit). No PII; a shred deletes the row with the member.

CREATE TABLE recovery_mail_quota (
    member_id uuid          NOT NULL,
    sent_at   timestamptz[] NOT NULL,
    CONSTRAINT recovery_mail_quota_pkey PRIMARY KEY (member_id),
    CONSTRAINT recovery_mail_quota_member_id_fkey
        FOREIGN KEY (member_id) REFERENCES members (member_id) ON DELETE CASCADE
);
