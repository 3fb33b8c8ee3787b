"""The inactivity sweep's notice read (part of
:class:`vault.store.contracts.inactivity.InactivityStore`), once for both backends.
The notice write (mark and enqueue in one transaction) and the expiry read (a
PostgreSQL planner setting in its transaction) stay in the backends."""

from __future__ import annotations

from datetime import datetime

from vault.store._common import check_limit
from vault.store.sql.dialect import both
from vault.store.sql.executor import SqlExecutor

_DUE_FOR_NOTICE = both(
    "SELECT member_id, last_seen_at FROM members "
    "WHERE inactivity_notice_at IS NULL AND last_seen_at < $1 "
    "ORDER BY last_seen_at LIMIT $2"
)


class SqlInactivity(SqlExecutor):
    """Members inactive since a cutoff who have had no notice yet."""

    async def members_due_for_notice(
        self, last_seen_before: datetime, limit: int
    ) -> list[tuple[str, datetime]]:
        d = self._dialect
        rows = await self._fetch(
            _DUE_FOR_NOTICE[d.name], d.time(last_seen_before), check_limit(limit)
        )
        return [(str(member_id), d.from_time(at)) for member_id, at in rows]
