"""SQLite: the separated retention store (a database of its own)."""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime

from vault.store._common import (
    RETAINED_COLUMNS,
    canonical_member_id,
    check_limit,
    check_retained,
)
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
from vault.store.sqlite._db import _from_us, _SqliteDatabase, _to_us

_RETAINED_CT_SELECT = ", ".join(RETAINED_COLUMNS[f] for f in RETAINED_FIELDS)


class SqliteRetentionStore(SqlRetention, _SqliteDatabase):
    """The separated retention storage in a SQLite file of its own (see RetentionStore)."""

    _SCHEMA = "retention"
    _MIGRATIONS_TABLE = "retention_schema_migrations"
    _KEYS_TABLE = "retained_members"
    _ACCESS_TABLE = "retained_access_log"

    def _check_schema(self, conn: sqlite3.Connection) -> None:
        vault_tables = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'kek_versions'"
        ).fetchone()
        if vault_tables is not None:
            # Separated storage means a separate database (policy section 6).
            raise ValueError("the retention database must not be the vault's database")

    async def put_retained(self, member: RetainedMember, stale_before: datetime) -> bool:
        member_id = check_retained(member)
        stale = _to_us(stale_before)
        row = (
            member_id,
            _to_us(member.retained_at),
            _to_us(member.destroy_after),
            member.reason,
            member.attempt,
            member.key.dek_id,
            member.key.kek_version,
            bytes(member.key.wrapped_dek),
            *(bytes(member.ciphertexts[f]) for f in RETAINED_FIELDS),
            json.dumps(
                [
                    [c.purpose, c.granted, c.policy_version, _to_us(c.recorded_at)]
                    for c in member.consents
                ]
            ),
        )
        entries = [
            (member_id, e.entry_id, _to_us(e.at), *retained_ciphertexts(e))
            for e in member.access_log
        ]

        def work(conn: sqlite3.Connection) -> bool:
            found = conn.execute(
                "SELECT confirmed, attempt, retained_at FROM retained_members WHERE member_id = ?",
                (member_id,),
            ).fetchone()
            if found is not None:
                confirmed, attempt, retained_at = found
                if confirmed or (attempt != member.attempt and retained_at >= stale):
                    return False
                conn.execute("DELETE FROM retained_access_log WHERE member_id = ?", (member_id,))
                conn.execute("DELETE FROM retained_members WHERE member_id = ?", (member_id,))
            conn.execute(
                "INSERT INTO retained_members (member_id, retained_at, destroy_after, reason, "
                f"attempt, dek_id, kek_version, wrapped_dek, {_RETAINED_CT_SELECT}, consents) "
                f"VALUES ({', '.join('?' * len(row))})",
                row,
            )
            conn.executemany(
                "INSERT INTO retained_access_log "
                "(member_id, entry_id, at, action_ct, ip_ct, caller_ct) VALUES (?, ?, ?, ?, ?, ?)",
                entries,
            )
            return True

        return await self._write(work)

    async def get_retained(self, member_id: str) -> RetainedMember | None:
        member_id = canonical_member_id(member_id)

        def work(conn: sqlite3.Connection) -> RetainedMember | None:
            row = conn.execute(
                "SELECT retained_at, destroy_after, reason, attempt, confirmed, dek_id, "
                f"kek_version, wrapped_dek, consents, {_RETAINED_CT_SELECT} "
                "FROM retained_members WHERE member_id = ?",
                (member_id,),
            ).fetchone()
            if row is None:
                return None
            entries = conn.execute(
                "SELECT entry_id, at, action_ct, ip_ct, caller_ct FROM retained_access_log "
                "WHERE member_id = ? ORDER BY at DESC, entry_id DESC",
                (member_id,),
            ).fetchall()
            return RetainedMember(
                member_id=member_id,
                retained_at=_from_us(row["retained_at"]),
                destroy_after=_from_us(row["destroy_after"]),
                reason=str(row["reason"]),
                key=MemberKeyRow(
                    member_id,
                    int(row["dek_id"]),
                    int(row["kek_version"]),
                    bytes(row["wrapped_dek"]),
                ),
                ciphertexts={f: bytes(row[RETAINED_COLUMNS[f]]) for f in RETAINED_FIELDS},
                consents=tuple(
                    ConsentRow(str(p), bool(g), str(v), _from_us(int(t)))
                    for p, g, v, t in json.loads(row["consents"])
                ),
                access_log=tuple(
                    AccessEntryRow(
                        int(e[0]), _from_us(e[1]), bytes(e[2]), bytes(e[3]), optional_bytes(e[4])
                    )
                    for e in entries
                ),
                attempt=str(row["attempt"]),
                confirmed=bool(row["confirmed"]),
            )

        return self._read(work)

    async def list_retained(
        self, limit: int, after_member_id: str | None = None
    ) -> list[RetainedSummary]:
        params = (
            "" if after_member_id is None else canonical_member_id(after_member_id),
            check_limit(limit),
        )

        def work(conn: sqlite3.Connection) -> list[RetainedSummary]:
            rows = conn.execute(
                "SELECT m.member_id, m.retained_at, m.destroy_after, m.reason, m.confirmed, "
                "m.kek_version, (SELECT count(*) FROM retained_access_log AS a "
                "WHERE a.member_id = m.member_id) FROM retained_members AS m "
                "WHERE m.member_id > ? ORDER BY m.member_id LIMIT ?",
                params,
            ).fetchall()
            return [
                RetainedSummary(
                    str(r[0]),
                    _from_us(r[1]),
                    _from_us(r[2]),
                    str(r[3]),
                    bool(r[4]),
                    int(r[5]),
                    int(r[6]),
                )
                for r in rows
            ]

        return self._read(work)

    async def delete_retained(self, member_id: str, *, attempt: str | None = None) -> bool:
        params = (canonical_member_id(member_id),)

        def work(conn: sqlite3.Connection) -> bool | None:
            found = conn.execute(
                "SELECT confirmed, attempt FROM retained_members WHERE member_id = ?", params
            ).fetchone()
            if found is None or (attempt is not None and (found[0] or found[1] != attempt)):
                return None  # nothing deleted: no scrub either
            conn.execute("DELETE FROM retained_access_log WHERE member_id = ?", params)
            conn.execute("DELETE FROM retained_members WHERE member_id = ?", params)
            return True

        return bool(await self._write_and_scrub(work))
