"""PostgreSQL: the connection layer (the pool, transactions, migrations)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Self, TypeVar

import asyncpg

from vault.errors import (
    Conflict,
    StorageUnavailable,
)
from vault.store._common import (
    canonical_member_id,
)
from vault.store._migrations import load_migrations
from vault.store.rows import RewrapUpdate
from vault.store.sql.dialect import POSTGRES
from vault.store.sql.executor import Body, ForeignKeyViolation, SqlExecutor, Tx, UniqueViolation

_T = TypeVar("_T")

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
    """Row count from a command status such as ``DELETE 3`` or ``INSERT 0 1``
    (0 for one without a count, such as ``LOCK TABLE``)."""
    count = status.rsplit(" ", 1)[-1]
    return int(count) if count.isdigit() else 0


class _PgTx:
    """The shared transaction bodies' :class:`Tx` on an asyncpg connection."""

    __slots__ = ("_conn",)

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    async def fetch(self, sql: str, *args: Any) -> list[Sequence[Any]]:
        return list(await self._conn.fetch(sql, *args))

    async def fetchrow(self, sql: str, *args: Any) -> Sequence[Any] | None:
        row: Sequence[Any] | None = await self._conn.fetchrow(sql, *args)
        return row

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await self._conn.fetchval(sql, *args)

    async def run(self, sql: str, *args: Any) -> int:
        return _affected(await self._conn.execute(sql, *args))

    async def run_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            await self._conn.executemany(sql, rows)

    async def copy(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            await self._conn.copy_records_to_table(table, records=rows, columns=list(columns))

    async def decoy_write(self) -> None:
        # A transaction id makes the commit write and flush a commit record.
        await self._conn.execute("SELECT pg_current_xact_id()")


class _PostgresDatabase(SqlExecutor):
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

    _dialect = POSTGRES

    async def _fetch(self, sql: str, *args: Any) -> list[Sequence[Any]]:
        async with self._connection() as conn:
            return list(await conn.fetch(sql, *args))

    async def _run(self, sql: str, *args: Any) -> int:
        async with self._transaction() as conn:
            return _affected(await conn.execute(sql, *args))

    async def _run_returning(self, sql: str, *args: Any) -> list[Sequence[Any]]:
        async with self._transaction() as conn:
            return list(await conn.fetch(sql, *args))

    async def _in_transaction(self, body: Body[_T], *, scrub: bool = False) -> _T:
        try:
            async with self._transaction() as conn:
                return await body(_PgTx(conn))
        except asyncpg.UniqueViolationError as exc:
            raise UniqueViolation(_UNIQUE_FIELDS.get(exc.constraint_name or "")) from None
        except asyncpg.ForeignKeyViolationError:
            raise ForeignKeyViolation() from None

    async def _serialise(self, tx: Tx, table: str) -> None:
        # Self-conflicting: check-then-write transactions take turns; plain readers
        # are not blocked.
        await tx.run(f"LOCK TABLE {table} IN SHARE ROW EXCLUSIVE MODE")

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
    # member_keys_to_rewrap is shared (vault.store.sql.keys); the batch update here.
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
