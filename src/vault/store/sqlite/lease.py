"""SQLite: the sidecar's lease (a named row, one holder at a time)."""

from __future__ import annotations

import sqlite3
from datetime import datetime, timedelta

from vault.store.sqlite._db import _SqliteDatabase, _to_us


class SqliteLease(_SqliteDatabase):
    """SQLite: the sidecar's lease."""

    async def acquire_lease(self, name: str, holder: str, now: datetime, ttl: timedelta) -> bool:
        params = (name, holder, _to_us(now + ttl), _to_us(now))

        def work(conn: sqlite3.Connection) -> bool:
            # One upsert: taken only if free, expired, or already ours.
            cur = conn.execute(
                "INSERT INTO leases (name, holder, expires_at) VALUES (?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, "
                "expires_at = excluded.expires_at "
                "WHERE leases.holder = excluded.holder OR leases.expires_at <= ?",
                params,
            )
            return cur.rowcount == 1

        return await self._write(work)

    async def release_lease(self, name: str, holder: str) -> None:
        def work(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM leases WHERE name = ? AND holder = ?", (name, holder))

        await self._write(work)
