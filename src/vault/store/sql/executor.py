"""The one small interface both execution models offer the shared domain parts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vault.store.sql.dialect import Dialect


class SqlExecutor:
    """What a shared domain part may ask of its store: one statement at a time.

    ``_fetch`` is a read (SQLite: inline on the query-only connection; PostgreSQL: a
    pooled connection, no transaction); ``_run`` is a write in a transaction of its
    own, returning the rows it changed. Statements come rendered for ``_dialect``.
    Work that needs several statements in one transaction stays in the backend.
    """

    _dialect: Dialect

    async def _fetch(self, sql: str, *args: Any) -> list[Sequence[Any]]:
        raise NotImplementedError

    async def _run(self, sql: str, *args: Any) -> int:
        raise NotImplementedError

    async def _run_returning(self, sql: str, *args: Any) -> list[Sequence[Any]]:
        raise NotImplementedError
