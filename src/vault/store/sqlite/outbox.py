"""SQLite: enqueueing mail (the rest of the outbox is in vault.store.sql.outbox)."""

from __future__ import annotations

import sqlite3

from vault.store.rows import (
    OutboxMessage,
)
from vault.store.sqlite._db import _SqliteDatabase
from vault.store.sqlite._shared import (
    _INSERT_OUTBOX,
    _decoy_write,
    _outbox_params,
)


class SqliteOutbox(_SqliteDatabase):
    """SQLite: enqueueing mail (the rest of the outbox is in vault.store.sql.outbox)."""

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
