"""SQLite: the connection layer (writer thread, inline query-only reader, migrations)."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, Self, TypeVar

from vault.clock import from_micros, to_micros
from vault.errors import StorageUnavailable
from vault.store._common import (
    canonical_member_id,
    check_limit,
    require_aware,
)
from vault.store._migrations import load_migrations
from vault.store.rows import RewrapUpdate
from vault.store.sql.dialect import SQLITE
from vault.store.sql.executor import (
    Body,
    ForeignKeyViolation,
    SqlExecutor,
    UniqueViolation,
    run_now,
)

_T = TypeVar("_T")


# Applied on every open; the values are the privacy and durability promises.
_PRAGMAS: Mapping[str, str] = {
    "busy_timeout": "5000",
    "journal_mode": "WAL",
    "synchronous": "FULL",
    "foreign_keys": "ON",
    "secure_delete": "ON",
}

# What PRAGMA reads back once _PRAGMAS took effect (synchronous FULL is 2).
_EXPECTED_PRAGMAS: Mapping[str, int | str] = {
    "busy_timeout": 5000,
    "journal_mode": "wal",
    "synchronous": 2,
    "foreign_keys": 1,
    "secure_delete": 1,
}

# SQLite names a failed unique constraint by "table.column"; which field that is.
_UNIQUE_FIELDS: Mapping[str, str] = {
    "members.login_hmac": "login_id",
    "members.email_hmac": "email",
    "members.member_id": "member_id",
    "member_keys.member_id": "member_id",
}
# Error codes that mean "the database cannot be used right now".
_UNAVAILABLE_CODES = ("SQLITE_CANTOPEN", "SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_IOERR")


def _to_us(value: datetime) -> int:
    return to_micros(require_aware(value))


def _from_us(value: int) -> datetime:
    return from_micros(value)


def _is_unavailable(exc: sqlite3.Error) -> bool:
    name = getattr(exc, "sqlite_errorname", "") or ""
    if name.startswith(_UNAVAILABLE_CODES):
        return True
    # Without an error code (old builds), fall back to the stable message stems.
    text = str(exc)
    return not name and ("unable to open" in text or "locked" in text)


def _split_statements(script: str) -> list[str]:
    """Split a migration into statements; executescript() would commit mid-migration."""
    statements: list[str] = []
    buffer = ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            statements.append(buffer.strip())
            buffer = ""
    if buffer.strip() and not all(
        not ln.strip() or ln.strip().startswith("--") for ln in buffer.splitlines()
    ):
        raise ValueError("a migration ends with an incomplete statement")
    return statements


class _SqliteTx:
    """The shared transaction bodies' :class:`Tx` on the writer thread's connection:
    each await completes at once, so :func:`run_now` runs a body there."""

    __slots__ = ("_conn",)

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    async def fetch(self, sql: str, *args: Any) -> list[Sequence[Any]]:
        return self._conn.execute(sql, args).fetchall()

    async def fetchrow(self, sql: str, *args: Any) -> Sequence[Any] | None:
        row: Sequence[Any] | None = self._conn.execute(sql, args).fetchone()
        return row

    async def fetchval(self, sql: str, *args: Any) -> Any:
        row = self._conn.execute(sql, args).fetchone()
        return None if row is None else row[0]

    async def run(self, sql: str, *args: Any) -> int:
        return self._conn.execute(sql, args).rowcount

    async def run_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self._conn.executemany(sql, rows)

    async def copy(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        marks = ", ".join("?" * len(columns))
        self._conn.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", rows)

    async def decoy_write(self) -> None:
        # Dirty a page without changing anything, so the commit writes and syncs
        # the WAL as a real insert's would.
        (version,) = self._conn.execute("PRAGMA user_version").fetchone()
        self._conn.execute(f"PRAGMA user_version = {int(version)}")


def _constraint_error(exc: sqlite3.IntegrityError) -> Exception:
    """The shared bodies' constraint error; the SQLite text is never echoed."""
    name = getattr(exc, "sqlite_errorname", "")
    if name in ("SQLITE_CONSTRAINT_UNIQUE", "SQLITE_CONSTRAINT_PRIMARYKEY"):
        _, _, columns = str(exc).partition("failed: ")
        return UniqueViolation(_UNIQUE_FIELDS.get(columns.split(",")[0].strip()))
    if name == "SQLITE_CONSTRAINT_FOREIGNKEY":
        return ForeignKeyViolation()
    return exc


def _transaction(conn: sqlite3.Connection, work: Callable[[sqlite3.Connection], _T]) -> _T:
    # IMMEDIATE takes the write lock up front, so a transaction never fails
    # half-way on a lock upgrade.
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = work(conn)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return result


def _connect(path: str) -> sqlite3.Connection:
    parent = os.path.dirname(path)
    if parent and not os.path.isdir(parent):
        os.makedirs(parent, mode=0o700, exist_ok=True)
    # Create the file 0600 before SQLite does (SQLite would use 0644), so it is
    # never world-readable; -wal and -shm inherit its mode.
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.close(fd)
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    try:
        conn.row_factory = sqlite3.Row
        for name, value in _PRAGMAS.items():
            conn.execute(f"PRAGMA {name} = {value}")
        _check_pragmas(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def _connect_reader(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.row_factory = sqlite3.Row
        # Bounded: a read that must wait (rare in WAL mode) blocks the loop briefly.
        conn.execute("PRAGMA busy_timeout = 1000")
        conn.execute("PRAGMA query_only = ON")
    except BaseException:
        conn.close()
        raise
    return conn


def _check_pragmas(conn: sqlite3.Connection) -> None:
    if _read_pragmas(conn) != _EXPECTED_PRAGMAS:
        # Refuse to run without secure_delete and WAL rather than break the
        # shredding promise silently.
        raise StorageUnavailable("the SQLite database does not accept the required settings")


def _read_pragmas(conn: sqlite3.Connection) -> dict[str, int | str]:
    values: dict[str, int | str] = {}
    for name in _PRAGMAS:
        value = conn.execute(f"PRAGMA {name}").fetchone()[0]
        values[name] = value if isinstance(value, str) else int(value)
    return values


class _SqliteDatabase(SqlExecutor):
    """One SQLite file: the writer thread, the inline reader, and migrations."""

    #: Which migrations (load_migrations schema) and the table that records them.
    _SCHEMA = "vault"
    _MIGRATIONS_TABLE = "schema_migrations"
    #: The table holding wrapped member DEKs (re-wrapped by key management).
    _KEYS_TABLE = "member_keys"
    #: The access log's table (its rows: at, action_ct, ip_ct).
    _ACCESS_TABLE = "access_log"

    def __init__(
        self, conn: sqlite3.Connection, reader: sqlite3.Connection, executor: ThreadPoolExecutor
    ) -> None:
        self._conn = conn
        self._reader = reader
        self._executor = executor
        self._closed = False

    @classmethod
    async def open(cls, path: str) -> Self:
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vault-sqlite")
        try:
            conn = await cls._in_thread(executor, _connect, path)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        try:
            reader = _connect_reader(path)
        except BaseException:
            await asyncio.get_running_loop().run_in_executor(executor, conn.close)
            executor.shutdown(wait=False)
            raise
        return cls(conn, reader, executor)

    _dialect = SQLITE

    async def _fetch(self, sql: str, *args: Any) -> list[Sequence[Any]]:
        rows: list[Sequence[Any]] = self._read(lambda conn: conn.execute(sql, args).fetchall())
        return rows

    async def _run(self, sql: str, *args: Any) -> int:
        count: int = await self._write(lambda conn: conn.execute(sql, args).rowcount)
        return count

    async def _run_returning(self, sql: str, *args: Any) -> list[Sequence[Any]]:
        rows: list[Sequence[Any]] = await self._write(
            lambda conn: conn.execute(sql, args).fetchall()
        )
        return rows

    def _read(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run a read inline on the query-only connection (see the module docstring)."""
        if self._closed:
            raise RuntimeError("the store is closed")
        try:
            return work(self._reader)
        except sqlite3.DatabaseError as exc:
            if _is_unavailable(exc):
                raise StorageUnavailable() from None
            raise

    @staticmethod
    async def _in_thread(executor: ThreadPoolExecutor, fn: Callable[..., _T], *args: Any) -> _T:
        try:
            return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)
        except sqlite3.DatabaseError as exc:
            if _is_unavailable(exc):
                raise StorageUnavailable() from None
            raise
        except OSError:
            # Creating the directory or file failed; the message holds the path.
            raise StorageUnavailable() from None

    async def _call(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``work`` on the worker thread: one hand-off for all of a method's SQL.

        Reads pass a single statement (atomic by itself); writes use :meth:`_write`.
        """
        if self._closed:
            raise RuntimeError("the store is closed")
        return await self._in_thread(self._executor, work, self._conn)

    async def _write(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``work`` in one write transaction on the worker thread."""
        return await self._call(lambda conn: _transaction(conn, work))

    async def _write_and_scrub(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        """A destroying write: after it commits (and did something: a truthy
        result), copy the zeroed pages into the file and empty the WAL, so the
        deleted rows' old page images do not linger in it."""

        def run(conn: sqlite3.Connection) -> _T:
            result = _transaction(conn, work)
            if result:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            return result

        return await self._call(run)

    async def _in_transaction(self, body: Body[_T], *, scrub: bool = False) -> _T:
        def work(conn: sqlite3.Connection) -> _T:
            return run_now(body(_SqliteTx(conn)))

        try:
            return await (self._write_and_scrub(work) if scrub else self._write(work))
        except sqlite3.IntegrityError as exc:
            raise _constraint_error(exc) from None

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._reader.close()
        await asyncio.get_running_loop().run_in_executor(self._executor, self._conn.close)
        self._executor.shutdown(wait=True)

    async def pragmas(self) -> dict[str, int | str]:
        """The connection's effective settings (journal_mode, secure_delete, ...)."""
        return await self._call(_read_pragmas)

    def _check_schema(self, conn: sqlite3.Connection) -> None:
        """Refuse a database that holds the other schema (see the retention store)."""

    async def migrate(self) -> list[int]:
        table = self._MIGRATIONS_TABLE

        def work(conn: sqlite3.Connection) -> list[int]:
            self._check_schema(conn)
            migrations = load_migrations("sqlite", self._SCHEMA)
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {table} (version INTEGER PRIMARY KEY, "
                "name TEXT NOT NULL, applied_at INTEGER NOT NULL)"
            )
            applied = {int(r[0]) for r in conn.execute(f"SELECT version FROM {table}")}
            done: list[int] = []
            for migration in migrations:
                if migration.version in applied:
                    continue
                for statement in _split_statements(migration.sql):
                    conn.execute(statement)
                conn.execute(
                    f"INSERT INTO {table} (version, name, applied_at) VALUES (?, ?, ?)",
                    (migration.version, migration.name, _to_us(datetime.now(UTC))),
                )
                done.append(migration.version)
            return done

        return await self._write(work)

    # --- the 6-month access-log rule (the vault's log, the retention store's copies) -
    async def purge_access_log(self, before: datetime, limit: int) -> int:
        table = self._ACCESS_TABLE
        params = (_to_us(before), check_limit(limit))

        def work(conn: sqlite3.Connection) -> int:
            return conn.execute(
                f"DELETE FROM {table} WHERE rowid IN (SELECT rowid FROM {table} "
                "WHERE at < ? ORDER BY at LIMIT ?)",
                params,
            ).rowcount

        return await self._write(work)

    # --- key re-wrap (the vault's member_keys, the retention store's copies) -----
    # member_keys_to_rewrap is shared (vault.store.sql.keys); the batch update here.
    async def apply_rewrap(self, updates: Sequence[RewrapUpdate]) -> int:
        table = self._KEYS_TABLE
        params = [
            (
                u.to_version,
                bytes(u.wrapped_dek),
                canonical_member_id(u.member_id),
                u.dek_id,
                u.from_version,
            )
            for u in updates
        ]

        def work(conn: sqlite3.Connection) -> int:
            applied = 0
            for p in params:
                applied += conn.execute(
                    f"UPDATE {table} SET kek_version = ?, wrapped_dek = ? "
                    "WHERE member_id = ? AND dek_id = ? AND kek_version = ?",
                    p,
                ).rowcount
            return applied

        return await self._write(work) if params else 0
