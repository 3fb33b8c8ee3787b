"""PostgreSQL: KEK versions, the blind-index key, member-key replacement and key events."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import asyncpg

from vault.errors import (
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
from vault.store.postgres._db import _affected, _PostgresDatabase
from vault.store.postgres._shared import (
    _LOCK_MEMBER,
    _LOCK_MEMBER_KEY,
    _field_ciphertexts,
    _locked_entries,
    _require_not_destroyed,
)
from vault.store.rows import (
    IndexKeyRow,
    KekUsage,
    KekVersionRow,
    MemberKeyRow,
    ResealedAccess,
)

_SELECT_INDEX_KEY = (
    "SELECT key_id, kek_version, wrapped_key, created_at FROM index_keys ORDER BY key_id LIMIT 1"
)


def _kek_version(row: Mapping[str, Any]) -> KekVersionRow:
    return KekVersionRow(
        version=int(row["version"]),
        state=row["state"],
        created_at=row["created_at"],
        destroyed_at=row["destroyed_at"],
    )


def _index_key(row: Mapping[str, Any]) -> IndexKeyRow:
    return IndexKeyRow(
        key_id=int(row["key_id"]),
        kek_version=int(row["kek_version"]),
        wrapped_key=bytes(row["wrapped_key"]),
        created_at=row["created_at"],
    )


class PostgresKeys(_PostgresDatabase):
    """PostgreSQL: KEK versions, the blind-index key, member-key replacement and key events."""

    # --- key hierarchy -------------------------------------------------------
    async def list_kek_versions(self) -> list[KekVersionRow]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT version, state, created_at, destroyed_at FROM kek_versions ORDER BY version"
            )
        return [_kek_version(r) for r in rows]

    async def insert_kek_version(self, row: KekVersionRow) -> bool:
        check_kek_version(row)
        try:
            async with self._transaction() as conn:
                status = await conn.execute(
                    "INSERT INTO kek_versions (version, state, created_at, destroyed_at) "
                    "VALUES ($1, $2, $3, $4) ON CONFLICT (version) DO NOTHING",
                    row.version,
                    row.state,
                    row.created_at,
                    row.destroyed_at,
                )
        except asyncpg.UniqueViolationError:
            # The only other unique constraint is the one-active partial index.
            raise PreconditionFailed(
                "kek_version", "another KEK version is active already"
            ) from None
        return _affected(status) == 1

    async def get_index_key(self) -> IndexKeyRow | None:
        async with self._connection() as conn:
            row = await conn.fetchrow(_SELECT_INDEX_KEY)
        return None if row is None else _index_key(row)

    async def insert_index_key(self, row: IndexKeyRow) -> IndexKeyRow:
        require_aware(row.created_at)
        async with self._transaction() as conn:
            # Self-conflicting lock: concurrent bootstraps run check-then-insert
            # one after the other; plain readers are not blocked.
            await conn.execute("LOCK TABLE index_keys IN SHARE ROW EXCLUSIVE MODE")
            existing = await conn.fetchrow(_SELECT_INDEX_KEY)
            if existing is None:
                await conn.execute(
                    "INSERT INTO index_keys (key_id, kek_version, wrapped_key, created_at) "
                    "VALUES ($1, $2, $3, $4)",
                    row.key_id,
                    row.kek_version,
                    bytes(row.wrapped_key),
                    row.created_at,
                )
                existing = await conn.fetchrow(_SELECT_INDEX_KEY)
        return _index_key(existing)

    async def rotate_kek(self, version: int, at: datetime) -> KekVersionRow:
        row = KekVersionRow(version, "active", at)
        check_kek_version(row)
        async with self._transaction() as conn:
            # Rotations (and destroys) of KEK versions take turns.
            await conn.execute("LOCK TABLE kek_versions IN SHARE ROW EXCLUSIVE MODE")
            if await conn.fetchval("SELECT 1 FROM kek_versions WHERE version = $1", version):
                raise PreconditionFailed("kek_version", f"KEK version {version} exists already")
            await conn.execute(
                "UPDATE kek_versions SET state = 'decrypt_only' WHERE state = 'active'"
            )
            await conn.execute(
                "INSERT INTO kek_versions (version, state, created_at) VALUES ($1, 'active', $2)",
                version,
                at,
            )
        return row

    async def destroy_kek_version(self, version: int, at: datetime) -> KekVersionRow:
        require_aware(at)
        async with self._transaction() as conn:
            # FOR UPDATE waits for sign-ups holding the version FOR SHARE, so a DEK
            # being wrapped under it is either counted below or refused.
            found = await conn.fetchrow(
                "SELECT version, state, created_at, destroyed_at FROM kek_versions "
                "WHERE version = $1 FOR UPDATE",
                version,
            )
            if found is None:
                raise NotFound(f"KEK version {version}")
            current = _kek_version(found)
            if current.state == "destroyed":
                return current
            if current.state == "active":
                raise PreconditionFailed(
                    "kek_version", f"KEK version {version} is active; rotate first", "ACTIVE"
                )
            counts = await conn.fetchrow(
                "SELECT (SELECT count(*) FROM member_keys WHERE kek_version = $1) AS m, "
                "(SELECT count(*) FROM index_keys WHERE kek_version = $1) AS i",
                version,
            )
            check_unused(version, int(counts["m"]), int(counts["i"]))
            await conn.execute(
                "UPDATE kek_versions SET state = 'destroyed', destroyed_at = $2 WHERE version = $1",
                version,
                at,
            )
        return KekVersionRow(version, "destroyed", current.created_at, at)

    async def kek_usage(self) -> list[KekUsage]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT v.version, "
                "(SELECT count(*) FROM member_keys AS k WHERE k.kek_version = v.version) AS m, "
                "(SELECT count(*) FROM index_keys AS i WHERE i.kek_version = v.version) AS i "
                "FROM kek_versions AS v ORDER BY v.version"
            )
        return [KekUsage(int(r["version"]), int(r["m"]), int(r["i"])) for r in rows]

    async def rewrap_index_key(
        self, key_id: int, from_version: int, to_version: int, wrapped_key: bytes
    ) -> bool:
        async with self._transaction() as conn:
            status = await conn.execute(
                "UPDATE index_keys SET kek_version = $3, wrapped_key = $4 "
                "WHERE key_id = $1 AND kek_version = $2",
                key_id,
                from_version,
                to_version,
                bytes(wrapped_key),
            )
        return _affected(status) == 1

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
        canonical, expected = check_key_replacement(
            member_id, new_key, ciphertexts, old_ciphertexts
        )
        key = uuid.UUID(canonical)
        assignments = update_assignments(ciphertexts, None)
        setters = ", ".join(f"{column} = ${i}" for i, (column, _) in enumerate(assignments, 2))
        async with self._transaction() as conn:
            # The lock order: member, key, KEK version, access log. Each check fails
            # if the rotation's caller read something that changed since.
            locked = await conn.fetchrow(_LOCK_MEMBER, key)
            if locked is None or _field_ciphertexts(locked) != expected:
                return False
            current = await conn.fetchrow(_LOCK_MEMBER_KEY, key)
            if current is None or int(current["dek_id"]) != old_dek_id:
                return False
            await _require_not_destroyed(conn, new_key.kek_version)
            present = await _locked_entries(conn, key)
            if set(present) != set(access_log):
                return False  # an entry came (or went) since the caller read them
            await conn.execute(
                "UPDATE member_keys SET dek_id = $2, kek_version = $3, wrapped_dek = $4 "
                "WHERE member_id = $1",
                key,
                new_key.dek_id,
                new_key.kek_version,
                bytes(new_key.wrapped_dek),
            )
            await conn.execute(
                f"UPDATE members SET {setters} WHERE member_id = $1",
                key,
                *(value for _, value in assignments),
            )
            if access_log:
                await conn.executemany(
                    "UPDATE access_log SET action_ct = $3, ip_ct = $4, caller_ct = $5 "
                    "WHERE entry_id = $1 AND at = $2",
                    [
                        (entry_id, present[entry_id], bytes(a), bytes(i), c and bytes(c))
                        for entry_id, (a, i, c) in access_log.items()
                    ],
                )
        return True
