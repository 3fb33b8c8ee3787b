"""PostgreSQL: the sidecar's lease (a named row, one holder at a time)."""

from __future__ import annotations

from datetime import datetime, timedelta

from vault.store._common import (
    require_aware,
)
from vault.store.postgres._db import _affected, _PostgresDatabase


class PostgresLease(_PostgresDatabase):
    """PostgreSQL: the sidecar's lease."""

    async def acquire_lease(self, name: str, holder: str, now: datetime, ttl: timedelta) -> bool:
        async with self._transaction() as conn:
            # One upsert: of two racing callers the second waits on the row, then
            # re-checks the WHERE against the winner's version and updates nothing.
            status = await conn.execute(
                "INSERT INTO leases (name, holder, expires_at) VALUES ($1, $2, $3) "
                "ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, "
                "expires_at = excluded.expires_at "
                "WHERE leases.holder = excluded.holder OR leases.expires_at <= $4",
                name,
                holder,
                require_aware(now) + ttl,
                now,
            )
        return _affected(status) == 1

    async def release_lease(self, name: str, holder: str) -> None:
        async with self._transaction() as conn:
            await conn.execute("DELETE FROM leases WHERE name = $1 AND holder = $2", name, holder)
