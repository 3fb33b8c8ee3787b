"""The mail outbox (see :class:`vault.store.contracts.outbox.OutboxStore`), once for
both backends. Enqueueing guards the member row (PostgreSQL FOR SHARE, SQLite's
write lock) and equalises a missing member's cost (``Tx.decoy_write``)."""

from __future__ import annotations

import json
from datetime import datetime

from vault.store._common import check_limit
from vault.store.rows import OutboxMessage
from vault.store.sql import guards
from vault.store.sql.dialect import both
from vault.store.sql.executor import ForeignKeyViolation, SqlExecutor, Tx

_DUE = both(
    "SELECT message_id, member_id, kind, params{text}, created_at, attempts, "
    "next_attempt_at FROM outbox WHERE next_attempt_at <= $1 "
    "ORDER BY next_attempt_at, created_at, message_id LIMIT $2"
)
_SENT = both("DELETE FROM outbox WHERE message_id = $1")
# One pass over the outbox (it holds only mail not yet sent: small).
_DEPTH = both(
    "SELECT count(*), coalesce(sum(CASE WHEN next_attempt_at <= $1 THEN 1 ELSE 0 END), 0) "
    "FROM outbox"
)
_RETRY = both("UPDATE outbox SET attempts = $2, next_attempt_at = $3 WHERE message_id = $1")


class SqlOutbox(SqlExecutor):
    """Enqueueing, due messages, retries and deliveries."""

    async def enqueue_outbox(self, message: OutboxMessage) -> bool:
        d = self._dialect
        row = guards.outbox_params(d, message)

        async def body(tx: Tx) -> bool:
            # FOR SHARE holds the member against a concurrent shred until commit.
            if await tx.fetchval(guards.MEMBER_EXISTS[d.name], row[1]) is None:
                await tx.decoy_write()  # as costly as the insert
                return False
            await tx.run(guards.ENQUEUE_OUTBOX[d.name], *row)
            return True

        try:
            return await self._in_transaction(body)
        except ForeignKeyViolation:
            return False

    async def due_outbox(self, now: datetime, limit: int) -> list[OutboxMessage]:
        d = self._dialect
        rows = await self._fetch(_DUE[d.name], d.time(now), check_limit(limit))
        return [
            OutboxMessage(
                message_id=str(r[0]),
                member_id=str(r[1]),
                kind=str(r[2]),
                params={str(k): str(v) for k, v in json.loads(r[3]).items()},
                created_at=d.from_time(r[4]),
                attempts=int(r[5]),
                next_attempt_at=d.from_time(r[6]),
            )
            for r in rows
        ]

    async def outbox_sent(self, message_id: str) -> None:
        await self._run(_SENT[self._dialect.name], message_id)

    async def outbox_retry(self, message_id: str, attempts: int, next_attempt_at: datetime) -> None:
        d = self._dialect
        await self._run(_RETRY[d.name], message_id, attempts, d.time(next_attempt_at))

    async def outbox_depth(self, now: datetime) -> tuple[int, int]:
        d = self._dialect
        ((waiting, due),) = await self._fetch(_DEPTH[d.name], d.time(now))
        return int(waiting), int(due)
