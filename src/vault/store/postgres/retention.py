"""PostgreSQL: the separated retention store (a database of its own). Most of it is
shared (vault.store.sql.retention); here what differs: the schema check, the purge
(SKIP LOCKED) and the one-snapshot read."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from vault.store._common import check_limit, require_aware
from vault.store.postgres._db import _affected, _PgTx, _PostgresDatabase
from vault.store.sql.executor import Body
from vault.store.sql.retention import SqlRetention


class PostgresRetentionStore(SqlRetention, _PostgresDatabase):
    """The separated retention storage in a PostgreSQL database of its own (see
    RetentionStore)."""

    _SCHEMA = "retention"
    _MIGRATIONS_TABLE = "retention_schema_migrations"
    _KEYS_TABLE = "retained_members"

    async def _check_schema(self, conn: Any) -> None:
        if await conn.fetchval("SELECT to_regclass('kek_versions')") is not None:
            # Separated storage means a separate database (policy section 6).
            raise ValueError("the retention database must not be the vault's database")

    async def _in_read(self, body: Body[Any]) -> Any:
        async with self._transaction() as conn:
            return await body(_PgTx(conn))

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
