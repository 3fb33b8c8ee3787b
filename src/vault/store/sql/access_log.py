"""The access log's appends, pages and dry-run count (part of
:class:`vault.store.contracts.access_log.AccessLogStore`), once for both backends.
The purge stays in the backends (PostgreSQL: monthly partitions and SKIP LOCKED;
SQLite: batches by rowid)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from vault.store._common import check_limit
from vault.store.contracts.idempotency import IdempotencyKey
from vault.store.rows import AccessEntryRow, NewAccessEntry
from vault.store.sql import guards
from vault.store.sql.dialect import Dialect, both
from vault.store.sql.executor import ForeignKeyViolation, MemberGone, SqlExecutor, Tx
from vault.store.sql.idempotency import key_params, store_key
from vault.store.sql.members import INSERT_ACCESS, entry_ciphertexts, optional_bytes

_COUNT_BEFORE = both("SELECT count(*) FROM access_log WHERE at < $1")
#: An entry's columns, in the order :func:`access_entry` reads them.
ENTRY_COLUMNS = "entry_id, at, action_ct, ip_ct, caller_ct"
_ENTRIES = f"SELECT {ENTRY_COLUMNS} FROM access_log WHERE member_id = $1"
_NEWEST = "ORDER BY at DESC, entry_id DESC"
_PAGE = both(f"{_ENTRIES} {_NEWEST} LIMIT $2")
_PAGE_BEFORE = both(f"{_ENTRIES} AND (at, entry_id) < ($2, $3) {_NEWEST} LIMIT $4")


def access_entry(d: Dialect, row: Sequence[Any]) -> AccessEntryRow:
    """An entry read as :data:`ENTRY_COLUMNS` (the vault's log or a retained copy)."""
    entry_id, at, action, ip, caller = row
    return AccessEntryRow(
        int(entry_id), d.from_time(at), bytes(action), bytes(ip), optional_bytes(caller)
    )


class SqlAccessLog(SqlExecutor):
    """Appending an entry, paging a member's entries, and the 6-month rule's count."""

    async def append_access(
        self,
        member_id: str,
        entry: NewAccessEntry,
        *,
        dek_id: int,
        idempotency: IdempotencyKey | None = None,
    ) -> bool:
        d = self._dialect
        key = d.member_id(member_id)
        row = (key, d.time(entry.at), *entry_ciphertexts(entry))
        request = key_params(d, idempotency)

        async def body(tx: Tx) -> bool:
            # The lock order: the insert's foreign key check locks the members row
            # (PostgreSQL: FOR KEY SHARE) first, then the key row is checked; a
            # rotated key (or none) rolls the insert back.
            await tx.run(INSERT_ACCESS[d.name], *row)
            await guards.check_dek(tx, d, key, dek_id)
            await store_key(tx, d, request)  # a live key there rolls the entry back
            return True

        try:
            return await self._in_transaction(body)
        except (ForeignKeyViolation, MemberGone):
            return False  # no such member

    async def list_access(
        self,
        member_id: str,
        limit: int,
        before: tuple[datetime, int] | None = None,
    ) -> list[AccessEntryRow]:
        d = self._dialect
        key, limit = d.member_id(member_id), check_limit(limit)
        if before is None:
            rows = await self._fetch(_PAGE[d.name], key, limit)
        else:
            at, entry_id = d.time(before[0]), int(before[1])
            rows = await self._fetch(_PAGE_BEFORE[d.name], key, at, entry_id, limit)
        return [access_entry(d, r) for r in rows]

    async def count_access_log_before(self, before: datetime) -> int:
        d = self._dialect
        rows = await self._fetch(_COUNT_BEFORE[d.name], d.time(before))
        return int(rows[0][0])
