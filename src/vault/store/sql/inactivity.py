"""The inactivity sweep (:class:`vault.store.contracts.inactivity.InactivityStore`),
once for both backends. PostgreSQL reads the expiry batch under a planner setting
of its own (see ``PostgresInactivity``), with the same statement."""

from __future__ import annotations

from datetime import datetime

from vault.store._common import check_limit
from vault.store.rows import OutboxMessage
from vault.store.sql import guards
from vault.store.sql.dialect import both
from vault.store.sql.executor import SqlExecutor, Tx

_DUE_FOR_NOTICE = both(
    "SELECT member_id, last_seen_at FROM members "
    "WHERE inactivity_notice_at IS NULL AND last_seen_at < $1 "
    "ORDER BY last_seen_at LIMIT $2"
)
DUE_FOR_EXPIRY = both(
    "SELECT member_id FROM members WHERE inactivity_notice_at IS NOT NULL "
    "AND last_seen_at < $1 AND inactivity_notice_at < $2 "
    "ORDER BY last_seen_at LIMIT $3"
)
_MARK_NOTICED = both(
    "UPDATE members SET inactivity_notice_at = $3 WHERE member_id = $1 "
    "AND last_seen_at = $2 AND inactivity_notice_at IS NULL"
)


class SqlInactivity(SqlExecutor):
    """Members due for a notice or for expiry, and the notice's write."""

    async def members_due_for_notice(
        self, last_seen_before: datetime, limit: int
    ) -> list[tuple[str, datetime]]:
        d = self._dialect
        rows = await self._fetch(
            _DUE_FOR_NOTICE[d.name], d.time(last_seen_before), check_limit(limit)
        )
        return [(str(member_id), d.from_time(at)) for member_id, at in rows]

    async def members_due_for_expiry(
        self, last_seen_before: datetime, noticed_before: datetime, limit: int
    ) -> list[str]:
        d = self._dialect
        rows = await self._fetch(
            DUE_FOR_EXPIRY[d.name],
            d.time(last_seen_before),
            d.time(noticed_before),
            check_limit(limit),
        )
        return [str(r[0]) for r in rows]

    async def record_inactivity_notice(
        self, member_id: str, last_seen_at: datetime, message: OutboxMessage
    ) -> bool:
        d = self._dialect
        key = d.member_id(member_id)
        row = guards.outbox_params(d, message)
        if row[1] != key:
            raise ValueError("the message is for another member")
        mark = (key, d.time(last_seen_at), row[4])

        async def body(tx: Tx) -> bool:
            if await tx.run(_MARK_NOTICED[d.name], *mark) != 1:
                return False
            await tx.run(guards.INSERT_OUTBOX[d.name], *row)
            return True

        return await self._in_transaction(body)
