"""PostgreSQL: recovery tokens and the recovery-mail quota."""

from __future__ import annotations

from datetime import datetime

import asyncpg

from vault.store._common import (
    check_token_hash,
    require_aware,
)
from vault.store.postgres._db import _PostgresDatabase
from vault.store.postgres._shared import (
    _INSERT_OUTBOX,
    _outbox_params,
)
from vault.store.rows import (
    NewPasswordReset,
    OutboxMessage,
    RecoveryMailOutcome,
)


class PostgresRecovery(_PostgresDatabase):
    """PostgreSQL: recovery tokens and the recovery-mail quota."""

    async def _recovery_mail(
        self,
        message: OutboxMessage,
        reset: NewPasswordReset | None,
        quota: tuple[int, datetime] | None,
    ) -> RecoveryMailOutcome:
        """One transaction: the member check, the quota (limit, since) when given,
        the reset row when given, the mail."""
        # One statement counts and records: ON CONFLICT DO UPDATE locks the
        # member's quota row and evaluates its WHERE on the newest version, so
        # concurrent calls (on any replica) queue no more than the limit.
        take = (
            "INSERT INTO recovery_mail_quota AS q (member_id, sent_at) "
            "VALUES ($1, ARRAY[$2::timestamptz]) "
            "ON CONFLICT (member_id) DO UPDATE "
            "SET sent_at = ARRAY(SELECT t FROM unnest(q.sent_at) AS t WHERE t > $3 ORDER BY t) "
            "|| $2::timestamptz "
            "WHERE (SELECT count(*) FROM unnest(q.sent_at) AS t WHERE t > $3) < $4 "
            "RETURNING true"
        )
        row = _outbox_params(message)
        key, at = row[1], row[4]
        token_hash = None if reset is None else check_token_hash(reset.token_hash)
        try:
            async with self._transaction() as conn:
                # FOR SHARE holds the member against a concurrent shred until commit.
                found = await conn.fetchval(
                    "SELECT 1 FROM members WHERE member_id = $1 FOR SHARE", key
                )
                if found is None:
                    # As costly as the insert: a transaction id makes the commit
                    # write and flush a commit record, as a real insert would (a
                    # caller probing for accounts must not see the difference).
                    await conn.execute("SELECT pg_current_xact_id()")
                    return "no_member"
                if quota is not None and not await conn.fetchval(take, key, at, quota[1], quota[0]):
                    return "limited"
                if reset is not None:
                    await conn.execute(
                        "INSERT INTO password_resets (token_hash, member_id, expires_at) "
                        "VALUES ($1, $2, $3)",
                        token_hash,
                        key,
                        require_aware(reset.expires_at),
                    )
                await conn.execute(_INSERT_OUTBOX, *row)
        except asyncpg.ForeignKeyViolationError:
            return "no_member"
        return "queued"
