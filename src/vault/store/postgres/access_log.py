"""PostgreSQL: the access log's monthly partitions and its purge (appending and
paging are in vault.store.sql.access_log)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

import asyncpg

from vault.store._common import (
    check_limit,
    require_aware,
)
from vault.store.postgres._db import _affected, _PostgresDatabase

#: Every column of an entry, as a late partition's rows move out of the default one.
_MOVED_COLUMNS = "entry_id, member_id, at, action_ct, ip_ct, caller_ct"


class PostgresAccessLog(_PostgresDatabase):
    """PostgreSQL: the access log's monthly partitions and its purge."""

    async def migrate(self) -> list[int]:
        applied = await super().migrate()
        # Every start makes sure the access log's coming months exist, not only the
        # sidecar's purge (which may run elsewhere, or not yet).
        await self.ensure_access_log_partitions()
        return applied

    # Appending and paging are shared (vault.store.sql.access_log).

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
                f"RETURNING {_MOVED_COLUMNS}) "
                f'INSERT INTO "{name}" ({_MOVED_COLUMNS}) '
                f"SELECT {_MOVED_COLUMNS} FROM moved",
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
