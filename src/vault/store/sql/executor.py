"""The small interfaces both execution models offer the shared domain parts."""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Protocol, TypeVar

from vault.errors import AlreadyExists
from vault.store.sql.dialect import Dialect

_T = TypeVar("_T")

#: A transaction body: given the transaction, it runs statements and returns a result.
Body = Callable[["Tx"], Coroutine[Any, Any, _T]]


class Tx(Protocol):
    """One transaction's statements, on either backend.

    PostgreSQL: an asyncpg connection inside ``conn.transaction()``. SQLite: the
    writer thread's connection inside ``BEGIN IMMEDIATE``; there every await
    completes at once (see :func:`run_now`), so a body written once runs there
    without an event loop and without a hand-off per statement.
    """

    async def fetch(self, sql: str, *args: Any) -> list[Sequence[Any]]: ...

    async def fetchrow(self, sql: str, *args: Any) -> Sequence[Any] | None: ...

    async def fetchval(self, sql: str, *args: Any) -> Any: ...

    async def run(self, sql: str, *args: Any) -> int:
        """Execute; the number of rows it changed."""
        ...

    async def run_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...

    async def copy(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """Bulk insert (PostgreSQL: COPY; SQLite: one prepared INSERT)."""
        ...

    async def decoy_write(self) -> None:
        """Make the commit write and flush as an insert's would, changing nothing:
        a caller probing for accounts must not see a missing member answer faster."""
        ...


def run_now(body: Coroutine[Any, Any, _T]) -> _T:
    """Run a transaction body whose awaits all complete at once (the SQLite Tx),
    synchronously, on the calling thread."""
    try:
        body.send(None)
    except StopIteration as done:
        result: _T = done.value
        return result
    body.close()
    raise RuntimeError("a SQLite transaction body must not suspend")


class UniqueViolation(Exception):
    """A unique constraint failed in a transaction body (the driver's error,
    translated by the backend). ``field`` is the blind index or key it protects."""

    def __init__(self, field: str | None) -> None:
        super().__init__(field)
        self.field = field

    def error(self) -> Exception:
        if self.field is None:
            # Not a blind index; the driver's detail would hold a value: say nothing.
            return RuntimeError("a unique constraint failed")
        return AlreadyExists(self.field)


class ForeignKeyViolation(Exception):
    """A foreign key failed in a transaction body (translated by the backend)."""


class MemberGone(Exception):
    """Raised inside a write transaction to roll it back: the member is gone."""


class SqlExecutor:
    """What a shared domain part may ask of its store.

    ``_fetch`` is a read (SQLite: inline on the query-only connection; PostgreSQL: a
    pooled connection, no transaction); ``_run`` is a write in a transaction of its
    own, returning the rows it changed. ``_in_transaction`` runs a body of several
    statements in one transaction (driver constraint errors become
    :class:`UniqueViolation` / :class:`ForeignKeyViolation`); with ``scrub`` a
    truthy result means it destroyed data (SQLite then checkpoints its WAL).
    Statements come rendered for ``_dialect``.
    """

    _dialect: Dialect

    async def _fetch(self, sql: str, *args: Any) -> list[Sequence[Any]]:
        raise NotImplementedError

    async def _run(self, sql: str, *args: Any) -> int:
        raise NotImplementedError

    async def _run_returning(self, sql: str, *args: Any) -> list[Sequence[Any]]:
        raise NotImplementedError

    async def _in_transaction(self, body: Body[_T], *, scrub: bool = False) -> _T:
        raise NotImplementedError

    async def _serialise(self, tx: Tx, table: str) -> None:
        """Make check-then-write transactions on ``table`` take turns. SQLite's
        write lock does already; PostgreSQL locks the table (readers go on)."""
