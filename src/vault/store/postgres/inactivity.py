"""PostgreSQL: the inactivity notices and the expiry of inactive members."""

from __future__ import annotations

from datetime import datetime

from vault.store._common import (
    check_limit,
    require_aware,
)
from vault.store.postgres._db import _affected, _PostgresDatabase, _uuid
from vault.store.postgres._shared import (
    _INSERT_OUTBOX,
    _outbox_params,
)
from vault.store.rows import (
    OutboxMessage,
)


class PostgresInactivity(_PostgresDatabase):
    """PostgreSQL: the inactivity sweep's reads and its notice write."""

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
