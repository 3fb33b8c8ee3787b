"""PostgreSQL backend on asyncpg: production, and the base for scale-out.

Every method runs in one transaction on one pooled connection. Member ids are
``uuid`` columns (canonical lowercase strings at the boundary), timestamps
``timestamptz``, bytes ``bytea``. Connection failures become
:class:`StorageUnavailable` raised ``from None``: asyncpg's messages can hold
the DSN, and unique-violation details hold the HMAC, so neither is chained.

Lock order. Every transaction that touches an existing member takes that
member's row locks in this one order, never backwards, so no two of them can
wait for each other (a deadlock):

1. the ``members`` row: FOR UPDATE to change the member's key or destroy the
   member (a key rotation, a shred, the withdrawal's shred, the expiry sweep's
   shred); the UPDATE itself for the member's own writes; FOR SHARE or FOR KEY
   SHARE (the foreign key check of an insert) to add a row that belongs to it;
2. the ``member_keys`` row: FOR SHARE to check that the DEK a write sealed
   under is still the member's, FOR UPDATE to replace or delete it;
3. ``kek_versions`` rows: FOR SHARE, so a version stays active or undestroyed
   until commit;
4. the member's own rows in ``access_log``, ``consents``, ``outbox`` and
   ``password_resets``.

Three kinds of transaction touch a subset only, and keep to the same order: a
sign-up locks the KEK version first, but the rows it then inserts are new (no
one else can hold them); a re-wrap batch updates ``member_keys`` rows alone, in
member_id order; KEK rotation and destruction lock ``kek_versions`` alone. A
deadlock or serialization failure that still happens (between two re-wrap runs,
say) is :class:`Conflict`: the transaction was rolled back whole, so the
caller may retry.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any, Self

import asyncpg

from vault.clock import from_micros, to_micros
from vault.errors import (
    AlreadyExists,
    Conflict,
    KeyChanged,
    NotFound,
    PreconditionFailed,
    StorageUnavailable,
)
from vault.store._common import (
    CT_COLUMNS,
    CT_SELECT,
    HMAC_COLUMNS,
    RETAINED_COLUMNS,
    SHRED_TABLES,
    canonical_member_id,
    check_kek_version,
    check_key_replacement,
    check_limit,
    check_new_member,
    check_retained,
    check_retention,
    check_token_hash,
    check_unused,
    hmac_column,
    outbox_params_json,
    require_aware,
    shred_items,
    update_assignments,
)
from vault.store._migrations import load_migrations
from vault.store.base import (
    RETAINED_FIELDS,
    AccessEntryRow,
    ConsentRow,
    DestructionRecord,
    IndexedField,
    IndexKeyRow,
    KekUsage,
    KekVersionRow,
    KeyEvent,
    MemberKeyRow,
    MemberRow,
    NewAccessEntry,
    NewPasswordReset,
    OutboxMessage,
    RecoveryMailOutcome,
    RetainedMember,
    RetainedSummary,
    RetentionCheck,
    RetentionEvent,
    RewrapUpdate,
)

# Errors meaning "the server cannot be reached or used right now".
_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # includes ConnectionError and TimeoutError
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
)

# Unique constraint (named in the migration) -> the field it protects.
_UNIQUE_FIELDS: Mapping[str, str] = {
    "members_login_hmac_key": "login_id",
    "members_email_hmac_key": "email",
    "members_pkey": "member_id",
    "member_keys_pkey": "member_id",
}

_MEMBER_COLUMNS = ", ".join(
    [
        "m.member_id",
        "m.created_at",
        "m.last_seen_at",
        *(f"m.{column}" for column in HMAC_COLUMNS.values()),
        *(f"m.{column}" for column in CT_COLUMNS.values()),
        "k.dek_id",
        "k.kek_version",
        "k.wrapped_dek",
    ]
)
# The member's consents ride along as an array of records: one round trip.
_SELECT_MEMBER = (
    f"SELECT {_MEMBER_COLUMNS}, ARRAY("
    "SELECT ROW(c.purpose, c.granted, c.policy_version, c.recorded_at) FROM consents AS c "
    "WHERE c.member_id = m.member_id ORDER BY c.purpose) AS consents "
    "FROM members AS m JOIN member_keys AS k ON k.member_id = m.member_id"
)
_SELECT_INDEX_KEY = (
    "SELECT key_id, kek_version, wrapped_key, created_at FROM index_keys ORDER BY key_id LIMIT 1"
)
_CREATE_SCHEMA_MIGRATIONS = """
CREATE TABLE IF NOT EXISTS {table} (
    version    integer     NOT NULL,
    name       text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT {table}_pkey PRIMARY KEY (version)
)
"""
# Concurrent CREATE TABLE IF NOT EXISTS can still collide in the catalog; the
# loser retries and then finds the table.
_MIGRATE_ATTEMPTS = 3


def _uuid(member_id: str) -> uuid.UUID:
    return uuid.UUID(canonical_member_id(member_id))


def _affected(status: str) -> int:
    """Row count from a command status such as ``DELETE 3`` or ``INSERT 0 1``."""
    return int(status.rsplit(" ", 1)[-1])


def _unique_error(exc: asyncpg.UniqueViolationError) -> Exception:
    field = _UNIQUE_FIELDS.get(exc.constraint_name or "")
    if field is None:
        # Not a blind index; the detail would hold a value, so say nothing of it.
        return RuntimeError("a unique constraint failed")
    return AlreadyExists(field)


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


def _member(row: Mapping[str, Any]) -> MemberRow:
    member_id = str(row["member_id"])
    return MemberRow(
        member_id=member_id,
        created_at=row["created_at"],
        last_seen_at=row["last_seen_at"],
        ciphertexts={field: bytes(row[column]) for field, column in CT_COLUMNS.items()},
        blind_indexes={field: bytes(row[column]) for field, column in HMAC_COLUMNS.items()},
        key=MemberKeyRow(
            member_id=member_id,
            dek_id=int(row["dek_id"]),
            kek_version=int(row["kek_version"]),
            wrapped_dek=bytes(row["wrapped_dek"]),
        ),
        consents=tuple(_consent(c) for c in row["consents"]),
    )


def _consent(row: Sequence[Any]) -> ConsentRow:
    purpose, granted, policy_version, recorded_at = row
    return ConsentRow(str(purpose), bool(granted), str(policy_version), recorded_at)


def _destruction_record(row: Mapping[str, Any]) -> DestructionRecord:
    return DestructionRecord(
        member_id=str(row["member_id"]),
        destroyed_at=row["destroyed_at"],
        reason=str(row["reason"]),
        items={str(k): int(v) for k, v in json.loads(row["items"]).items()},
        kek_versions=tuple(int(v) for v in json.loads(row["kek_versions"])),
        retained_until=row["retained_until"],
    )


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


# Step 1 of the lock order for a key change or a shred: the member row FOR UPDATE,
# with what those check against (last_seen_at, then the ciphertexts in column order).
_LOCK_MEMBER = f"SELECT last_seen_at, {CT_SELECT} FROM members WHERE member_id = $1 FOR UPDATE"
# Step 2 for them: the key row FOR UPDATE.
_LOCK_MEMBER_KEY = "SELECT dek_id, kek_version FROM member_keys WHERE member_id = $1 FOR UPDATE"


def _field_ciphertexts(locked: Mapping[str, Any]) -> list[bytes]:
    """The ciphertexts of a row read by _LOCK_MEMBER, in column order."""
    return [bytes(locked[column]) for column in CT_COLUMNS.values()]


async def _locked_entries(conn: Any, key: uuid.UUID) -> dict[int, datetime]:
    """Step 4: the member's access-log entries FOR UPDATE, entry_id -> at. Writers of
    these rows wait for the caller's transaction (and then fail their dek_id check).
    An update names the partition key too, so each row is found by partition
    pruning rather than a probe of every month."""
    rows = await conn.fetch(
        "SELECT entry_id, at FROM access_log WHERE member_id = $1 FOR UPDATE", key
    )
    return {int(r["entry_id"]): r["at"] for r in rows}


async def _matches_retention(
    conn: Any,
    key: uuid.UUID,
    check: RetentionCheck,
    expected: list[bytes],
    locked: Mapping[str, Any],
    dek_id: int | None,
) -> bool:
    """Whether the member (its row ``locked`` and its key row ``dek_id`` locked by
    the caller, steps 1 and 2) is still exactly what the withdrawal copied
    (RetentionCheck). The active version is read FOR SHARE (step 3): a rotation
    that would demote it waits for this transaction, or has committed and is seen."""
    if dek_id != check.dek_id or _field_ciphertexts(locked) != expected:
        return False
    active = await conn.fetchval(
        "SELECT version FROM kek_versions WHERE state = 'active' FOR SHARE"
    )
    if active is None or int(active) != check.kek_version:
        return False
    # An entry came (or went) since the withdrawal read them: copy again.
    return set(await _locked_entries(conn, key)) == set(check.access_entry_ids)


_INSERT_OUTBOX = (
    "INSERT INTO outbox (message_id, member_id, kind, params, created_at, attempts, "
    "next_attempt_at) VALUES ($1, $2, $3, $4::jsonb, $5, $6, $7)"
)


def _outbox_params(message: OutboxMessage) -> tuple[Any, ...]:
    """The outbox row; a message without a next attempt is due at once."""
    created = require_aware(message.created_at)
    due = created if message.next_attempt_at is None else require_aware(message.next_attempt_at)
    return (
        message.message_id,
        _uuid(message.member_id),
        message.kind,
        outbox_params_json(message),
        created,
        int(message.attempts),
        due,
    )


async def _require_not_destroyed(conn: Any, kek_version: int) -> None:
    """Inside a write: a DEK may not be stored wrapped under a destroyed version.
    FOR SHARE makes a concurrent destroy of it wait for us, then count this DEK."""
    state = await conn.fetchval(
        "SELECT state FROM kek_versions WHERE version = $1 FOR SHARE", kek_version
    )
    if state == "destroyed":
        raise PreconditionFailed("kek_version", f"KEK version {kek_version} has been destroyed")


class _MemberGone(Exception):
    """Raised inside a write transaction to roll it back: the member is gone."""


async def _check_dek(conn: Any, member_id: uuid.UUID, dek_id: int) -> None:
    """Step 2 of the lock order in a member's own write, once its members row is
    locked: KeyChanged if its DEK was rotated since the caller sealed under it,
    _MemberGone if there is no key. The share lock holds the key row until commit."""
    current = await conn.fetchval(
        "SELECT dek_id FROM member_keys WHERE member_id = $1 FOR SHARE", member_id
    )
    if current is None:
        raise _MemberGone
    if int(current) != dek_id:
        raise KeyChanged


class _PostgresDatabase:
    """A connection pool on one database, and its migrations."""

    #: Which migrations (load_migrations schema) and the table that records them.
    _SCHEMA = "vault"
    _MIGRATIONS_TABLE = "schema_migrations"
    #: The table holding wrapped member DEKs (re-wrapped by key management).
    _KEYS_TABLE = "member_keys"

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @classmethod
    async def open(cls, url: str, *, pool_size: int = 10) -> Self:
        if pool_size < 1:
            raise ValueError("pool_size must be at least 1")
        try:
            pool = await asyncpg.create_pool(url, min_size=1, max_size=pool_size)
        except _CONNECTION_ERRORS:
            raise StorageUnavailable() from None
        except ValueError:
            # asyncpg's DSN parsing errors quote parts of the DSN.
            raise ValueError("invalid PostgreSQL database URL") from None
        return cls(pool)

    async def close(self) -> None:
        await self._pool.close()

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:
        """A pooled connection for a single read: no BEGIN/COMMIT round trips."""
        try:
            async with self._pool.acquire() as conn:
                yield conn
        except _CONNECTION_ERRORS:
            raise StorageUnavailable() from None
        except asyncpg.TransactionRollbackError:
            raise Conflict() from None

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Any]:
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                yield conn
        except _CONNECTION_ERRORS:
            raise StorageUnavailable() from None
        except asyncpg.TransactionRollbackError:
            # A deadlock or serialization failure: PostgreSQL rolled it back whole.
            raise Conflict() from None

    async def _check_schema(self, conn: Any) -> None:
        """Refuse a database that holds the other schema (see the retention store)."""

    async def migrate(self) -> list[int]:
        migrations = load_migrations("postgres", self._SCHEMA)
        table = self._MIGRATIONS_TABLE
        for attempt in range(_MIGRATE_ATTEMPTS):
            try:
                async with self._transaction() as conn:
                    await self._check_schema(conn)
                    await conn.execute(_CREATE_SCHEMA_MIGRATIONS.format(table=table))
                    # Two servers starting at once: the second waits here, then
                    # sees what the first applied. A table lock, no advisory lock.
                    await conn.execute(f"LOCK TABLE {table} IN EXCLUSIVE MODE")
                    rows = await conn.fetch(f"SELECT version FROM {table}")
                    applied = {int(r["version"]) for r in rows}
                    done: list[int] = []
                    for migration in migrations:
                        if migration.version in applied:
                            continue
                        await conn.execute(migration.sql)
                        await conn.execute(
                            f"INSERT INTO {table} (version, name) VALUES ($1, $2)",
                            migration.version,
                            migration.name,
                        )
                        done.append(migration.version)
                    return done
            except (asyncpg.UniqueViolationError, asyncpg.DuplicateTableError):
                if attempt == _MIGRATE_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    # --- key re-wrap (the vault's member_keys, the retention store's copies) -----
    async def member_keys_to_rewrap(
        self, target_version: int, after_member_id: str | None, limit: int
    ) -> list[MemberKeyRow]:
        table = self._KEYS_TABLE
        limit = check_limit(limit)
        after = None if after_member_id is None else _uuid(after_member_id)
        async with self._connection() as conn:
            rows = await conn.fetch(
                f"SELECT member_id, dek_id, kek_version, wrapped_dek FROM {table} "
                "WHERE kek_version <> $1 AND ($2::uuid IS NULL OR member_id > $2) "
                "ORDER BY member_id LIMIT $3",
                target_version,
                after,
                limit,
            )
        return [
            MemberKeyRow(
                str(r["member_id"]),
                int(r["dek_id"]),
                int(r["kek_version"]),
                bytes(r["wrapped_dek"]),
            )
            for r in rows
        ]

    async def apply_rewrap(self, updates: Sequence[RewrapUpdate]) -> int:
        table = self._KEYS_TABLE
        if not updates:
            return 0
        # In member_id order, as every batch (and the lock order) takes them: two
        # re-wrap runs at once lock their common rows in the same order.
        ordered = sorted(((_uuid(u.member_id), u) for u in updates), key=lambda p: p[0])
        async with self._transaction() as conn:
            # One statement for the batch: the arrays join the rows to update.
            status = await conn.execute(
                f"UPDATE {table} AS k SET kek_version = u.to_version, wrapped_dek = u.wrapped "
                "FROM unnest($1::uuid[], $2::int[], $3::int[], $4::int[], $5::bytea[]) "
                "AS u(member_id, dek_id, from_version, to_version, wrapped) "
                "WHERE k.member_id = u.member_id AND k.dek_id = u.dek_id "
                "AND k.kek_version = u.from_version",
                [member_id for member_id, _ in ordered],
                [u.dek_id for _, u in ordered],
                [u.from_version for _, u in ordered],
                [u.to_version for _, u in ordered],
                [bytes(u.wrapped_dek) for _, u in ordered],
            )
        return _affected(status)


class PostgresStore(_PostgresDatabase):
    """The vault in a PostgreSQL database. Open with :meth:`open`, then ``migrate()``."""

    async def migrate(self) -> list[int]:
        applied = await super().migrate()
        # Every start makes sure the access log's coming months exist, not only the
        # sidecar's purge (which may run elsewhere, or not yet).
        await self.ensure_access_log_partitions()
        return applied

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
        access_log: Mapping[int, tuple[bytes, bytes]],
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
                    "UPDATE access_log SET action_ct = $3, ip_ct = $4 "
                    "WHERE entry_id = $1 AND at = $2",
                    [
                        (entry_id, present[entry_id], bytes(a), bytes(i))
                        for entry_id, (a, i) in access_log.items()
                    ],
                )
        return True

    async def record_key_event(self, event: KeyEvent) -> None:
        async with self._transaction() as conn:
            await conn.execute(
                "INSERT INTO key_events (at, actor, operation, kek_version, member_id, details) "
                "VALUES ($1, $2, $3, $4, $5, $6::jsonb)",
                require_aware(event.at),
                event.actor,
                event.operation,
                event.kek_version,
                None if event.member_id is None else _uuid(event.member_id),
                json.dumps(dict(event.details), sort_keys=True),
            )

    async def list_key_events(self, limit: int = 100) -> list[KeyEvent]:
        limit = check_limit(limit)
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT at, actor, operation, kek_version, member_id, details::text AS details "
                "FROM key_events ORDER BY event_id DESC LIMIT $1",
                limit,
            )
        return [
            KeyEvent(
                r["at"],
                r["actor"],
                r["operation"],
                r["kek_version"],
                None if r["member_id"] is None else str(r["member_id"]),
                json.loads(r["details"]),
            )
            for r in rows
        ]

    # --- members ---------------------------------------------------------------
    async def insert_member(self, member: MemberRow) -> None:
        member_id = uuid.UUID(check_new_member(member))
        consents = member.consents
        columns = [
            "member_id",
            "created_at",
            "last_seen_at",
            *HMAC_COLUMNS.values(),
            *CT_COLUMNS.values(),
        ]
        placeholders = ", ".join(f"${i}" for i in range(1, len(columns) + 1))
        values = [
            member_id,
            member.created_at,
            member.last_seen_at,
            *(bytes(member.blind_indexes[f]) for f in HMAC_COLUMNS),
            *(bytes(member.ciphertexts[f]) for f in CT_COLUMNS),
        ]
        key = member.key
        try:
            async with self._transaction() as conn:
                await _require_not_destroyed(conn, key.kek_version)
                await conn.execute(
                    f"INSERT INTO members ({', '.join(columns)}) VALUES ({placeholders})", *values
                )
                await conn.execute(
                    "INSERT INTO member_keys (member_id, dek_id, kek_version, wrapped_dek) "
                    "VALUES ($1, $2, $3, $4)",
                    member_id,
                    key.dek_id,
                    key.kek_version,
                    bytes(key.wrapped_dek),
                )
                if consents:
                    await conn.executemany(
                        "INSERT INTO consents (member_id, purpose, granted, policy_version, "
                        "recorded_at) VALUES ($1, $2, $3, $4, $5)",
                        [
                            (member_id, c.purpose, c.granted, c.policy_version, c.recorded_at)
                            for c in consents
                        ],
                    )
        except asyncpg.UniqueViolationError as exc:
            raise _unique_error(exc) from None
        except asyncpg.ForeignKeyViolationError:
            # The only foreign key a caller can miss here is the KEK version.
            raise ValueError("the member key's KEK version does not exist") from None

    async def get_member(self, member_id: str) -> MemberRow | None:
        async with self._connection() as conn:
            row = await conn.fetchrow(f"{_SELECT_MEMBER} WHERE m.member_id = $1", _uuid(member_id))
        return None if row is None else _member(row)

    async def find_member(self, index: IndexedField, hmac: bytes) -> MemberRow | None:
        column = hmac_column(index)
        async with self._connection() as conn:
            row = await conn.fetchrow(f"{_SELECT_MEMBER} WHERE m.{column} = $1", bytes(hmac))
        return None if row is None else _member(row)

    async def update_member(
        self,
        member_id: str,
        ciphertexts: Mapping[str, bytes],
        blind_indexes: Mapping[str, bytes] | None = None,
        *,
        dek_id: int,
        notify: OutboxMessage | None = None,
    ) -> bool:
        key = _uuid(member_id)
        assignments = update_assignments(ciphertexts, blind_indexes)
        outbox_row = None if notify is None else _outbox_params(notify)
        if outbox_row is not None and outbox_row[1] != key:
            raise ValueError("the message is for another member")
        try:
            async with self._transaction() as conn:
                # The lock order: the members row first (by the update itself), then
                # the key row; a rotated key rolls the update back.
                if assignments:
                    setters = ", ".join(
                        f"{column} = ${i}" for i, (column, _) in enumerate(assignments, start=2)
                    )
                    status = await conn.execute(
                        f"UPDATE members SET {setters} WHERE member_id = $1",
                        key,
                        *(value for _, value in assignments),
                    )
                    if _affected(status) != 1:
                        return False
                elif not await conn.fetchval(
                    "SELECT 1 FROM members WHERE member_id = $1 FOR NO KEY UPDATE", key
                ):
                    return False
                await _check_dek(conn, key, dek_id)
                if outbox_row is not None:
                    await conn.execute(_INSERT_OUTBOX, *outbox_row)
        except asyncpg.UniqueViolationError as exc:
            raise _unique_error(exc) from None
        except _MemberGone:
            return False
        return True

    async def record_login(
        self,
        member_id: str,
        entry: NewAccessEntry,
        password_hash_ct: bytes | None = None,
        *,
        dek_id: int,
    ) -> bool:
        key = _uuid(member_id)
        at = require_aware(entry.at)
        try:
            async with self._transaction() as conn:
                # The lock order: the members row first (by the update), then the key
                # row; a rotated key rolls the update back.
                if password_hash_ct is None:
                    status = await conn.execute(
                        # A connection cancels a pending inactivity notice (the clock
                        # restarts).
                        "UPDATE members SET last_seen_at = $2, inactivity_notice_at = NULL "
                        "WHERE member_id = $1",
                        key,
                        at,
                    )
                else:
                    status = await conn.execute(
                        "UPDATE members SET last_seen_at = $2, inactivity_notice_at = NULL, "
                        "password_hash_ct = $3 WHERE member_id = $1",
                        key,
                        at,
                        bytes(password_hash_ct),
                    )
                if _affected(status) != 1:
                    return False
                await _check_dek(conn, key, dek_id)
                await conn.execute(
                    "INSERT INTO access_log (member_id, at, action_ct, ip_ct) "
                    "VALUES ($1, $2, $3, $4)",
                    key,
                    at,
                    bytes(entry.action_ct),
                    bytes(entry.ip_ct),
                )
        except _MemberGone:
            return False
        return True

    async def list_consents(self, member_id: str) -> list[ConsentRow]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT purpose, granted, policy_version, recorded_at FROM consents "
                "WHERE member_id = $1 ORDER BY purpose",
                _uuid(member_id),
            )
        return [
            ConsentRow(
                purpose=str(r["purpose"]),
                granted=bool(r["granted"]),
                policy_version=str(r["policy_version"]),
                recorded_at=r["recorded_at"],
            )
            for r in rows
        ]

    # --- access log ------------------------------------------------------------
    async def append_access(self, member_id: str, entry: NewAccessEntry, *, dek_id: int) -> bool:
        key = _uuid(member_id)
        at = require_aware(entry.at)
        try:
            async with self._transaction() as conn:
                # The lock order: the insert's foreign key check locks the members row
                # (FOR KEY SHARE) first, then the key row is checked; a rotated key (or
                # none) rolls the insert back.
                await conn.execute(
                    "INSERT INTO access_log (member_id, at, action_ct, ip_ct) "
                    "VALUES ($1, $2, $3, $4)",
                    key,
                    at,
                    bytes(entry.action_ct),
                    bytes(entry.ip_ct),
                )
                await _check_dek(conn, key, dek_id)
        except (asyncpg.ForeignKeyViolationError, _MemberGone):
            return False  # no such member
        return True

    async def list_access(
        self,
        member_id: str,
        limit: int,
        before: tuple[datetime, int] | None = None,
    ) -> list[AccessEntryRow]:
        key = _uuid(member_id)
        limit = check_limit(limit)
        async with self._connection() as conn:
            if before is None:
                rows = await conn.fetch(
                    "SELECT entry_id, at, action_ct, ip_ct FROM access_log WHERE member_id = $1 "
                    "ORDER BY at DESC, entry_id DESC LIMIT $2",
                    key,
                    limit,
                )
            else:
                rows = await conn.fetch(
                    "SELECT entry_id, at, action_ct, ip_ct FROM access_log "
                    "WHERE member_id = $1 AND (at, entry_id) < ($2, $3) "
                    "ORDER BY at DESC, entry_id DESC LIMIT $4",
                    key,
                    require_aware(before[0]),
                    int(before[1]),
                    limit,
                )
        return [
            AccessEntryRow(
                entry_id=int(r["entry_id"]),
                at=r["at"],
                action_ct=bytes(r["action_ct"]),
                ip_ct=bytes(r["ip_ct"]),
            )
            for r in rows
        ]

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

    async def is_destroyed(self, member_id: str) -> bool:
        async with self._connection() as conn:
            found = await conn.fetchval(
                "SELECT 1 FROM tombstones WHERE member_id = $1", _uuid(member_id)
            )
        return found is not None

    async def list_destruction_records(
        self, member_id: str | None = None
    ) -> list[DestructionRecord]:
        select = (
            "SELECT member_id, destroyed_at, reason, items::text AS items, "
            "kek_versions::text AS kek_versions, retained_until FROM destruction_records"
        )
        order = "ORDER BY destroyed_at, record_id"
        async with self._connection() as conn:
            if member_id is None:
                rows = await conn.fetch(f"{select} {order}")
            else:
                rows = await conn.fetch(f"{select} WHERE member_id = $1 {order}", _uuid(member_id))
        return [_destruction_record(r) for r in rows]

    # --- lifecycle (the sidecar) -------------------------------------------------
    async def acquire_lease(self, name: str, holder: str, now: datetime, ttl: timedelta) -> bool:
        async with self._transaction() as conn:
            # One upsert: of two racing callers the second waits on the row, then
            # re-checks the WHERE against the winner's version and updates nothing.
            status = await conn.execute(
                "INSERT INTO leases (name, holder, expires_at) VALUES ($1, $2, $3) "
                "ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, "
                "expires_at = excluded.expires_at "
                "WHERE leases.holder = excluded.holder OR leases.expires_at <= $4",
                name,
                holder,
                require_aware(now) + ttl,
                now,
            )
        return _affected(status) == 1

    async def release_lease(self, name: str, holder: str) -> None:
        async with self._transaction() as conn:
            await conn.execute("DELETE FROM leases WHERE name = $1 AND holder = $2", name, holder)

    async def members_due_for_notice(
        self, last_seen_before: datetime, limit: int
    ) -> list[tuple[str, datetime]]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT member_id, last_seen_at FROM members "
                "WHERE inactivity_notice_at IS NULL AND last_seen_at < $1 "
                "ORDER BY last_seen_at LIMIT $2",
                require_aware(last_seen_before),
                check_limit(limit),
            )
        return [(str(r["member_id"]), r["last_seen_at"]) for r in rows]

    async def record_inactivity_notice(
        self, member_id: str, last_seen_at: datetime, message: OutboxMessage
    ) -> bool:
        key = _uuid(member_id)
        if _uuid(message.member_id) != key:
            raise ValueError("the message is for another member")
        async with self._transaction() as conn:
            status = await conn.execute(
                "UPDATE members SET inactivity_notice_at = $3 WHERE member_id = $1 "
                "AND last_seen_at = $2 AND inactivity_notice_at IS NULL",
                key,
                require_aware(last_seen_at),
                require_aware(message.created_at),
            )
            if _affected(status) != 1:
                return False
            await conn.execute(_INSERT_OUTBOX, *_outbox_params(message))
        return True

    async def members_due_for_expiry(
        self, last_seen_before: datetime, noticed_before: datetime, limit: int
    ) -> list[str]:
        async with self._transaction() as conn:
            # The planner takes the two time conditions as independent, guesses ~50x
            # too few due rows and picks a bitmap scan that reads and sorts every due
            # member for each batch (bench/sweep.py). The partial index walked in
            # last_seen_at order stops after ``limit`` rows.
            await conn.execute("SET LOCAL enable_bitmapscan = off")
            rows = await conn.fetch(
                "SELECT member_id FROM members WHERE inactivity_notice_at IS NOT NULL "
                "AND last_seen_at < $1 AND inactivity_notice_at < $2 "
                "ORDER BY last_seen_at LIMIT $3",
                require_aware(last_seen_before),
                require_aware(noticed_before),
                check_limit(limit),
            )
        return [str(r["member_id"]) for r in rows]

    # --- access-log partitions (monthly, UTC) ------------------------------------
    # Partition names carry their month, so bounds come from the name, and a name
    # that passes this pattern is safe to splice into DDL (identifiers and partition
    # bounds cannot be bind parameters).
    _PARTITION_NAME = re.compile(r"^access_log_y(\d{4})m(\d{2})$")
    # Months created ahead of the current one.
    _PARTITIONS_AHEAD = 2
    # Partition DDL waits this long for its lock, then gives up until the next call:
    # a queued ACCESS EXCLUSIVE request would hold up every login behind it.
    _PARTITION_LOCK_TIMEOUT = "500ms"

    @classmethod
    def _partition_month(cls, name: str) -> datetime | None:
        match = cls._PARTITION_NAME.match(name)
        if match is None or not 1 <= int(match.group(2)) <= 12:
            return None
        return datetime(int(match.group(1)), int(match.group(2)), 1, tzinfo=UTC)

    @staticmethod
    def _add_months(month: datetime, months: int) -> datetime:
        index = month.year * 12 + month.month - 1 + months
        return datetime(index // 12, index % 12 + 1, 1, tzinfo=UTC)

    @staticmethod
    def _partition_bound(at: datetime) -> str:
        # An explicit +00 offset: never read in the session's time zone.
        return f"'{at.astimezone(UTC):%Y-%m-%d %H:%M:%S}+00'"

    @classmethod
    async def _access_log_partitions(cls, conn: Any) -> tuple[list[str], list[str]]:
        """(monthly partitions of access_log, detached month tables left by a purge
        that stopped between its detach and its drop), names from the catalog."""
        rows = await conn.fetch(
            "SELECT c.relname, EXISTS (SELECT 1 FROM pg_inherits AS i "
            "WHERE i.inhrelid = c.oid AND i.inhparent = 'access_log'::regclass) AS attached, "
            "c.relispartition FROM pg_class AS c "
            "WHERE c.relkind = 'r' AND c.relname LIKE 'access_log\\_y%' "
            "AND c.relnamespace = (SELECT relnamespace FROM pg_class "
            "WHERE oid = 'access_log'::regclass)"
        )
        attached: list[str] = []
        detached: list[str] = []
        for r in rows:
            name = str(r["relname"])
            if cls._partition_month(name) is None:
                continue
            if r["attached"]:
                attached.append(name)
            elif not r["relispartition"]:
                detached.append(name)
        return sorted(attached), sorted(detached)

    async def ensure_access_log_partitions(self, now: datetime | None = None) -> list[str]:
        """Create the access-log partitions of ``now``'s month (UTC; default: the
        database's clock) and the next two when missing; returns the names created.
        One catalog read when there is nothing to do. A month left without its
        partition is not an error: its rows wait in the default partition and move
        into the partition when it is created. A lock not granted in time skips the
        month until the next call."""
        async with self._connection() as conn:
            if now is None:
                now = await conn.fetchval("SELECT now()")
            attached, _ = await self._access_log_partitions(conn)
        utc = require_aware(now).astimezone(UTC)
        first = datetime(utc.year, utc.month, 1, tzinfo=UTC)
        created: list[str] = []
        for ahead in range(self._PARTITIONS_AHEAD + 1):
            month = self._add_months(first, ahead)
            name = f"access_log_y{month.year:04d}m{month.month:02d}"
            if name in attached:
                continue
            try:
                if await self._create_access_log_partition(name, month):
                    created.append(name)
            except asyncpg.LockNotAvailableError:
                continue
        return created

    async def _create_access_log_partition(self, name: str, month: datetime) -> bool:
        end = self._add_months(month, 1)
        bounds = f"FROM ({self._partition_bound(month)}) TO ({self._partition_bound(end)})"
        async with self._transaction() as conn:
            await conn.execute(f"SET LOCAL lock_timeout = '{self._PARTITION_LOCK_TIMEOUT}'")
            # The parent (and with it every partition) first, in the strongest mode
            # the DDL below needs: no lock upgrade, so no deadlock with a writer, and
            # no insert can reach the default partition while its rows move.
            await conn.execute("LOCK TABLE access_log IN ACCESS EXCLUSIVE MODE")
            attached, _ = await self._access_log_partitions(conn)
            if name in attached:
                return False  # another process created it meanwhile
            stranded = await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM access_log_default WHERE at >= $1 AND at < $2)",
                month,
                end,
            )
            if not stranded:
                await conn.execute(
                    f'CREATE TABLE "{name}" PARTITION OF access_log FOR VALUES {bounds}'
                )
                return True
            # The default partition holds rows of this month (the partition came
            # late), which would make CREATE ... PARTITION OF fail its check. Move
            # them into a plain table of the same shape, then attach it: ATTACH
            # builds its indexes and foreign key, and finds the default clean.
            await conn.execute(f'CREATE TABLE "{name}" (LIKE access_log)')
            await conn.execute(
                "WITH moved AS (DELETE FROM access_log_default WHERE at >= $1 AND at < $2 "
                "RETURNING entry_id, member_id, at, action_ct, ip_ct) "
                f'INSERT INTO "{name}" (entry_id, member_id, at, action_ct, ip_ct) '
                "SELECT entry_id, member_id, at, action_ct, ip_ct FROM moved",
                month,
                end,
            )
            await conn.execute(
                f'ALTER TABLE access_log ATTACH PARTITION "{name}" FOR VALUES {bounds}'
            )
        return True

    async def _drop_access_log_partitions(self, before: datetime) -> int:
        """Drop every monthly partition wholly older than ``before``; returns how
        many entries they held. Detach (a brief lock on the parent) and drop (the
        detached table alone, after counting it) are two transactions: the count
        never holds up logins. A month whose lock is not granted in time stays; the
        batch delete removes its rows instead."""
        async with self._connection() as conn:
            attached, detached = await self._access_log_partitions(conn)
        for name in attached:
            month = self._partition_month(name)
            if month is None or self._add_months(month, 1) > before:
                continue
            try:
                async with self._transaction() as conn:
                    await conn.execute(f"SET LOCAL lock_timeout = '{self._PARTITION_LOCK_TIMEOUT}'")
                    # Parent first, as every writer does; then recheck under it.
                    await conn.execute("LOCK TABLE ONLY access_log IN ACCESS EXCLUSIVE MODE")
                    still, _ = await self._access_log_partitions(conn)
                    if name not in still:
                        continue  # another purge took it
                    await conn.execute(f'ALTER TABLE access_log DETACH PARTITION "{name}"')
            except asyncpg.LockNotAvailableError:
                continue
            detached.append(name)
        dropped = 0
        # Also the tables a crashed purge detached but never dropped: detached only
        # to be purged, they are dropped whatever ``before`` says now.
        for name in detached:
            try:
                # Counted first, outside the drop: the count takes no lock that a
                # login needs, while DROP locks members (the detached table still
                # carries its foreign key), so that transaction must be short and
                # must give up rather than queue ahead of every read of members.
                async with self._connection() as conn:
                    count = await conn.fetchval(f'SELECT count(*) FROM "{name}"')
                async with self._transaction() as conn:
                    await conn.execute(f"SET LOCAL lock_timeout = '{self._PARTITION_LOCK_TIMEOUT}'")
                    await conn.execute(f'DROP TABLE "{name}"')
            except asyncpg.UndefinedTableError:
                continue  # another purge dropped it
            except asyncpg.LockNotAvailableError:
                continue  # busy: the next call drops it (its rows are out of the log already)
            dropped += int(count)
        return dropped

    async def purge_access_log(self, before: datetime, limit: int) -> int:
        """Drop the monthly partitions wholly older than ``before``, then delete up
        to ``limit`` older entries left in the boundary month and the default
        partition. Returns both together: it reaches ``limit`` whenever the batch
        did, so a caller looping until a short return still finishes the batches,
        and at most one extra call follows a drop (nothing is left to drop)."""
        before = require_aware(before)
        limit = check_limit(limit)
        # Keep months ahead of the inserts; one catalog read when nothing is due.
        await self.ensure_access_log_partitions()
        dropped = await self._drop_access_log_partitions(before)
        async with self._transaction() as conn:
            # SKIP LOCKED: rows a concurrent shred holds are left for the next batch.
            # "at < $1" outside too: the planner skips the newer partitions.
            status = await conn.execute(
                "DELETE FROM access_log WHERE at < $1 AND (entry_id, at) IN ("
                "SELECT entry_id, at FROM access_log "
                "WHERE at < $1 ORDER BY at LIMIT $2 FOR UPDATE SKIP LOCKED)",
                before,
                limit,
            )
        return dropped + _affected(status)

    async def count_access_log_before(self, before: datetime) -> int:
        async with self._connection() as conn:
            count = await conn.fetchval(
                "SELECT count(*) FROM access_log WHERE at < $1", require_aware(before)
            )
        return int(count)

    # --- account recovery --------------------------------------------------------
    async def create_password_reset(
        self, token_hash: bytes, member_id: str, expires_at: datetime, message: OutboxMessage
    ) -> bool:
        if _uuid(member_id) != _uuid(message.member_id):
            raise ValueError("the message is for another member")
        reset = NewPasswordReset(token_hash, expires_at)
        return await self._recovery_mail(message, reset, None) == "queued"

    async def consume_password_reset(self, token_hash: bytes, now: datetime) -> str | None:
        token_hash = check_token_hash(token_hash)
        async with self._transaction() as conn:
            # One conditional UPDATE: a concurrent consumer waits on the row lock,
            # then re-checks used_at and finds it set.
            member_id = await conn.fetchval(
                "UPDATE password_resets SET used_at = $2 WHERE token_hash = $1 "
                "AND used_at IS NULL AND expires_at > $2 RETURNING member_id",
                token_hash,
                require_aware(now),
            )
        return None if member_id is None else str(member_id)

    async def enqueue_outbox(self, message: OutboxMessage) -> bool:
        row = _outbox_params(message)
        try:
            async with self._transaction() as conn:
                # FOR SHARE holds the member against a concurrent shred until commit.
                found = await conn.fetchval(
                    "SELECT 1 FROM members WHERE member_id = $1 FOR SHARE", row[1]
                )
                if found is None:
                    # As costly as the insert: a transaction id makes the commit
                    # write and flush a commit record, as a real insert would (a
                    # caller probing for accounts must not see the difference).
                    await conn.execute("SELECT pg_current_xact_id()")
                    return False
                await conn.execute(f"{_INSERT_OUTBOX} ON CONFLICT (message_id) DO NOTHING", *row)
        except asyncpg.ForeignKeyViolationError:
            return False
        return True

    async def due_outbox(self, now: datetime, limit: int) -> list[OutboxMessage]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT message_id, member_id, kind, params::text AS params, created_at, "
                "attempts, next_attempt_at FROM outbox WHERE next_attempt_at <= $1 "
                "ORDER BY next_attempt_at, created_at, message_id LIMIT $2",
                require_aware(now),
                check_limit(limit),
            )
        return [
            OutboxMessage(
                message_id=str(r["message_id"]),
                member_id=str(r["member_id"]),
                kind=str(r["kind"]),
                params={str(k): str(v) for k, v in json.loads(r["params"]).items()},
                created_at=r["created_at"],
                attempts=int(r["attempts"]),
                next_attempt_at=r["next_attempt_at"],
            )
            for r in rows
        ]

    async def outbox_sent(self, message_id: str) -> None:
        async with self._transaction() as conn:
            await conn.execute("DELETE FROM outbox WHERE message_id = $1", message_id)

    async def outbox_retry(self, message_id: str, attempts: int, next_attempt_at: datetime) -> None:
        async with self._transaction() as conn:
            await conn.execute(
                "UPDATE outbox SET attempts = $2, next_attempt_at = $3 WHERE message_id = $1",
                message_id,
                attempts,
                require_aware(next_attempt_at),
            )

    async def queue_recovery_mail(
        self,
        message: OutboxMessage,
        *,
        limit: int,
        since: datetime,
        reset: NewPasswordReset | None = None,
    ) -> RecoveryMailOutcome:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        return await self._recovery_mail(message, reset, (limit, require_aware(since)))

    async def _recovery_mail(
        self,
        message: OutboxMessage,
        reset: NewPasswordReset | None,
        quota: tuple[int, datetime] | None,
    ) -> RecoveryMailOutcome:
        """One transaction: the member check, the quota (limit, since) when given,
        the reset row when given, the mail."""
        # One statement counts and records: ON CONFLICT DO UPDATE locks the
        # member's quota row and evaluates its WHERE on the newest version, so
        # concurrent calls (on any replica) queue no more than the limit.
        take = (
            "INSERT INTO recovery_mail_quota AS q (member_id, sent_at) "
            "VALUES ($1, ARRAY[$2::timestamptz]) "
            "ON CONFLICT (member_id) DO UPDATE "
            "SET sent_at = ARRAY(SELECT t FROM unnest(q.sent_at) AS t WHERE t > $3 ORDER BY t) "
            "|| $2::timestamptz "
            "WHERE (SELECT count(*) FROM unnest(q.sent_at) AS t WHERE t > $3) < $4 "
            "RETURNING true"
        )
        row = _outbox_params(message)
        key, at = row[1], row[4]
        token_hash = None if reset is None else check_token_hash(reset.token_hash)
        try:
            async with self._transaction() as conn:
                # FOR SHARE holds the member against a concurrent shred until commit.
                found = await conn.fetchval(
                    "SELECT 1 FROM members WHERE member_id = $1 FOR SHARE", key
                )
                if found is None:
                    # As costly as the insert: a transaction id makes the commit
                    # write and flush a commit record, as a real insert would (a
                    # caller probing for accounts must not see the difference).
                    await conn.execute("SELECT pg_current_xact_id()")
                    return "no_member"
                if quota is not None and not await conn.fetchval(take, key, at, quota[1], quota[0]):
                    return "limited"
                if reset is not None:
                    await conn.execute(
                        "INSERT INTO password_resets (token_hash, member_id, expires_at) "
                        "VALUES ($1, $2, $3)",
                        token_hash,
                        key,
                        require_aware(reset.expires_at),
                    )
                await conn.execute(_INSERT_OUTBOX, *row)
        except asyncpg.ForeignKeyViolationError:
            return "no_member"
        return "queued"

    async def find_password_reset(self, token_hash: bytes, now: datetime) -> str | None:
        token_hash = check_token_hash(token_hash)
        async with self._connection() as conn:
            member_id = await conn.fetchval(
                "SELECT member_id FROM password_resets WHERE token_hash = $1 "
                "AND used_at IS NULL AND expires_at > $2",
                token_hash,
                require_aware(now),
            )
        return None if member_id is None else str(member_id)


_RETAINED_CT_SELECT = ", ".join(RETAINED_COLUMNS[f] for f in RETAINED_FIELDS)


class PostgresRetentionStore(_PostgresDatabase):
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
                        (key, e.entry_id, e.at, bytes(e.action_ct), bytes(e.ip_ct))
                        for e in member.access_log
                    ],
                    columns=["member_id", "entry_id", "at", "action_ct", "ip_ct"],
                )
        return True

    async def confirm_retained(self, member_id: str) -> bool:
        async with self._transaction() as conn:
            status = await conn.execute(
                "UPDATE retained_members SET confirmed = true WHERE member_id = $1",
                _uuid(member_id),
            )
        return _affected(status) > 0

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
                "SELECT entry_id, at, action_ct, ip_ct FROM retained_access_log "
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
                    int(e["entry_id"]), e["at"], bytes(e["action_ct"]), bytes(e["ip_ct"])
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

    async def retained_due(self, now: datetime, limit: int) -> list[str]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT member_id FROM retained_members WHERE confirmed "
                "AND destroy_after <= $1 ORDER BY destroy_after LIMIT $2",
                require_aware(now),
                check_limit(limit),
            )
        return [str(r["member_id"]) for r in rows]

    async def unconfirmed_before(self, before: datetime, limit: int) -> list[str]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT member_id FROM retained_members WHERE NOT confirmed "
                "AND retained_at < $1 ORDER BY retained_at LIMIT $2",
                require_aware(before),
                check_limit(limit),
            )
        return [str(r["member_id"]) for r in rows]

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

    async def count_access_log_before(self, before: datetime) -> int:
        async with self._connection() as conn:
            count = await conn.fetchval(
                "SELECT count(*) FROM retained_access_log WHERE at < $1", require_aware(before)
            )
        return int(count)

    async def kek_usage(self) -> list[KekUsage]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT kek_version, count(*) AS n FROM retained_members "
                "GROUP BY kek_version ORDER BY kek_version"
            )
        return [KekUsage(int(r["kek_version"]), 0, 0, retained_keys=int(r["n"])) for r in rows]

    async def record_event(self, event: RetentionEvent) -> None:
        async with self._transaction() as conn:
            await conn.execute(
                "INSERT INTO retention_events (at, actor, operation, member_id, basis) "
                "VALUES ($1, $2, $3, $4, $5)",
                require_aware(event.at),
                event.actor,
                event.operation,
                _uuid(event.member_id),
                event.basis,
            )

    async def list_events(self, member_id: str | None = None) -> list[RetentionEvent]:
        key = None if member_id is None else _uuid(member_id)
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT at, actor, operation, member_id, basis FROM retention_events "
                "WHERE $1::uuid IS NULL OR member_id = $1 ORDER BY event_id",
                key,
            )
        return [
            RetentionEvent(
                r["at"], str(r["actor"]), str(r["operation"]), str(r["member_id"]), str(r["basis"])
            )
            for r in rows
        ]
