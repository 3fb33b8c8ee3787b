"""PostgreSQL: enqueueing mail (the rest of the outbox is in vault.store.sql.outbox)."""

from __future__ import annotations

import asyncpg

from vault.store.postgres._db import _PostgresDatabase
from vault.store.postgres._shared import (
    _INSERT_OUTBOX,
    _outbox_params,
)
from vault.store.rows import (
    OutboxMessage,
)


class PostgresOutbox(_PostgresDatabase):
    """PostgreSQL: enqueueing mail (the rest of the outbox is in vault.store.sql.outbox)."""

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
