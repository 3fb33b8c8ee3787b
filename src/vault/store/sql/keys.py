"""KEK versions, the blind-index key, re-wrap reads and member-key replacement (part
of :class:`vault.store.contracts.keys.KeyStore`), once for both backends. The
batch re-wrap update stays in the backends (PostgreSQL: one statement over
arrays); PostgreSQL's table locks come from ``_serialise``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from vault.errors import NotFound, PreconditionFailed
from vault.store._common import (
    check_kek_version,
    check_key_replacement,
    check_limit,
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
    ResealedCorrection,
)
from vault.store.sql import guards
from vault.store.sql.corrections import reseal_corrections
from vault.store.sql.dialect import Dialect, both
from vault.store.sql.executor import SqlExecutor, Tx, UniqueViolation

_KEK_COLUMNS = "SELECT version, state, created_at, destroyed_at FROM kek_versions"
_KEK_VERSIONS = both(f"{_KEK_COLUMNS} ORDER BY version")
_KEK_VERSION = both(f"{_KEK_COLUMNS} WHERE version = $1{{update}}")
_INSERT_KEK = both(
    "INSERT INTO kek_versions (version, state, created_at, destroyed_at) "
    "VALUES ($1, $2, $3, $4) ON CONFLICT (version) DO NOTHING"
)
_KEK_EXISTS = both("SELECT 1 FROM kek_versions WHERE version = $1")
_DEMOTE_ACTIVE = both("UPDATE kek_versions SET state = 'decrypt_only' WHERE state = 'active'")
_INSERT_ACTIVE = both(
    "INSERT INTO kek_versions (version, state, created_at) VALUES ($1, 'active', $2)"
)
_USES = both(
    "SELECT (SELECT count(*) FROM member_keys WHERE kek_version = $1) AS m, "
    "(SELECT count(*) FROM index_keys WHERE kek_version = $1) AS i"
)
_DESTROY = both("UPDATE kek_versions SET state = 'destroyed', destroyed_at = $2 WHERE version = $1")
_USAGE = both(
    "SELECT v.version, "
    "(SELECT count(*) FROM member_keys AS k WHERE k.kek_version = v.version) AS m, "
    "(SELECT count(*) FROM index_keys AS i WHERE i.kek_version = v.version) AS i "
    "FROM kek_versions AS v ORDER BY v.version"
)
_INDEX_KEY = both(
    "SELECT key_id, kek_version, wrapped_key, created_at FROM index_keys ORDER BY key_id LIMIT 1"
)
_INSERT_INDEX_KEY = both(
    "INSERT INTO index_keys (key_id, kek_version, wrapped_key, created_at) VALUES ($1, $2, $3, $4)"
)
_REWRAP_INDEX_KEY = both(
    "UPDATE index_keys SET kek_version = $3, wrapped_key = $4 "
    "WHERE key_id = $1 AND kek_version = $2"
)
# The vault's member_keys and the retention store's copies, keyset-paged by member.
_TO_REWRAP = {
    table: both(
        f"SELECT member_id, dek_id, kek_version, wrapped_dek FROM {table} "
        "WHERE kek_version <> $1 AND member_id > $2 ORDER BY member_id LIMIT $3"
    )
    for table in ("member_keys", "retained_members")
}
_REPLACE_KEY = both(
    "UPDATE member_keys SET dek_id = $2, kek_version = $3, wrapped_dek = $4 WHERE member_id = $1"
)
_REWRITE_DISCLOSURE = both("UPDATE disclosures SET details_ct = $2 WHERE disclosure_id = $1")
_REWRITE_ENTRY = both(
    "UPDATE access_log SET action_ct = $3, ip_ct = $4, caller_ct = $5 "
    "WHERE entry_id = $1 AND at = $2"
)


def _kek_version(d: Dialect, row: Sequence[Any]) -> KekVersionRow:
    version, state, created_at, destroyed_at = row
    return KekVersionRow(
        int(version),
        state,
        d.from_time(created_at),
        None if destroyed_at is None else d.from_time(destroyed_at),
    )


def _index_key(d: Dialect, row: Sequence[Any]) -> IndexKeyRow:
    key_id, version, wrapped, created_at = row
    return IndexKeyRow(int(key_id), int(version), bytes(wrapped), d.from_time(created_at))


def members_update(d: Dialect, columns: Sequence[str]) -> str:
    """``UPDATE members SET ...`` for these columns, the member id being the first
    argument (spelled in the dialect's placeholders directly: built per call)."""
    mark = d.placeholder
    setters = ", ".join(f"{column} = {mark}{i}" for i, column in enumerate(columns, 2))
    return f"UPDATE members SET {setters} WHERE member_id = {mark}1"


class SqlRewrapRead(SqlExecutor):
    """The member keys still wrapped under another version (vault and retention)."""

    #: The table holding wrapped member DEKs.
    _KEYS_TABLE: str

    async def member_keys_to_rewrap(
        self, target_version: int, after_member_id: str | None, limit: int
    ) -> list[MemberKeyRow]:
        d = self._dialect
        after = d.member_floor if after_member_id is None else d.member_id(after_member_id)
        sql = _TO_REWRAP[self._KEYS_TABLE][d.name]
        rows = await self._fetch(sql, target_version, after, check_limit(limit))
        return [MemberKeyRow(str(m), int(k), int(v), bytes(w)) for m, k, v, w in rows]


class SqlKeys(SqlRewrapRead):
    """KEK versions, the blind-index key and member-key replacement."""

    async def list_kek_versions(self) -> list[KekVersionRow]:
        d = self._dialect
        return [_kek_version(d, r) for r in await self._fetch(_KEK_VERSIONS[d.name])]

    async def insert_kek_version(self, row: KekVersionRow) -> bool:
        check_kek_version(row)
        d = self._dialect
        destroyed = None if row.destroyed_at is None else d.time(row.destroyed_at)
        params = (row.version, row.state, d.time(row.created_at), destroyed)

        async def body(tx: Tx) -> bool:
            return await tx.run(_INSERT_KEK[d.name], *params) == 1

        try:
            return await self._in_transaction(body)
        except UniqueViolation:
            # The only other unique constraint is the one-active partial index.
            raise PreconditionFailed(
                "kek_version", "another KEK version is active already"
            ) from None

    async def get_index_key(self) -> IndexKeyRow | None:
        d = self._dialect
        rows = await self._fetch(_INDEX_KEY[d.name])
        return _index_key(d, rows[0]) if rows else None

    async def insert_index_key(self, row: IndexKeyRow) -> IndexKeyRow:
        d = self._dialect
        params = (row.key_id, row.kek_version, bytes(row.wrapped_key), d.time(row.created_at))

        async def body(tx: Tx) -> IndexKeyRow:
            # Concurrent bootstraps run check-then-insert one after the other.
            await self._serialise(tx, "index_keys")
            existing = await tx.fetchrow(_INDEX_KEY[d.name])
            if existing is None:
                await tx.run(_INSERT_INDEX_KEY[d.name], *params)
                existing = await tx.fetchrow(_INDEX_KEY[d.name])
            assert existing is not None
            return _index_key(d, existing)

        return await self._in_transaction(body)

    async def rotate_kek(self, version: int, at: datetime) -> KekVersionRow:
        row = KekVersionRow(version, "active", at)
        check_kek_version(row)
        d = self._dialect

        async def body(tx: Tx) -> KekVersionRow:
            # Rotations (and destroys) of KEK versions take turns.
            await self._serialise(tx, "kek_versions")
            if await tx.fetchval(_KEK_EXISTS[d.name], version):
                raise PreconditionFailed("kek_version", f"KEK version {version} exists already")
            await tx.run(_DEMOTE_ACTIVE[d.name])
            await tx.run(_INSERT_ACTIVE[d.name], version, d.time(at))
            return row

        return await self._in_transaction(body)

    async def destroy_kek_version(self, version: int, at: datetime) -> KekVersionRow:
        d = self._dialect
        destroyed_at = d.time(require_aware(at))

        async def body(tx: Tx) -> KekVersionRow:
            # FOR UPDATE waits for sign-ups holding the version FOR SHARE, so a DEK
            # being wrapped under it is either counted below or refused.
            found = await tx.fetchrow(_KEK_VERSION[d.name], version)
            if found is None:
                raise NotFound(f"KEK version {version}")
            current = _kek_version(d, found)
            if current.state == "destroyed":
                return current
            if current.state == "active":
                raise PreconditionFailed(
                    "kek_version", f"KEK version {version} is active; rotate first", "ACTIVE"
                )
            counts = await tx.fetchrow(_USES[d.name], version)
            assert counts is not None
            check_unused(version, int(counts[0]), int(counts[1]))
            await tx.run(_DESTROY[d.name], version, destroyed_at)
            return KekVersionRow(
                version, "destroyed", current.created_at, d.from_time(destroyed_at)
            )

        return await self._in_transaction(body)

    async def kek_usage(self) -> list[KekUsage]:
        rows = await self._fetch(_USAGE[self._dialect.name])
        return [KekUsage(int(v), int(m), int(i)) for v, m, i in rows]

    async def rewrap_index_key(
        self, key_id: int, from_version: int, to_version: int, wrapped_key: bytes
    ) -> bool:
        sql = _REWRAP_INDEX_KEY[self._dialect.name]
        return await self._run(sql, key_id, from_version, to_version, bytes(wrapped_key)) == 1

    async def replace_member_key(
        self,
        member_id: str,
        old_dek_id: int,
        new_key: MemberKeyRow,
        ciphertexts: Mapping[str, bytes],
        access_log: Mapping[int, ResealedAccess],
        *,
        old_ciphertexts: Mapping[str, bytes],
        corrections: Mapping[str, ResealedCorrection] | None = None,
        old_corrections: Mapping[str, ResealedCorrection] | None = None,
        disclosures: Mapping[int, bytes] | None = None,
    ) -> bool:
        ledger = {} if disclosures is None else disclosures
        canonical, expected = check_key_replacement(
            member_id, new_key, ciphertexts, old_ciphertexts
        )
        d = self._dialect
        key = d.member_id(canonical)
        assignments = update_assignments(ciphertexts, None)
        update_fields = members_update(d, [column for column, _ in assignments])
        new_key_row = (key, new_key.dek_id, new_key.kek_version, bytes(new_key.wrapped_dek))

        async def body(tx: Tx) -> bool:
            # The lock order: member, key, KEK version, access log. Each check fails
            # if the rotation's caller read something that changed since.
            locked = await tx.fetchrow(guards.LOCK_MEMBER[d.name], key)
            if locked is None or guards.field_ciphertexts(locked) != expected:
                return False
            current = await tx.fetchrow(guards.LOCK_MEMBER_KEY[d.name], key)
            if current is None or int(current[0]) != old_dek_id:
                return False
            await guards.require_not_destroyed(tx, d, new_key.kek_version)
            present = await guards.locked_entries(tx, d, key)
            if set(present) != set(access_log):
                return False  # an entry came (or went) since the caller read them
            if set(await guards.locked_disclosures(tx, d, key)) != set(ledger):
                return False  # so did a disclosure
            if not await reseal_corrections(tx, d, key, old_corrections or {}, corrections or {}):
                return False  # a correction's text came or changed since
            await tx.run(_REPLACE_KEY[d.name], *new_key_row)
            await tx.run(update_fields, key, *(value for _, value in assignments))
            await tx.run_many(
                _REWRITE_ENTRY[d.name],
                [
                    (i, present[i], bytes(a), bytes(ip), None if c is None else bytes(c))
                    for i, (a, ip, c) in access_log.items()
                ],
            )
            await tx.run_many(
                _REWRITE_DISCLOSURE[d.name], [(i, bytes(ct)) for i, ct in ledger.items()]
            )
            return True

        return await self._in_transaction(body)
