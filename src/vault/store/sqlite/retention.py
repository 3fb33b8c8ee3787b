"""SQLite: the separated retention store (a database of its own). Most of it is
shared (vault.store.sql.retention); here what differs: the schema check and the
inline read (the purge by rowid is in ``_db``)."""

from __future__ import annotations

import sqlite3
from typing import Any

from vault.store.sql.executor import Body, run_now
from vault.store.sql.retention import SqlRetention
from vault.store.sqlite._db import _SqliteDatabase, _SqliteTx


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

    async def _in_read(self, body: Body[Any]) -> Any:
        # Inline on the query-only connection, as every SQLite read.
        return self._read(lambda conn: run_now(body(_SqliteTx(conn))))
