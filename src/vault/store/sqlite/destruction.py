"""SQLite: shredding members and the destruction records."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime

from vault.errors import (
    KeyChanged,
)
from vault.store._common import (
    SHRED_TABLES,
    canonical_member_id,
    check_retention,
    require_aware,
    shred_items,
)
from vault.store.rows import (
    DestructionRecord,
    RetentionCheck,
)
from vault.store.sql.login_failures import SHRED_FAILURES
from vault.store.sqlite._db import _from_us, _SqliteDatabase, _to_us
from vault.store.sqlite._shared import (
    _matches_retention,
)


def _insert_destruction_record(conn: sqlite3.Connection, record: DestructionRecord) -> None:
    conn.execute(
        "INSERT INTO destruction_records "
        "(member_id, destroyed_at, reason, items, kek_versions, retained_until) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        (
            record.member_id,
            _to_us(record.destroyed_at),
            record.reason,
            json.dumps(dict(record.items)),
            json.dumps(list(record.kek_versions)),
            None if record.retained_until is None else _to_us(record.retained_until),
        ),
    )


class SqliteDestruction(_SqliteDatabase):
    """SQLite: shredding members and the destruction records."""

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
        member_id = canonical_member_id(member_id)
        params = (member_id,)
        at = _to_us(destroyed_at)
        seen_limit = None if last_seen_before is None else _to_us(last_seen_before)
        expected = [] if retention is None else check_retention(retention)
        retained_until = None if retention is None else _to_us(retention.retained_until)

        def work(conn: sqlite3.Connection) -> DestructionRecord | None:
            found = conn.execute(
                "SELECT last_seen_at FROM members WHERE member_id = ?", (member_id,)
            ).fetchone()
            if found is None:
                return None
            if seen_limit is not None and found[0] >= seen_limit:
                return None  # connected since the caller decided: not inactive
            if retention is not None and not _matches_retention(
                conn, member_id, retention, expected
            ):
                raise KeyChanged
            versions = sorted(
                {
                    int(r[0])
                    for r in conn.execute(
                        "SELECT kek_version FROM member_keys WHERE member_id = ?", (member_id,)
                    )
                }
            )
            conn.execute(SHRED_FAILURES["sqlite"], params)  # keyed by the login ID's index
            counts = {
                table: conn.execute(f"DELETE FROM {table} WHERE member_id = ?", params).rowcount
                for table in SHRED_TABLES
            }
            items = shred_items(counts)
            conn.execute(
                "INSERT INTO tombstones (member_id, destroyed_at) VALUES (?, ?) "
                "ON CONFLICT (member_id) DO NOTHING",
                (member_id, at),
            )
            record = DestructionRecord(
                member_id=member_id,
                destroyed_at=_from_us(at),
                reason=reason,
                items=items,
                kek_versions=tuple(versions),
                retained_until=None if retained_until is None else _from_us(retained_until),
            )
            _insert_destruction_record(conn, record)
            return record

        return await self._write_and_scrub(work)

    async def record_destruction(
        self, record: DestructionRecord, *, unless: Sequence[str] = ()
    ) -> bool:
        member_id = canonical_member_id(record.member_id)
        require_aware(record.destroyed_at)
        reasons = sorted({record.reason, *unless})
        marks = ", ".join("?" * len(reasons))

        def work(conn: sqlite3.Connection) -> bool:
            found = conn.execute(
                f"SELECT 1 FROM destruction_records WHERE member_id = ? AND reason IN ({marks})",
                (member_id, *reasons),
            ).fetchone()
            if found is not None:
                return False
            _insert_destruction_record(conn, replace(record, member_id=member_id))
            return True

        return await self._write(work)
