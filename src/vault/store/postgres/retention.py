"""PostgreSQL: the separated retention store (a database of its own)."""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Any

import asyncpg

from vault.clock import from_micros, to_micros
from vault.store._common import (
    RETAINED_COLUMNS,
    check_limit,
    check_retained,
    require_aware,
)
from vault.store.postgres._db import _affected, _PostgresDatabase, _uuid
from vault.store.rows import (
    RETAINED_FIELDS,
    AccessEntryRow,
    ConsentRow,
    MemberKeyRow,
    RetainedMember,
    RetainedSummary,
)
from vault.store.sql.access_log import optional_bytes, retained_ciphertexts
from vault.store.sql.retention import SqlRetention

_RETAINED_CT_SELECT = ", ".join(RETAINED_COLUMNS[f] for f in RETAINED_FIELDS)


class PostgresRetentionStore(SqlRetention, _PostgresDatabase):
    """The separated retention storage in a PostgreSQL database of its own (see
    RetentionStore)."""

    _SCHEMA = "retention"
    _MIGRATIONS_TABLE = "retention_schema_migrations"
    _KEYS_TABLE = "retained_members"

    async def _check_schema(self, conn: Any) -> None:
        if await conn.fetchval("SELECT to_regclass('kek_versions')") is not None:
            # Separated storage means a separate database (policy section 6).
            raise ValueError("the retention database must not be the vault's database")

    async def put_retained(self, member: RetainedMember, stale_before: datetime) -> bool:
        member_id = check_retained(member)
        key = uuid.UUID(member_id)
        consents = json.dumps(
            [
                [c.purpose, c.granted, c.policy_version, to_micros(require_aware(c.recorded_at))]
                for c in member.consents
            ]
        )
        async with self._transaction() as conn:
            found = await conn.fetchrow(
                "SELECT confirmed, attempt, retained_at FROM retained_members "
                "WHERE member_id = $1 FOR UPDATE",
                key,
            )
            if found is not None:
                stale = found["retained_at"] < require_aware(stale_before)
                if found["confirmed"] or (found["attempt"] != member.attempt and not stale):
                    return False
                await conn.execute("DELETE FROM retained_members WHERE member_id = $1", key)
            try:
                await conn.execute(
                    "INSERT INTO retained_members (member_id, retained_at, destroy_after, "
                    f"reason, attempt, dek_id, kek_version, wrapped_dek, {_RETAINED_CT_SELECT}, "
                    "consents) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, "
                    "$13::jsonb)",
                    key,
                    member.retained_at,
                    member.destroy_after,
                    member.reason,
                    member.attempt,
                    member.key.dek_id,
                    member.key.kek_version,
                    bytes(member.key.wrapped_dek),
                    *(bytes(member.ciphertexts[f]) for f in RETAINED_FIELDS),
                    consents,
                )
            except asyncpg.UniqueViolationError:
                return False  # another attempt inserted first
            if member.access_log:
                await conn.copy_records_to_table(
                    "retained_access_log",
                    records=[
                        (key, e.entry_id, e.at, *retained_ciphertexts(e)) for e in member.access_log
                    ],
                    columns=["member_id", "entry_id", "at", "action_ct", "ip_ct", "caller_ct"],
                )
        return True

    async def get_retained(self, member_id: str) -> RetainedMember | None:
        key = _uuid(member_id)
        async with self._transaction() as conn:
            row = await conn.fetchrow(
                "SELECT retained_at, destroy_after, reason, attempt, confirmed, dek_id, "
                f"kek_version, wrapped_dek, consents::text AS consents, {_RETAINED_CT_SELECT} "
                "FROM retained_members WHERE member_id = $1",
                key,
            )
            if row is None:
                return None
            entries = await conn.fetch(
                "SELECT entry_id, at, action_ct, ip_ct, caller_ct FROM retained_access_log "
                "WHERE member_id = $1 ORDER BY at DESC, entry_id DESC",
                key,
            )
        mid = str(key)
        return RetainedMember(
            member_id=mid,
            retained_at=row["retained_at"],
            destroy_after=row["destroy_after"],
            reason=str(row["reason"]),
            key=MemberKeyRow(
                mid, int(row["dek_id"]), int(row["kek_version"]), bytes(row["wrapped_dek"])
            ),
            ciphertexts={f: bytes(row[RETAINED_COLUMNS[f]]) for f in RETAINED_FIELDS},
            consents=tuple(
                ConsentRow(str(p), bool(g), str(v), from_micros(int(t)))
                for p, g, v, t in json.loads(row["consents"])
            ),
            access_log=tuple(
                AccessEntryRow(
                    int(e["entry_id"]),
                    e["at"],
                    bytes(e["action_ct"]),
                    bytes(e["ip_ct"]),
                    optional_bytes(e["caller_ct"]),
                )
                for e in entries
            ),
            attempt=str(row["attempt"]),
            confirmed=bool(row["confirmed"]),
        )

    async def list_retained(
        self, limit: int, after_member_id: str | None = None
    ) -> list[RetainedSummary]:
        after = None if after_member_id is None else _uuid(after_member_id)
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT m.member_id, m.retained_at, m.destroy_after, m.reason, m.confirmed, "
                "m.kek_version, (SELECT count(*) FROM retained_access_log AS a "
                "WHERE a.member_id = m.member_id) AS entries FROM retained_members AS m "
                "WHERE $1::uuid IS NULL OR m.member_id > $1 ORDER BY m.member_id LIMIT $2",
                after,
                check_limit(limit),
            )
        return [
            RetainedSummary(
                str(r["member_id"]),
                r["retained_at"],
                r["destroy_after"],
                str(r["reason"]),
                bool(r["confirmed"]),
                int(r["kek_version"]),
                int(r["entries"]),
            )
            for r in rows
        ]

    async def delete_retained(self, member_id: str, *, attempt: str | None = None) -> bool:
        key = _uuid(member_id)
        async with self._transaction() as conn:
            found = await conn.fetchrow(
                "SELECT confirmed, attempt FROM retained_members WHERE member_id = $1 FOR UPDATE",
                key,
            )
            if found is None or (
                attempt is not None and (found["confirmed"] or found["attempt"] != attempt)
            ):
                return False
            await conn.execute("DELETE FROM retained_access_log WHERE member_id = $1", key)
            await conn.execute("DELETE FROM retained_members WHERE member_id = $1", key)
        return True

    async def purge_access_log(self, before: datetime, limit: int) -> int:
        async with self._transaction() as conn:
            status = await conn.execute(
                "DELETE FROM retained_access_log WHERE (member_id, entry_id) IN "
                "(SELECT member_id, entry_id FROM retained_access_log WHERE at < $1 "
                "ORDER BY at LIMIT $2 FOR UPDATE SKIP LOCKED)",
                require_aware(before),
                check_limit(limit),
            )
        return _affected(status)
