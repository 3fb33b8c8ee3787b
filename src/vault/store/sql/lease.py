"""The sidecar's lease (see :class:`vault.store.contracts.lease.LeaseStore`), once for both."""

from __future__ import annotations

from datetime import datetime, timedelta

from vault.store.sql.dialect import both
from vault.store.sql.executor import SqlExecutor

# One upsert: taken only if free, expired, or already ours. Of two racing callers
# the second waits on the row (PostgreSQL) or the write lock (SQLite), then
# re-checks the WHERE against the winner's row and updates nothing.
_ACQUIRE = both(
    "INSERT INTO leases (name, holder, expires_at) VALUES ($1, $2, $3) "
    "ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, "
    "expires_at = excluded.expires_at "
    "WHERE leases.holder = excluded.holder OR leases.expires_at <= $4"
)
_RELEASE = both("DELETE FROM leases WHERE name = $1 AND holder = $2")


class SqlLease(SqlExecutor):
    """The lease row, in one portable conditional write (no advisory locks)."""

    async def acquire_lease(self, name: str, holder: str, now: datetime, ttl: timedelta) -> bool:
        d = self._dialect
        expires, at = d.time(now + ttl), d.time(now)
        return await self._run(_ACQUIRE[d.name], name, holder, expires, at) == 1

    async def release_lease(self, name: str, holder: str) -> None:
        await self._run(_RELEASE[self._dialect.name], name, holder)
