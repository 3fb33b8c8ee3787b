"""Tombstones and destruction records, read (part of
:class:`vault.store.contracts.destruction.DestructionStore`), once for both backends.
The shred itself stays in the backends: its lock order and scrub differ."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from vault.store.rows import DestructionRecord
from vault.store.sql.dialect import Dialect, both
from vault.store.sql.executor import SqlExecutor

_IS_DESTROYED = both("SELECT 1 FROM tombstones WHERE member_id = $1")
_SELECT = (
    "SELECT member_id, destroyed_at, reason, items{text}, kek_versions{text}, retained_until "
    "FROM destruction_records"
)
_ORDER = "ORDER BY destroyed_at, record_id"
_ALL = both(f"{_SELECT} {_ORDER}")
_MEMBERS = both(f"{_SELECT} WHERE member_id = $1 {_ORDER}")


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


class SqlDestructionRecords(SqlExecutor):
    """Whether a member was destroyed, and the records of what was."""

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
