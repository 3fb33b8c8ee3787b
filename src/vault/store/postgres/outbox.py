"""PostgreSQL: the mail outbox."""

from __future__ import annotations

import json
from datetime import datetime

import asyncpg

from vault.store._common import (
    check_limit,
    require_aware,
)
from vault.store.postgres._db import _PostgresDatabase
from vault.store.postgres._shared import (
    _INSERT_OUTBOX,
    _outbox_params,
)
from vault.store.rows import (
    OutboxMessage,
)


class PostgresOutbox(_PostgresDatabase):
    """PostgreSQL: the mail outbox."""

    async def enqueue_outbox(self, message: OutboxMessage) -> bool:
        row = _outbox_params(message)
        try:
            async with self._transaction() as conn:
                # FOR SHARE holds the member against a concurrent shred until commit.
                found = await conn.fetchval(
                    "SELECT 1 FROM members WHERE member_id = $1 FOR SHARE", row[1]
                )
                if found is None:
                    # As costly as the insert: a transaction id makes the commit
                    # write and flush a commit record, as a real insert would (a
                    # caller probing for accounts must not see the difference).
                    await conn.execute("SELECT pg_current_xact_id()")
                    return False
                await conn.execute(f"{_INSERT_OUTBOX} ON CONFLICT (message_id) DO NOTHING", *row)
        except asyncpg.ForeignKeyViolationError:
            return False
        return True

    async def due_outbox(self, now: datetime, limit: int) -> list[OutboxMessage]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT message_id, member_id, kind, params::text AS params, created_at, "
                "attempts, next_attempt_at FROM outbox WHERE next_attempt_at <= $1 "
                "ORDER BY next_attempt_at, created_at, message_id LIMIT $2",
                require_aware(now),
                check_limit(limit),
            )
        return [
            OutboxMessage(
                message_id=str(r["message_id"]),
                member_id=str(r["member_id"]),
                kind=str(r["kind"]),
                params={str(k): str(v) for k, v in json.loads(r["params"]).items()},
                created_at=r["created_at"],
                attempts=int(r["attempts"]),
                next_attempt_at=r["next_attempt_at"],
            )
            for r in rows
        ]

    async def outbox_sent(self, message_id: str) -> None:
        async with self._transaction() as conn:
            await conn.execute("DELETE FROM outbox WHERE message_id = $1", message_id)

    async def outbox_retry(self, message_id: str, attempts: int, next_attempt_at: datetime) -> None:
        async with self._transaction() as conn:
            await conn.execute(
                "UPDATE outbox SET attempts = $2, next_attempt_at = $3 WHERE message_id = $1",
                message_id,
                attempts,
                require_aware(next_attempt_at),
            )
