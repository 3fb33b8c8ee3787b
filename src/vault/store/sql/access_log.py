"""The access log's dry-run count (part of
:class:`vault.store.contracts.access_log.AccessLogStore`) and its insert, once for
both backends. Appending, paging and the purge stay in the backends (PostgreSQL:
monthly partitions and a member-row share lock)."""

from __future__ import annotations

from datetime import datetime

from vault.store.rows import AccessEntryRow, NewAccessEntry
from vault.store.sql.dialect import both
from vault.store.sql.executor import SqlExecutor

#: One entry: (member_id, at) then :func:`entry_ciphertexts`.
INSERT_ACCESS = both(
    "INSERT INTO access_log (member_id, at, action_ct, ip_ct, caller_ct) "
    "VALUES ($1, $2, $3, $4, $5)"
)


def entry_ciphertexts(entry: NewAccessEntry) -> tuple[bytes, bytes, bytes | None]:
    """An entry's (action, ip, caller) ciphertexts as the drivers bind them."""
    caller = None if entry.caller_ct is None else bytes(entry.caller_ct)
    return bytes(entry.action_ct), bytes(entry.ip_ct), caller


def retained_ciphertexts(entry: AccessEntryRow) -> tuple[bytes, bytes, bytes | None]:
    """A retained copy's (action, ip, caller) ciphertexts, as read from the vault."""
    return bytes(entry.action_ct), bytes(entry.ip_ct), optional_bytes(entry.caller_ct)


def optional_bytes(value: object) -> bytes | None:
    """A nullable BLOB/bytea column (caller_ct before migration 0011)."""
    return None if value is None else bytes(value)  # type: ignore[call-overload]


_COUNT_BEFORE = both("SELECT count(*) FROM access_log WHERE at < $1")


class SqlAccessLogCount(SqlExecutor):
    """How many entries the 6-month rule would delete."""

    async def count_access_log_before(self, before: datetime) -> int:
        d = self._dialect
        rows = await self._fetch(_COUNT_BEFORE[d.name], d.time(before))
        return int(rows[0][0])
