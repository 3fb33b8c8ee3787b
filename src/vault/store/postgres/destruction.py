"""PostgreSQL: shredding members and the destruction records."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

from vault.errors import (
    KeyChanged,
)
from vault.store._common import (
    SHRED_TABLES,
    check_retention,
    require_aware,
    shred_items,
)
from vault.store.postgres._db import _affected, _PostgresDatabase, _uuid
from vault.store.postgres._shared import (
    _LOCK_MEMBER,
    _LOCK_MEMBER_KEY,
    _matches_retention,
)
from vault.store.rows import (
    DestructionRecord,
    RetentionCheck,
)
from vault.store.sql.login_failures import SHRED_FAILURES


async def _insert_destruction_record(conn: Any, record: DestructionRecord) -> None:
    await conn.execute(
        "INSERT INTO destruction_records "
        "(member_id, destroyed_at, reason, items, kek_versions, retained_until) "
        "VALUES ($1, $2, $3, $4, $5, $6)",
        _uuid(record.member_id),
        record.destroyed_at,
        record.reason,
        json.dumps(dict(record.items)),
        json.dumps(list(record.kek_versions)),
        record.retained_until,
    )


class PostgresDestruction(_PostgresDatabase):
    """PostgreSQL: shredding members and the destruction records."""

    # --- destruction -----------------------------------------------------------
    async def shred_member(
        self,
        member_id: str,
        destroyed_at: datetime,
        reason: str,
        *,
        last_seen_before: datetime | None = None,
        retention: RetentionCheck | None = None,
    ) -> DestructionRecord | None:
        key = _uuid(member_id)
        require_aware(destroyed_at)
        expected = [] if retention is None else check_retention(retention)
        async with self._transaction() as conn:
            # The lock order: the member first (a concurrent shred waits, then finds
            # nothing; a login, which updates this row, is either seen or waits), then
            # its key, then (for a withdrawal) the KEK version and the access log.
            locked = await conn.fetchrow(_LOCK_MEMBER, key)
            if locked is None:
                return None
            last_seen = locked["last_seen_at"]
            if last_seen_before is not None and last_seen >= require_aware(last_seen_before):
                return None
            key_row = await conn.fetchrow(_LOCK_MEMBER_KEY, key)
            dek_id = None if key_row is None else int(key_row["dek_id"])
            if retention is not None and not await _matches_retention(
                conn, key, retention, expected, locked, dek_id
            ):
                raise KeyChanged
            versions = [] if key_row is None else [int(key_row["kek_version"])]
            await conn.execute(SHRED_FAILURES["postgres"], key)  # keyed by the login index
            counts = {
                table: _affected(
                    await conn.execute(f"DELETE FROM {table} WHERE member_id = $1", key)
                )
                for table in SHRED_TABLES
            }
            await conn.execute(
                "INSERT INTO tombstones (member_id, destroyed_at) VALUES ($1, $2) "
                "ON CONFLICT (member_id) DO NOTHING",
                key,
                destroyed_at,
            )
            record = DestructionRecord(
                member_id=str(key),
                destroyed_at=destroyed_at,
                reason=reason,
                items=shred_items(counts),
                kek_versions=tuple(versions),
                retained_until=None if retention is None else retention.retained_until,
            )
            await _insert_destruction_record(conn, record)
        return record

    async def record_destruction(
        self, record: DestructionRecord, *, unless: Sequence[str] = ()
    ) -> bool:
        key = _uuid(record.member_id)
        require_aware(record.destroyed_at)
        async with self._transaction() as conn:
            # Serialised per member: two sweeps racing record it once.
            await conn.execute("SELECT 1 FROM tombstones WHERE member_id = $1 FOR UPDATE", key)
            found = await conn.fetchval(
                "SELECT 1 FROM destruction_records WHERE member_id = $1 "
                "AND reason = ANY($2::text[])",
                key,
                sorted({record.reason, *unless}),
            )
            if found is not None:
                return False
            await _insert_destruction_record(conn, replace(record, member_id=str(key)))
        return True
