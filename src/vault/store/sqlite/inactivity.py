"""SQLite: the inactivity notices and the expiry of inactive members."""

from __future__ import annotations

import sqlite3
from datetime import datetime

from vault.store._common import (
    canonical_member_id,
    check_limit,
)
from vault.store.rows import (
    OutboxMessage,
)
from vault.store.sqlite._db import _SqliteDatabase, _to_us
from vault.store.sqlite._shared import (
    _INSERT_OUTBOX,
    _outbox_params,
)


class SqliteInactivity(_SqliteDatabase):
    """SQLite: the inactivity sweep's reads and its notice write."""

    async def record_inactivity_notice(
        self, member_id: str, last_seen_at: datetime, message: OutboxMessage
    ) -> bool:
        member_id = canonical_member_id(member_id)
        if canonical_member_id(message.member_id) != member_id:
            raise ValueError("the message is for another member")
        mark = (_to_us(message.created_at), member_id, _to_us(last_seen_at))
        row = _outbox_params(message)

        def work(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE members SET inactivity_notice_at = ? WHERE member_id = ? "
                "AND last_seen_at = ? AND inactivity_notice_at IS NULL",
                mark,
            )
            if cur.rowcount != 1:
                return False
            conn.execute(_INSERT_OUTBOX, row)
            return True

        return await self._write(work)

    async def members_due_for_expiry(
        self, last_seen_before: datetime, noticed_before: datetime, limit: int
    ) -> list[str]:
        params = (_to_us(last_seen_before), _to_us(noticed_before), check_limit(limit))

        def work(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute(
                "SELECT member_id FROM members WHERE inactivity_notice_at IS NOT NULL "
                "AND last_seen_at < ? AND inactivity_notice_at < ? "
                "ORDER BY last_seen_at LIMIT ?",
                params,
            ).fetchall()
            return [str(r[0]) for r in rows]

        return self._read(work)
