-- Account-recovery mails (login-ID reminders, password resets) are requested
-- anonymously, so each member gets at most RECOVERY_MAILS_PER_HOUR of them in
-- any hour. One row per member: the times of its recovery mails in the last hour
-- (older times are dropped at the next mail, so it never holds more than the
-- limit). No PII; a shred deletes the row with the member.

-- sent_at: a JSON array of INTEGER microseconds since the Unix epoch (UTC).
CREATE TABLE recovery_mail_quota (
    member_id TEXT NOT NULL PRIMARY KEY REFERENCES members (member_id) ON DELETE CASCADE,
    sent_at   TEXT NOT NULL
);
