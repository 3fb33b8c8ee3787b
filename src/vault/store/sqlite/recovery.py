"""SQLite: recovery tokens and the recovery-mail quota."""

from __future__ import annotations

import json
import sqlite3

from vault.store._common import (
    check_token_hash,
)
from vault.store.rows import (
    NewPasswordReset,
    OutboxMessage,
    RecoveryMailOutcome,
)
from vault.store.sqlite._db import _SqliteDatabase, _to_us
from vault.store.sqlite._shared import (
    _INSERT_OUTBOX,
    _decoy_write,
    _outbox_params,
)


class SqliteRecovery(_SqliteDatabase):
    """SQLite: recovery tokens and the recovery-mail quota."""

    async def _recovery_mail(
        self,
        message: OutboxMessage,
        reset: NewPasswordReset | None,
        quota: tuple[int, int] | None,
    ) -> RecoveryMailOutcome:
        """One write transaction: the member check, the quota (limit, since) when
        given, the reset row when given, the mail. BEGIN IMMEDIATE serialises every
        writer of the file, so the count and the insert cannot be split."""
        row = _outbox_params(message)
        member_id, at = row[1], row[4]
        reset_row = (
            None
            if reset is None
            else (check_token_hash(reset.token_hash), member_id, _to_us(reset.expires_at))
        )

        def work(conn: sqlite3.Connection) -> RecoveryMailOutcome:
            found = conn.execute("SELECT 1 FROM members WHERE member_id = ?", (member_id,))
            if found.fetchone() is None:
                _decoy_write(conn)
                return "no_member"
            if quota is not None:
                limit, since = quota
                sent = conn.execute(
                    "SELECT sent_at FROM recovery_mail_quota WHERE member_id = ?", (member_id,)
                ).fetchone()
                recent = [] if sent is None else [int(t) for t in json.loads(sent[0]) if t > since]
                if len(recent) >= limit:
                    return "limited"
                conn.execute(
                    "INSERT INTO recovery_mail_quota (member_id, sent_at) VALUES (?, ?) "
                    "ON CONFLICT (member_id) DO UPDATE SET sent_at = excluded.sent_at",
                    (member_id, json.dumps([*recent, at])),
                )
            if reset_row is not None:
                conn.execute(
                    "INSERT INTO password_resets (token_hash, member_id, expires_at) "
                    "VALUES (?, ?, ?)",
                    reset_row,
                )
            conn.execute(_INSERT_OUTBOX, row)
            return "queued"

        return await self._write(work)
