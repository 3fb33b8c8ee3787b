"""SQLite: KEK versions, the blind-index key, member-key replacement and key events."""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from datetime import datetime

from vault.errors import (
    KeyChanged,
    NotFound,
    PreconditionFailed,
)
from vault.store._common import (
    check_kek_version,
    check_key_replacement,
    check_unused,
    require_aware,
    update_assignments,
)
from vault.store.rows import (
    IndexKeyRow,
    KekUsage,
    KekVersionRow,
    MemberKeyRow,
    ResealedAccess,
)
from vault.store.sqlite._db import _from_us, _SqliteDatabase, _to_us
from vault.store.sqlite._shared import (
    _member_has_dek,
    _require_not_destroyed,
    _unchanged_since_read,
)


def _kek_version(row: sqlite3.Row) -> KekVersionRow:
    return KekVersionRow(
        version=int(row["version"]),
        state=row["state"],
        created_at=_from_us(row["created_at"]),
        destroyed_at=None if row["destroyed_at"] is None else _from_us(row["destroyed_at"]),
    )


def _index_key(row: sqlite3.Row) -> IndexKeyRow:
    return IndexKeyRow(
        key_id=int(row["key_id"]),
        kek_version=int(row["kek_version"]),
        wrapped_key=bytes(row["wrapped_key"]),
        created_at=_from_us(row["created_at"]),
    )


class SqliteKeys(_SqliteDatabase):
    """SQLite: KEK versions, the blind-index key, member-key replacement and key events."""

    # --- key hierarchy -------------------------------------------------------
    async def list_kek_versions(self) -> list[KekVersionRow]:
        def work(conn: sqlite3.Connection) -> list[KekVersionRow]:
            rows = conn.execute(
                "SELECT version, state, created_at, destroyed_at FROM kek_versions ORDER BY version"
            )
            return [_kek_version(r) for r in rows]

        return self._read(work)

    async def insert_kek_version(self, row: KekVersionRow) -> bool:
        check_kek_version(row)
        params = (
            row.version,
            row.state,
            _to_us(row.created_at),
            None if row.destroyed_at is None else _to_us(row.destroyed_at),
        )

        def work(conn: sqlite3.Connection) -> bool:
            try:
                cur = conn.execute(
                    "INSERT INTO kek_versions (version, state, created_at, destroyed_at) "
                    "VALUES (?, ?, ?, ?) ON CONFLICT (version) DO NOTHING",
                    params,
                )
            except sqlite3.IntegrityError:
                # The only other constraint is the one-active partial index.
                raise PreconditionFailed(
                    "kek_version", "another KEK version is active already"
                ) from None
            return cur.rowcount == 1

        return await self._write(work)

    async def get_index_key(self) -> IndexKeyRow | None:
        def work(conn: sqlite3.Connection) -> IndexKeyRow | None:
            row = conn.execute(
                "SELECT key_id, kek_version, wrapped_key, created_at FROM index_keys "
                "ORDER BY key_id LIMIT 1"
            ).fetchone()
            return None if row is None else _index_key(row)

        return self._read(work)

    async def insert_index_key(self, row: IndexKeyRow) -> IndexKeyRow:
        params = (row.key_id, row.kek_version, bytes(row.wrapped_key), _to_us(row.created_at))
        select = (
            "SELECT key_id, kek_version, wrapped_key, created_at FROM index_keys "
            "ORDER BY key_id LIMIT 1"
        )

        def work(conn: sqlite3.Connection) -> IndexKeyRow:
            # BEGIN IMMEDIATE serialises writers, so check-then-insert is safe.
            existing = conn.execute(select).fetchone()
            if existing is None:
                conn.execute(
                    "INSERT INTO index_keys (key_id, kek_version, wrapped_key, created_at) "
                    "VALUES (?, ?, ?, ?)",
                    params,
                )
                existing = conn.execute(select).fetchone()
            return _index_key(existing)

        return await self._write(work)

    async def rotate_kek(self, version: int, at: datetime) -> KekVersionRow:
        row = KekVersionRow(version, "active", at)
        check_kek_version(row)
        created = _to_us(at)

        def work(conn: sqlite3.Connection) -> KekVersionRow:
            exists = conn.execute("SELECT 1 FROM kek_versions WHERE version = ?", (version,))
            if exists.fetchone() is not None:
                raise PreconditionFailed("kek_version", f"KEK version {version} exists already")
            conn.execute("UPDATE kek_versions SET state = 'decrypt_only' WHERE state = 'active'")
            conn.execute(
                "INSERT INTO kek_versions (version, state, created_at) VALUES (?, 'active', ?)",
                (version, created),
            )
            return row

        return await self._write(work)

    async def destroy_kek_version(self, version: int, at: datetime) -> KekVersionRow:
        destroyed_at = _to_us(require_aware(at))

        def work(conn: sqlite3.Connection) -> KekVersionRow:
            found = conn.execute(
                "SELECT version, state, created_at, destroyed_at FROM kek_versions "
                "WHERE version = ?",
                (version,),
            ).fetchone()
            if found is None:
                raise NotFound(f"KEK version {version}")
            current = _kek_version(found)
            if current.state == "destroyed":
                return current
            if current.state == "active":
                raise PreconditionFailed(
                    "kek_version", f"KEK version {version} is active; rotate first", "ACTIVE"
                )
            members, indexes = conn.execute(
                "SELECT (SELECT count(*) FROM member_keys WHERE kek_version = ?), "
                "(SELECT count(*) FROM index_keys WHERE kek_version = ?)",
                (version, version),
            ).fetchone()
            check_unused(version, int(members), int(indexes))
            conn.execute(
                "UPDATE kek_versions SET state = 'destroyed', destroyed_at = ? WHERE version = ?",
                (destroyed_at, version),
            )
            return KekVersionRow(version, "destroyed", current.created_at, _from_us(destroyed_at))

        return await self._write(work)

    async def kek_usage(self) -> list[KekUsage]:
        def work(conn: sqlite3.Connection) -> list[KekUsage]:
            rows = conn.execute(
                "SELECT v.version, "
                "(SELECT count(*) FROM member_keys AS k WHERE k.kek_version = v.version), "
                "(SELECT count(*) FROM index_keys AS i WHERE i.kek_version = v.version) "
                "FROM kek_versions AS v ORDER BY v.version"
            ).fetchall()
            return [KekUsage(int(v), int(m), int(i)) for v, m, i in rows]

        return self._read(work)

    async def rewrap_index_key(
        self, key_id: int, from_version: int, to_version: int, wrapped_key: bytes
    ) -> bool:
        def work(conn: sqlite3.Connection) -> bool:
            return (
                conn.execute(
                    "UPDATE index_keys SET kek_version = ?, wrapped_key = ? "
                    "WHERE key_id = ? AND kek_version = ?",
                    (to_version, bytes(wrapped_key), key_id, from_version),
                ).rowcount
                == 1
            )

        return await self._write(work)

    async def replace_member_key(
        self,
        member_id: str,
        old_dek_id: int,
        new_key: MemberKeyRow,
        ciphertexts: Mapping[str, bytes],
        access_log: Mapping[int, ResealedAccess],
        *,
        old_ciphertexts: Mapping[str, bytes],
    ) -> bool:
        member_id, expected = check_key_replacement(
            member_id, new_key, ciphertexts, old_ciphertexts
        )
        assignments = update_assignments(ciphertexts, None)
        setters = ", ".join(f"{column} = ?" for column, _ in assignments)
        field_params = [value for _, value in assignments] + [member_id]
        entries = [
            (bytes(a), bytes(i), c and bytes(c), entry_id)
            for entry_id, (a, i, c) in access_log.items()
        ]

        def work(conn: sqlite3.Connection) -> bool:
            try:
                if not _member_has_dek(conn, member_id, old_dek_id):
                    return False
            except KeyChanged:
                return False
            _require_not_destroyed(conn, new_key.kek_version)
            if not _unchanged_since_read(conn, member_id, expected, access_log.keys()):
                return False
            conn.execute(
                "UPDATE member_keys SET dek_id = ?, kek_version = ?, wrapped_dek = ? "
                "WHERE member_id = ?",
                (new_key.dek_id, new_key.kek_version, bytes(new_key.wrapped_dek), member_id),
            )
            conn.execute(f"UPDATE members SET {setters} WHERE member_id = ?", field_params)
            conn.executemany(
                "UPDATE access_log SET action_ct = ?, ip_ct = ?, caller_ct = ? WHERE entry_id = ?",
                entries,
            )
            return True

        return await self._write(work)
