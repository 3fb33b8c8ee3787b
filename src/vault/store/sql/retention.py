"""The retention store's simple reads and writes (see
:class:`vault.store.contracts.retention.RetentionStore`), once for both backends.
Copying a member in, reading a copy back, listing and deleting copies, and the
access-log purge (PostgreSQL: SKIP LOCKED) stay in the backends."""

from __future__ import annotations

from datetime import datetime

from vault.store._common import check_limit
from vault.store.rows import KekUsage, RetentionEvent
from vault.store.sql.dialect import both, each
from vault.store.sql.executor import SqlExecutor

_CONFIRM = both("UPDATE retained_members SET confirmed = {true} WHERE member_id = $1")
_DUE = each(
    lambda d: (
        f"SELECT member_id FROM retained_members WHERE {d.flag('confirmed')} "
        "AND destroy_after <= $1 ORDER BY destroy_after LIMIT $2"
    )
)
_UNCONFIRMED = each(
    lambda d: (
        f"SELECT member_id FROM retained_members WHERE {d.flag('confirmed', False)} "
        "AND retained_at < $1 ORDER BY retained_at LIMIT $2"
    )
)
_COUNT_ACCESS = both("SELECT count(*) FROM retained_access_log WHERE at < $1")
_KEK_USAGE = both(
    "SELECT kek_version, count(*) FROM retained_members GROUP BY kek_version ORDER BY kek_version"
)
_RECORD_EVENT = both(
    "INSERT INTO retention_events (at, actor, operation, member_id, basis) "
    "VALUES ($1, $2, $3, $4, $5)"
)
_EVENTS = "SELECT at, actor, operation, member_id, basis FROM retention_events"
_ALL_EVENTS = both(f"{_EVENTS} ORDER BY event_id")
_MEMBERS_EVENTS = both(f"{_EVENTS} WHERE member_id = $1 ORDER BY event_id")


class SqlRetention(SqlExecutor):
    """Confirming copies, the sweeps' reads, the destroy guard's count, and events."""

    async def confirm_retained(self, member_id: str) -> bool:
        d = self._dialect
        return await self._run(_CONFIRM[d.name], d.member_id(member_id)) > 0

    async def retained_due(self, now: datetime, limit: int) -> list[str]:
        d = self._dialect
        rows = await self._fetch(_DUE[d.name], d.time(now), check_limit(limit))
        return [str(r[0]) for r in rows]

    async def unconfirmed_before(self, before: datetime, limit: int) -> list[str]:
        d = self._dialect
        rows = await self._fetch(_UNCONFIRMED[d.name], d.time(before), check_limit(limit))
        return [str(r[0]) for r in rows]

    async def count_access_log_before(self, before: datetime) -> int:
        d = self._dialect
        rows = await self._fetch(_COUNT_ACCESS[d.name], d.time(before))
        return int(rows[0][0])

    async def kek_usage(self) -> list[KekUsage]:
        rows = await self._fetch(_KEK_USAGE[self._dialect.name])
        return [KekUsage(int(v), 0, 0, retained_keys=int(n)) for v, n in rows]

    async def record_event(self, event: RetentionEvent) -> None:
        d = self._dialect
        await self._run(
            _RECORD_EVENT[d.name],
            d.time(event.at),
            event.actor,
            event.operation,
            d.member_id(event.member_id),
            event.basis,
        )

    async def list_events(self, member_id: str | None = None) -> list[RetentionEvent]:
        d = self._dialect
        if member_id is None:
            rows = await self._fetch(_ALL_EVENTS[d.name])
        else:
            rows = await self._fetch(_MEMBERS_EVENTS[d.name], d.member_id(member_id))
        return [
            RetentionEvent(d.from_time(r[0]), str(r[1]), str(r[2]), str(r[3]), str(r[4]))
            for r in rows
        ]
