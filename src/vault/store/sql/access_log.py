"""The access log's dry-run count (part of
:class:`vault.store.contracts.access_log.AccessLogStore`), once for both backends.
Appending, paging and the purge stay in the backends (PostgreSQL: monthly
partitions and a member-row share lock)."""

from __future__ import annotations

from datetime import datetime

from vault.store.sql.dialect import both
from vault.store.sql.executor import SqlExecutor

_COUNT_BEFORE = both("SELECT count(*) FROM access_log WHERE at < $1")


class SqlAccessLogCount(SqlExecutor):
    """How many entries the 6-month rule would delete."""

    async def count_access_log_before(self, before: datetime) -> int:
        d = self._dialect
        rows = await self._fetch(_COUNT_BEFORE[d.name], d.time(before))
        return int(rows[0][0])
