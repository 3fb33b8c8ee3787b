"""PostgreSQL: the expiry batch's read, under a planner setting of its own."""

from __future__ import annotations

from datetime import datetime

from vault.store._common import check_limit, require_aware
from vault.store.postgres._db import _PostgresDatabase
from vault.store.sql.inactivity import DUE_FOR_EXPIRY


class PostgresInactivity(_PostgresDatabase):
    """PostgreSQL: the inactivity sweep's expiry read (the rest is shared)."""

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
                DUE_FOR_EXPIRY["postgres"],
                require_aware(last_seen_before),
                require_aware(noticed_before),
                check_limit(limit),
            )
        return [str(r["member_id"]) for r in rows]
