"""SQLite: the mail outbox."""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime

from vault.store._common import (
    check_limit,
)
from vault.store.rows import (
    OutboxMessage,
)
from vault.store.sqlite._db import _from_us, _SqliteDatabase, _to_us
from vault.store.sqlite._shared import (
    _INSERT_OUTBOX,
    _decoy_write,
    _outbox_params,
)


class SqliteOutbox(_SqliteDatabase):
    """SQLite: the mail outbox."""

    async def enqueue_outbox(self, message: OutboxMessage) -> bool:
        row = _outbox_params(message)

        def work(conn: sqlite3.Connection) -> bool:
            found = conn.execute("SELECT 1 FROM members WHERE member_id = ?", (row[1],))
            if found.fetchone() is None:
                _decoy_write(conn)
                return False
            conn.execute(f"{_INSERT_OUTBOX} ON CONFLICT (message_id) DO NOTHING", row)
            return True

        return await self._write(work)

    async def due_outbox(self, now: datetime, limit: int) -> list[OutboxMessage]:
        params = (_to_us(now), check_limit(limit))

        def work(conn: sqlite3.Connection) -> list[OutboxMessage]:
            rows = conn.execute(
                "SELECT message_id, member_id, kind, params, created_at, attempts, "
                "next_attempt_at FROM outbox WHERE next_attempt_at <= ? "
                "ORDER BY next_attempt_at, created_at, message_id LIMIT ?",
                params,
            ).fetchall()
            return [
                OutboxMessage(
                    message_id=str(r[0]),
                    member_id=str(r[1]),
                    kind=str(r[2]),
                    params={str(k): str(v) for k, v in json.loads(r[3]).items()},
                    created_at=_from_us(r[4]),
                    attempts=int(r[5]),
                    next_attempt_at=_from_us(r[6]),
                )
                for r in rows
            ]

        return self._read(work)

    async def outbox_sent(self, message_id: str) -> None:
        def work(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM outbox WHERE message_id = ?", (message_id,))

        await self._write(work)

    async def outbox_retry(self, message_id: str, attempts: int, next_attempt_at: datetime) -> None:
        params = (attempts, _to_us(next_attempt_at), message_id)

        def work(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE outbox SET attempts = ?, next_attempt_at = ? WHERE message_id = ?", params
            )

        await self._write(work)
