"""Shredding members, tombstones and destruction records (part of
:class:`vault.store.contracts.destruction.DestructionStore`), once for both
backends. SQLite scrubs its WAL after a shred (``scrub=True``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime
from functools import cache
from typing import Any

from vault.errors import KeyChanged
from vault.store._common import SHRED_TABLES, check_retention, require_aware, shred_items
from vault.store.rows import DestructionRecord, RetentionCheck
from vault.store.sql import guards
from vault.store.sql.corrections import count_withdrawal, locked_corrections
from vault.store.sql.dialect import DIALECTS, Dialect, both
from vault.store.sql.executor import SqlExecutor, Tx
from vault.store.sql.login_failures import DELETE_MEMBER_FAILURES

_IS_DESTROYED = both("SELECT 1 FROM tombstones WHERE member_id = $1")
_SELECT = (
    "SELECT member_id, destroyed_at, reason, items{text}, kek_versions{text}, retained_until "
    "FROM destruction_records"
)
_ORDER = "ORDER BY destroyed_at, record_id"
_ALL = both(f"{_SELECT} {_ORDER}")
_MEMBERS = both(f"{_SELECT} WHERE member_id = $1 {_ORDER}")
_INSERT_RECORD = both(
    "INSERT INTO destruction_records "
    "(member_id, destroyed_at, reason, items, kek_versions, retained_until) "
    "VALUES ($1, $2, $3, $4, $5, $6)"
)
_DELETE = {table: both(f"DELETE FROM {table} WHERE member_id = $1") for table in SHRED_TABLES}
_TOMBSTONE = both(
    "INSERT INTO tombstones (member_id, destroyed_at) VALUES ($1, $2) "
    "ON CONFLICT (member_id) DO NOTHING"
)
# PostgreSQL: serialises recording per member (two sweeps racing record it once);
# SQLite holds the write lock already.
_LOCK_TOMBSTONE = both("SELECT 1 FROM tombstones WHERE member_id = $1{update}")


@cache
def _recorded(dialect: str, reasons: int) -> str:
    """Whether the member has a record with one of ``reasons`` reasons ($2...)."""
    marks = ", ".join(f"${i}" for i in range(2, reasons + 2))
    d = next(d for d in DIALECTS if d.name == dialect)
    return d.sql(f"SELECT 1 FROM destruction_records WHERE member_id = $1 AND reason IN ({marks})")


async def _insert_record(tx: Tx, d: Dialect, record: DestructionRecord) -> None:
    retained = record.retained_until
    await tx.run(
        _INSERT_RECORD[d.name],
        d.member_id(record.member_id),
        d.time(record.destroyed_at),
        record.reason,
        json.dumps(dict(record.items)),
        json.dumps(list(record.kek_versions)),
        None if retained is None else d.time(retained),
    )


def _record(d: Dialect, row: Sequence[Any]) -> DestructionRecord:
    member_id, destroyed_at, reason, items, kek_versions, retained = row
    return DestructionRecord(
        member_id=str(member_id),
        destroyed_at=d.from_time(destroyed_at),
        reason=str(reason),
        items={str(k): int(v) for k, v in json.loads(items).items()},
        kek_versions=tuple(int(v) for v in json.loads(kek_versions)),
        retained_until=None if retained is None else d.from_time(retained),
    )


class SqlDestruction(SqlExecutor):
    """Shredding a member, whether a member was destroyed, and the records of what was."""

    async def shred_member(
        self,
        member_id: str,
        destroyed_at: datetime,
        reason: str,
        *,
        last_seen_before: datetime | None = None,
        retention: RetentionCheck | None = None,
        withdrawal: bool = False,
    ) -> DestructionRecord | None:
        d = self._dialect
        key = d.member_id(member_id)
        require_aware(destroyed_at)
        seen_limit = None if last_seen_before is None else d.time(last_seen_before)
        expected = [] if retention is None else check_retention(retention)

        async def body(tx: Tx) -> DestructionRecord | None:
            # The lock order: the member first (a concurrent shred waits, then finds
            # nothing; a login, which updates this row, is either seen or waits), then
            # its key, then (for a withdrawal) the KEK version and the access log.
            locked = await tx.fetchrow(guards.LOCK_MEMBER[d.name], key)
            if locked is None:
                return None
            if seen_limit is not None and locked[0] >= seen_limit:
                return None  # connected since the caller decided: not inactive
            key_row = await tx.fetchrow(guards.LOCK_MEMBER_KEY[d.name], key)
            dek_id = None if key_row is None else int(key_row[0])
            if retention is not None and not (
                await guards.matches_retention(tx, d, key, retention, expected, locked, dek_id)
                and tuple(await locked_corrections(tx, d, key)) == retention.corrections
            ):
                raise KeyChanged
            if withdrawal:  # before its consents go: counted as it consents now
                await count_withdrawal(tx, d, key, destroyed_at)
            # The counter is keyed by the login ID's index: it goes before the member row.
            await tx.run(DELETE_MEMBER_FAILURES[d.name], key)
            counts = {table: await tx.run(_DELETE[table][d.name], key) for table in SHRED_TABLES}
            await tx.run(_TOMBSTONE[d.name], key, d.time(destroyed_at))
            record = DestructionRecord(
                member_id=str(key),
                destroyed_at=d.from_time(d.time(destroyed_at)),
                reason=reason,
                items=shred_items(counts),
                kek_versions=() if key_row is None else (int(key_row[1]),),
                retained_until=None if retention is None else retention.retained_until,
            )
            await _insert_record(tx, d, record)
            return record

        return await self._in_transaction(body, scrub=True)

    async def record_destruction(
        self, record: DestructionRecord, *, unless: Sequence[str] = ()
    ) -> bool:
        d = self._dialect
        key = d.member_id(record.member_id)
        require_aware(record.destroyed_at)
        reasons = sorted({record.reason, *unless})
        recorded = _recorded(d.name, len(reasons))

        async def body(tx: Tx) -> bool:
            await tx.fetchval(_LOCK_TOMBSTONE[d.name], key)
            if await tx.fetchval(recorded, key, *reasons) is not None:
                return False
            await _insert_record(tx, d, replace(record, member_id=str(key)))
            return True

        return await self._in_transaction(body)

    async def is_destroyed(self, member_id: str) -> bool:
        d = self._dialect
        return bool(await self._fetch(_IS_DESTROYED[d.name], d.member_id(member_id)))

    async def list_destruction_records(
        self, member_id: str | None = None
    ) -> list[DestructionRecord]:
        d = self._dialect
        if member_id is None:
            rows = await self._fetch(_ALL[d.name])
        else:
            rows = await self._fetch(_MEMBERS[d.name], d.member_id(member_id))
        return [_record(d, r) for r in rows]
