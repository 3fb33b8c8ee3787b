"""SQLite backend: the embedded default.

Writes go through one connection used only from one worker thread: each write
method hands all its SQL to that thread in one call, in ``BEGIN IMMEDIATE`` ...
``COMMIT``, so it never half-applies and never blocks the event loop on fsync.
Every write holds the database's one write lock from its first statement, so
writes take turns and cannot deadlock (the PostgreSQL backend's lock order does
not arise); a write that waits past ``busy_timeout`` on another process is
:class:`StorageUnavailable`.
Reads run inline on the event loop on a second, query-only connection: they are
indexed point reads served from the page cache in microseconds, less than a
thread hand-off costs, and WAL lets them run beside the writer without waiting.
Timestamps are INTEGER microseconds since the Unix epoch (UTC). ``secure_delete``
zeroes deleted content in the file, and a shred is followed by a WAL checkpoint so
old page images leave the WAL as well.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any, Self, TypeVar

from vault.clock import from_micros, to_micros
from vault.errors import (
    AlreadyExists,
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
# The member's consents ride along as a JSON array: one statement per read.
_SELECT_MEMBER = (
    f"SELECT {_MEMBER_COLUMNS}, (SELECT json_group_array("
    "json_array(c.purpose, c.granted, c.policy_version, c.recorded_at)) FROM "
    "(SELECT * FROM consents WHERE member_id = m.member_id ORDER BY purpose) AS c) AS consents "
    "FROM members AS m JOIN member_keys AS k ON k.member_id = m.member_id"
)


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


def _integrity_error(exc: sqlite3.IntegrityError) -> Exception:
    """The vault error for a constraint failure; the SQLite text is never echoed."""
    name = getattr(exc, "sqlite_errorname", "")
    if name in ("SQLITE_CONSTRAINT_UNIQUE", "SQLITE_CONSTRAINT_PRIMARYKEY"):
        _, _, columns = str(exc).partition("failed: ")
        field = _UNIQUE_FIELDS.get(columns.split(",")[0].strip())
        if field is not None:
            return AlreadyExists(field)
    if name == "SQLITE_CONSTRAINT_FOREIGNKEY":
        # The only foreign key a caller can miss here is the KEK version.
        return ValueError("the member key's KEK version does not exist")
    return exc


def _require_not_destroyed(conn: sqlite3.Connection, kek_version: int) -> None:
    """Inside a write: a DEK may not be stored wrapped under a destroyed version (a
    rotation, re-wrap and destroy ran while it was being wrapped)."""
    state = conn.execute(
        "SELECT state FROM kek_versions WHERE version = ?", (kek_version,)
    ).fetchone()
    if state is not None and state[0] == "destroyed":
        raise PreconditionFailed("kek_version", f"KEK version {kek_version} has been destroyed")


def _member_has_dek(conn: sqlite3.Connection, member_id: str, dek_id: int) -> bool:
    """Inside a write: False if no such member; KeyChanged if its DEK was rotated."""
    row = conn.execute(
        "SELECT dek_id FROM member_keys WHERE member_id = ?", (member_id,)
    ).fetchone()
    if row is None:
        return False
    if int(row[0]) != dek_id:
        raise KeyChanged
    return True


def _decoy_write(conn: sqlite3.Connection) -> None:
    """Inside a write: dirty a page without changing anything, so the commit writes
    and syncs the WAL as a real insert's would. A caller probing for accounts must
    not see a missing member answer faster."""
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    conn.execute(f"PRAGMA user_version = {int(version)}")


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


# Column positions in _SELECT_MEMBER: member reads are the hot path, and plain
# tuples index faster than sqlite3.Row looks names up.
_HMAC_AT = {field: 3 + i for i, field in enumerate(HMAC_COLUMNS)}
_CT_AT = {field: 3 + len(HMAC_COLUMNS) + i for i, field in enumerate(CT_COLUMNS)}
_KEY_AT = 3 + len(HMAC_COLUMNS) + len(CT_COLUMNS)


def _member(row: tuple[Any, ...]) -> MemberRow:
    member_id = str(row[0])
    dek_id, kek_version, wrapped_dek, consents = row[_KEY_AT : _KEY_AT + 4]
    return MemberRow(
        member_id=member_id,
        created_at=_from_us(row[1]),
        last_seen_at=_from_us(row[2]),
        ciphertexts={field: row[at] for field, at in _CT_AT.items()},
        blind_indexes={field: row[at] for field, at in _HMAC_AT.items()},
        key=MemberKeyRow(member_id, int(dek_id), int(kek_version), wrapped_dek),
        consents=tuple(
            ConsentRow(str(purpose), bool(granted), str(version), _from_us(recorded_at))
            for purpose, granted, version, recorded_at in json.loads(consents)
        ),
    )


def _fetch_member(conn: sqlite3.Connection, where: str, value: object) -> MemberRow | None:
    cursor = conn.cursor()
    cursor.row_factory = None
    row = cursor.execute(f"{_SELECT_MEMBER} WHERE {where} = ?", (value,)).fetchone()
    return None if row is None else _member(row)


def _consents(conn: sqlite3.Connection, member_id: str) -> list[ConsentRow]:
    rows = conn.execute(
        "SELECT purpose, granted, policy_version, recorded_at FROM consents "
        "WHERE member_id = ? ORDER BY purpose",
        (member_id,),
    ).fetchall()
    return [
        ConsentRow(
            purpose=str(r["purpose"]),
            granted=bool(r["granted"]),
            policy_version=str(r["policy_version"]),
            recorded_at=_from_us(r["recorded_at"]),
        )
        for r in rows
    ]


_INSERT_OUTBOX = (
    "INSERT INTO outbox (message_id, member_id, kind, params, created_at, attempts, "
    "next_attempt_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
)


def _outbox_params(message: OutboxMessage) -> tuple[Any, ...]:
    """The outbox row; a message without a next attempt is due at once."""
    created = _to_us(message.created_at)
    due = created if message.next_attempt_at is None else _to_us(message.next_attempt_at)
    return (
        message.message_id,
        canonical_member_id(message.member_id),
        message.kind,
        outbox_params_json(message),
        created,
        int(message.attempts),
        due,
    )


def _destruction_record(row: sqlite3.Row) -> DestructionRecord:
    retained = row["retained_until"]
    return DestructionRecord(
        member_id=str(row["member_id"]),
        destroyed_at=_from_us(row["destroyed_at"]),
        reason=str(row["reason"]),
        items={str(k): int(v) for k, v in json.loads(row["items"]).items()},
        kek_versions=tuple(int(v) for v in json.loads(row["kek_versions"])),
        retained_until=None if retained is None else _from_us(retained),
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


def _matches_retention(
    conn: sqlite3.Connection, member_id: str, check: RetentionCheck, expected: list[bytes]
) -> bool:
    """Whether the member is still exactly what the withdrawal copied (RetentionCheck)."""
    active = conn.execute("SELECT version FROM kek_versions WHERE state = 'active'").fetchone()
    if active is None or int(active[0]) != check.kek_version:
        return False
    key = conn.execute(
        "SELECT dek_id FROM member_keys WHERE member_id = ?", (member_id,)
    ).fetchone()
    if key is None or int(key[0]) != check.dek_id:
        return False
    return _unchanged_since_read(conn, member_id, expected, check.access_entry_ids)


def _unchanged_since_read(
    conn: sqlite3.Connection, member_id: str, expected: list[bytes], entry_ids: Iterable[int]
) -> bool:
    """Whether the member still has the field ciphertexts ``expected`` (column order)
    and exactly the access-log entries ``entry_ids``, as the caller read them."""
    current = conn.execute(
        f"SELECT {CT_SELECT} FROM members WHERE member_id = ?", (member_id,)
    ).fetchone()
    if current is None or [bytes(c) for c in current] != expected:
        return False  # a field was written since the caller read it
    present = {
        int(r[0])
        for r in conn.execute("SELECT entry_id FROM access_log WHERE member_id = ?", (member_id,))
    }
    return present == set(entry_ids)  # else an entry came (or went) meanwhile


class _SqliteDatabase:
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

    async def _write_and_scrub(self, work: Callable[[sqlite3.Connection], _T | None]) -> _T | None:
        """A destroying write: after it commits (and did something), copy the zeroed
        pages into the file and empty the WAL, so the deleted rows' old page images
        do not linger in it."""

        def run(conn: sqlite3.Connection) -> _T | None:
            result = _transaction(conn, work)
            if result is not None:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            return result

        return await self._call(run)

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

    async def count_access_log_before(self, before: datetime) -> int:
        table = self._ACCESS_TABLE
        params = (_to_us(before),)

        def work(conn: sqlite3.Connection) -> int:
            found = conn.execute(f"SELECT count(*) FROM {table} WHERE at < ?", params)
            return int(found.fetchone()[0])

        return self._read(work)

    # --- key re-wrap (the vault's member_keys, the retention store's copies) -----
    async def member_keys_to_rewrap(
        self, target_version: int, after_member_id: str | None, limit: int
    ) -> list[MemberKeyRow]:
        table = self._KEYS_TABLE
        limit = check_limit(limit)
        after = "" if after_member_id is None else canonical_member_id(after_member_id)

        def work(conn: sqlite3.Connection) -> list[MemberKeyRow]:
            rows = conn.execute(
                f"SELECT member_id, dek_id, kek_version, wrapped_dek FROM {table} "
                "WHERE kek_version <> ? AND member_id > ? ORDER BY member_id LIMIT ?",
                (target_version, after, limit),
            ).fetchall()
            return [MemberKeyRow(str(m), int(d), int(v), bytes(w)) for m, d, v, w in rows]

        return self._read(work)

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


class SqliteStore(_SqliteDatabase):
    """The vault in one SQLite file. Open with :meth:`open`, then ``migrate()``."""

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
        access_log: Mapping[int, tuple[bytes, bytes]],
        *,
        old_ciphertexts: Mapping[str, bytes],
    ) -> bool:
        member_id, expected = check_key_replacement(
            member_id, new_key, ciphertexts, old_ciphertexts
        )
        assignments = update_assignments(ciphertexts, None)
        setters = ", ".join(f"{column} = ?" for column, _ in assignments)
        field_params = [value for _, value in assignments] + [member_id]
        entries = [(bytes(a), bytes(i), entry_id) for entry_id, (a, i) in access_log.items()]

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
                "UPDATE access_log SET action_ct = ?, ip_ct = ? WHERE entry_id = ?", entries
            )
            return True

        return await self._write(work)

    async def record_key_event(self, event: KeyEvent) -> None:
        params = (
            _to_us(require_aware(event.at)),
            event.actor,
            event.operation,
            event.kek_version,
            None if event.member_id is None else canonical_member_id(event.member_id),
            json.dumps(dict(event.details), sort_keys=True),
        )

        def work(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO key_events (at, actor, operation, kek_version, member_id, details) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                params,
            )

        await self._write(work)

    async def list_key_events(self, limit: int = 100) -> list[KeyEvent]:
        limit = check_limit(limit)

        def work(conn: sqlite3.Connection) -> list[KeyEvent]:
            rows = conn.execute(
                "SELECT at, actor, operation, kek_version, member_id, details FROM key_events "
                "ORDER BY event_id DESC LIMIT ?",
                (limit,),
            ).fetchall()
            return [
                KeyEvent(_from_us(at), actor, op, version, member, json.loads(details))
                for at, actor, op, version, member, details in rows
            ]

        return self._read(work)

    # --- members ---------------------------------------------------------------
    async def insert_member(self, member: MemberRow) -> None:
        member_id = check_new_member(member)
        consents = member.consents
        columns = [
            "member_id",
            "created_at",
            "last_seen_at",
            *HMAC_COLUMNS.values(),
            *CT_COLUMNS.values(),
        ]
        values = [
            member_id,
            _to_us(member.created_at),
            _to_us(member.last_seen_at),
            *(bytes(member.blind_indexes[f]) for f in HMAC_COLUMNS),
            *(bytes(member.ciphertexts[f]) for f in CT_COLUMNS),
        ]
        insert_member = (
            f"INSERT INTO members ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
        )
        key = member.key
        consent_rows = [
            (member_id, c.purpose, int(c.granted), c.policy_version, _to_us(c.recorded_at))
            for c in consents
        ]

        def work(conn: sqlite3.Connection) -> None:
            _require_not_destroyed(conn, key.kek_version)
            try:
                conn.execute(insert_member, values)
                conn.execute(
                    "INSERT INTO member_keys (member_id, dek_id, kek_version, wrapped_dek) "
                    "VALUES (?, ?, ?, ?)",
                    (member_id, key.dek_id, key.kek_version, bytes(key.wrapped_dek)),
                )
                conn.executemany(
                    "INSERT INTO consents (member_id, purpose, granted, policy_version, "
                    "recorded_at) VALUES (?, ?, ?, ?, ?)",
                    consent_rows,
                )
            except sqlite3.IntegrityError as exc:
                raise _integrity_error(exc) from None

        await self._write(work)

    async def get_member(self, member_id: str) -> MemberRow | None:
        member_id = canonical_member_id(member_id)

        return self._read(lambda conn: _fetch_member(conn, "m.member_id", member_id))

    async def find_member(self, index: IndexedField, hmac: bytes) -> MemberRow | None:
        column = hmac_column(index)
        value = bytes(hmac)

        return self._read(lambda conn: _fetch_member(conn, f"m.{column}", value))

    async def update_member(
        self,
        member_id: str,
        ciphertexts: Mapping[str, bytes],
        blind_indexes: Mapping[str, bytes] | None = None,
        *,
        dek_id: int,
        notify: OutboxMessage | None = None,
    ) -> bool:
        member_id = canonical_member_id(member_id)
        assignments = update_assignments(ciphertexts, blind_indexes)
        setters = ", ".join(f"{column} = ?" for column, _ in assignments)
        params = [value for _, value in assignments] + [member_id]
        outbox_row = None if notify is None else _outbox_params(notify)
        if outbox_row is not None and outbox_row[1] != member_id:
            raise ValueError("the message is for another member")

        def work(conn: sqlite3.Connection) -> bool:
            if not _member_has_dek(conn, member_id, dek_id):
                return False
            if assignments:
                try:
                    cur = conn.execute(f"UPDATE members SET {setters} WHERE member_id = ?", params)
                except sqlite3.IntegrityError as exc:
                    raise _integrity_error(exc) from None
                if cur.rowcount != 1:
                    return False
            if outbox_row is not None:
                conn.execute(_INSERT_OUTBOX, outbox_row)
            return True

        return await self._write(work)

    async def record_login(
        self,
        member_id: str,
        entry: NewAccessEntry,
        password_hash_ct: bytes | None = None,
        *,
        dek_id: int,
    ) -> bool:
        member_id = canonical_member_id(member_id)
        at = _to_us(entry.at)
        if password_hash_ct is None:
            update: tuple[str, list[Any]] = (
                # A connection cancels a pending inactivity notice (the clock restarts).
                "UPDATE members SET last_seen_at = ?, inactivity_notice_at = NULL "
                "WHERE member_id = ?",
                [at, member_id],
            )
        else:
            update = (
                "UPDATE members SET last_seen_at = ?, inactivity_notice_at = NULL, "
                "password_hash_ct = ? WHERE member_id = ?",
                [at, bytes(password_hash_ct), member_id],
            )
        log_params = (member_id, at, bytes(entry.action_ct), bytes(entry.ip_ct))

        def work(conn: sqlite3.Connection) -> bool:
            if not _member_has_dek(conn, member_id, dek_id):
                return False
            conn.execute(*update)
            conn.execute(
                "INSERT INTO access_log (member_id, at, action_ct, ip_ct) VALUES (?, ?, ?, ?)",
                log_params,
            )
            return True

        return await self._write(work)

    async def list_consents(self, member_id: str) -> list[ConsentRow]:
        member_id = canonical_member_id(member_id)
        return self._read(lambda conn: _consents(conn, member_id))

    # --- access log ------------------------------------------------------------
    async def append_access(self, member_id: str, entry: NewAccessEntry, *, dek_id: int) -> bool:
        member_id = canonical_member_id(member_id)
        params = (member_id, _to_us(entry.at), bytes(entry.action_ct), bytes(entry.ip_ct))

        def work(conn: sqlite3.Connection) -> bool:
            if not _member_has_dek(conn, member_id, dek_id):
                return False
            conn.execute(
                "INSERT INTO access_log (member_id, at, action_ct, ip_ct) VALUES (?, ?, ?, ?)",
                params,
            )
            return True

        return await self._write(work)

    async def list_access(
        self,
        member_id: str,
        limit: int,
        before: tuple[datetime, int] | None = None,
    ) -> list[AccessEntryRow]:
        member_id = canonical_member_id(member_id)
        limit = check_limit(limit)
        if before is None:
            query = (
                "SELECT entry_id, at, action_ct, ip_ct FROM access_log WHERE member_id = ? "
                "ORDER BY at DESC, entry_id DESC LIMIT ?"
            )
            params: tuple[Any, ...] = (member_id, limit)
        else:
            query = (
                "SELECT entry_id, at, action_ct, ip_ct FROM access_log "
                "WHERE member_id = ? AND (at, entry_id) < (?, ?) "
                "ORDER BY at DESC, entry_id DESC LIMIT ?"
            )
            params = (member_id, _to_us(before[0]), int(before[1]), limit)

        def work(conn: sqlite3.Connection) -> list[AccessEntryRow]:
            return [
                AccessEntryRow(
                    entry_id=int(r["entry_id"]),
                    at=_from_us(r["at"]),
                    action_ct=bytes(r["action_ct"]),
                    ip_ct=bytes(r["ip_ct"]),
                )
                for r in conn.execute(query, params)
            ]

        return self._read(work)

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

    async def is_destroyed(self, member_id: str) -> bool:
        member_id = canonical_member_id(member_id)

        def work(conn: sqlite3.Connection) -> bool:
            found = conn.execute("SELECT 1 FROM tombstones WHERE member_id = ?", (member_id,))
            return found.fetchone() is not None

        return self._read(work)

    async def list_destruction_records(
        self, member_id: str | None = None
    ) -> list[DestructionRecord]:
        select = (
            "SELECT member_id, destroyed_at, reason, items, kek_versions, retained_until "
            "FROM destruction_records"
        )
        order = "ORDER BY destroyed_at, record_id"
        params: tuple[str, ...] = ()
        query = f"{select} {order}"
        if member_id is not None:
            query = f"{select} WHERE member_id = ? {order}"
            params = (canonical_member_id(member_id),)

        def work(conn: sqlite3.Connection) -> list[DestructionRecord]:
            return [_destruction_record(r) for r in conn.execute(query, params)]

        return self._read(work)

    # --- lifecycle (the sidecar) -------------------------------------------------
    async def acquire_lease(self, name: str, holder: str, now: datetime, ttl: timedelta) -> bool:
        params = (name, holder, _to_us(now + ttl), _to_us(now))

        def work(conn: sqlite3.Connection) -> bool:
            # One upsert: taken only if free, expired, or already ours.
            cur = conn.execute(
                "INSERT INTO leases (name, holder, expires_at) VALUES (?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, "
                "expires_at = excluded.expires_at "
                "WHERE leases.holder = excluded.holder OR leases.expires_at <= ?",
                params,
            )
            return cur.rowcount == 1

        return await self._write(work)

    async def release_lease(self, name: str, holder: str) -> None:
        def work(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM leases WHERE name = ? AND holder = ?", (name, holder))

        await self._write(work)

    async def members_due_for_notice(
        self, last_seen_before: datetime, limit: int
    ) -> list[tuple[str, datetime]]:
        params = (_to_us(last_seen_before), check_limit(limit))

        def work(conn: sqlite3.Connection) -> list[tuple[str, datetime]]:
            rows = conn.execute(
                "SELECT member_id, last_seen_at FROM members "
                "WHERE inactivity_notice_at IS NULL AND last_seen_at < ? "
                "ORDER BY last_seen_at LIMIT ?",
                params,
            ).fetchall()
            return [(str(r[0]), _from_us(r[1])) for r in rows]

        return self._read(work)

    async def record_inactivity_notice(
        self, member_id: str, last_seen_at: datetime, message: OutboxMessage
    ) -> bool:
        member_id = canonical_member_id(member_id)
        if canonical_member_id(message.member_id) != member_id:
            raise ValueError("the message is for another member")
        mark = (_to_us(message.created_at), member_id, _to_us(last_seen_at))
        row = _outbox_params(message)

        def work(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE members SET inactivity_notice_at = ? WHERE member_id = ? "
                "AND last_seen_at = ? AND inactivity_notice_at IS NULL",
                mark,
            )
            if cur.rowcount != 1:
                return False
            conn.execute(_INSERT_OUTBOX, row)
            return True

        return await self._write(work)

    async def members_due_for_expiry(
        self, last_seen_before: datetime, noticed_before: datetime, limit: int
    ) -> list[str]:
        params = (_to_us(last_seen_before), _to_us(noticed_before), check_limit(limit))

        def work(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute(
                "SELECT member_id FROM members WHERE inactivity_notice_at IS NOT NULL "
                "AND last_seen_at < ? AND inactivity_notice_at < ? "
                "ORDER BY last_seen_at LIMIT ?",
                params,
            ).fetchall()
            return [str(r[0]) for r in rows]

        return self._read(work)

    # --- account recovery --------------------------------------------------------
    async def create_password_reset(
        self, token_hash: bytes, member_id: str, expires_at: datetime, message: OutboxMessage
    ) -> bool:
        if canonical_member_id(member_id) != canonical_member_id(message.member_id):
            raise ValueError("the message is for another member")
        reset = NewPasswordReset(token_hash, expires_at)
        return await self._recovery_mail(message, reset, None) == "queued"

    async def consume_password_reset(self, token_hash: bytes, now: datetime) -> str | None:
        params = (_to_us(now), check_token_hash(token_hash), _to_us(now))

        def work(conn: sqlite3.Connection) -> str | None:
            # One conditional UPDATE: the check and the mark cannot be split.
            row = conn.execute(
                "UPDATE password_resets SET used_at = ? WHERE token_hash = ? "
                "AND used_at IS NULL AND expires_at > ? RETURNING member_id",
                params,
            ).fetchone()
            return None if row is None else str(row[0])

        return await self._write(work)

    async def enqueue_outbox(self, message: OutboxMessage) -> bool:
        row = _outbox_params(message)

        def work(conn: sqlite3.Connection) -> bool:
            found = conn.execute("SELECT 1 FROM members WHERE member_id = ?", (row[1],))
            if found.fetchone() is None:
                _decoy_write(conn)
                return False
            conn.execute(f"{_INSERT_OUTBOX} ON CONFLICT (message_id) DO NOTHING", row)
            return True

        return await self._write(work)

    async def due_outbox(self, now: datetime, limit: int) -> list[OutboxMessage]:
        params = (_to_us(now), check_limit(limit))

        def work(conn: sqlite3.Connection) -> list[OutboxMessage]:
            rows = conn.execute(
                "SELECT message_id, member_id, kind, params, created_at, attempts, "
                "next_attempt_at FROM outbox WHERE next_attempt_at <= ? "
                "ORDER BY next_attempt_at, created_at, message_id LIMIT ?",
                params,
            ).fetchall()
            return [
                OutboxMessage(
                    message_id=str(r[0]),
                    member_id=str(r[1]),
                    kind=str(r[2]),
                    params={str(k): str(v) for k, v in json.loads(r[3]).items()},
                    created_at=_from_us(r[4]),
                    attempts=int(r[5]),
                    next_attempt_at=_from_us(r[6]),
                )
                for r in rows
            ]

        return self._read(work)

    async def outbox_sent(self, message_id: str) -> None:
        def work(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM outbox WHERE message_id = ?", (message_id,))

        await self._write(work)

    async def outbox_retry(self, message_id: str, attempts: int, next_attempt_at: datetime) -> None:
        params = (attempts, _to_us(next_attempt_at), message_id)

        def work(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE outbox SET attempts = ?, next_attempt_at = ? WHERE message_id = ?", params
            )

        await self._write(work)

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
        return await self._recovery_mail(message, reset, (limit, _to_us(since)))

    async def _recovery_mail(
        self,
        message: OutboxMessage,
        reset: NewPasswordReset | None,
        quota: tuple[int, int] | None,
    ) -> RecoveryMailOutcome:
        """One write transaction: the member check, the quota (limit, since) when
        given, the reset row when given, the mail. BEGIN IMMEDIATE serialises every
        writer of the file, so the count and the insert cannot be split."""
        row = _outbox_params(message)
        member_id, at = row[1], row[4]
        reset_row = (
            None
            if reset is None
            else (check_token_hash(reset.token_hash), member_id, _to_us(reset.expires_at))
        )

        def work(conn: sqlite3.Connection) -> RecoveryMailOutcome:
            found = conn.execute("SELECT 1 FROM members WHERE member_id = ?", (member_id,))
            if found.fetchone() is None:
                _decoy_write(conn)
                return "no_member"
            if quota is not None:
                limit, since = quota
                sent = conn.execute(
                    "SELECT sent_at FROM recovery_mail_quota WHERE member_id = ?", (member_id,)
                ).fetchone()
                recent = [] if sent is None else [int(t) for t in json.loads(sent[0]) if t > since]
                if len(recent) >= limit:
                    return "limited"
                conn.execute(
                    "INSERT INTO recovery_mail_quota (member_id, sent_at) VALUES (?, ?) "
                    "ON CONFLICT (member_id) DO UPDATE SET sent_at = excluded.sent_at",
                    (member_id, json.dumps([*recent, at])),
                )
            if reset_row is not None:
                conn.execute(
                    "INSERT INTO password_resets (token_hash, member_id, expires_at) "
                    "VALUES (?, ?, ?)",
                    reset_row,
                )
            conn.execute(_INSERT_OUTBOX, row)
            return "queued"

        return await self._write(work)

    async def find_password_reset(self, token_hash: bytes, now: datetime) -> str | None:
        params = (check_token_hash(token_hash), _to_us(now))

        def work(conn: sqlite3.Connection) -> str | None:
            row = conn.execute(
                "SELECT member_id FROM password_resets WHERE token_hash = ? "
                "AND used_at IS NULL AND expires_at > ?",
                params,
            ).fetchone()
            return None if row is None else str(row[0])

        return self._read(work)


_RETAINED_CT_SELECT = ", ".join(RETAINED_COLUMNS[f] for f in RETAINED_FIELDS)


class SqliteRetentionStore(_SqliteDatabase):
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
            (member_id, e.entry_id, _to_us(e.at), bytes(e.action_ct), bytes(e.ip_ct))
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
                "INSERT INTO retained_access_log (member_id, entry_id, at, action_ct, ip_ct) "
                "VALUES (?, ?, ?, ?, ?)",
                entries,
            )
            return True

        return await self._write(work)

    async def confirm_retained(self, member_id: str) -> bool:
        params = (canonical_member_id(member_id),)

        def work(conn: sqlite3.Connection) -> bool:
            return (
                conn.execute(
                    "UPDATE retained_members SET confirmed = 1 WHERE member_id = ?", params
                ).rowcount
                > 0
            )

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
                "SELECT entry_id, at, action_ct, ip_ct FROM retained_access_log "
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
                    AccessEntryRow(int(e[0]), _from_us(e[1]), bytes(e[2]), bytes(e[3]))
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

    async def retained_due(self, now: datetime, limit: int) -> list[str]:
        params = (_to_us(now), check_limit(limit))

        def work(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute(
                "SELECT member_id FROM retained_members WHERE confirmed = 1 "
                "AND destroy_after <= ? ORDER BY destroy_after LIMIT ?",
                params,
            )
            return [str(r[0]) for r in rows]

        return self._read(work)

    async def unconfirmed_before(self, before: datetime, limit: int) -> list[str]:
        params = (_to_us(before), check_limit(limit))

        def work(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute(
                "SELECT member_id FROM retained_members WHERE confirmed = 0 "
                "AND retained_at < ? ORDER BY retained_at LIMIT ?",
                params,
            )
            return [str(r[0]) for r in rows]

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

    async def kek_usage(self) -> list[KekUsage]:
        def work(conn: sqlite3.Connection) -> list[KekUsage]:
            rows = conn.execute(
                "SELECT kek_version, count(*) FROM retained_members "
                "GROUP BY kek_version ORDER BY kek_version"
            ).fetchall()
            return [KekUsage(int(v), 0, 0, retained_keys=int(n)) for v, n in rows]

        return self._read(work)

    async def record_event(self, event: RetentionEvent) -> None:
        params = (
            _to_us(require_aware(event.at)),
            event.actor,
            event.operation,
            canonical_member_id(event.member_id),
            event.basis,
        )

        def work(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO retention_events (at, actor, operation, member_id, basis) "
                "VALUES (?, ?, ?, ?, ?)",
                params,
            )

        await self._write(work)

    async def list_events(self, member_id: str | None = None) -> list[RetentionEvent]:
        select = "SELECT at, actor, operation, member_id, basis FROM retention_events"
        query, params = f"{select} ORDER BY event_id", tuple[str, ...]()
        if member_id is not None:
            query = f"{select} WHERE member_id = ? ORDER BY event_id"
            params = (canonical_member_id(member_id),)

        def work(conn: sqlite3.Connection) -> list[RetentionEvent]:
            return [
                RetentionEvent(_from_us(r[0]), str(r[1]), str(r[2]), str(r[3]), str(r[4]))
                for r in conn.execute(query, params)
            ]

        return self._read(work)
