"""Account recovery (:class:`vault.store.contracts.recovery.RecoveryStore`), once
for both backends: using and looking up reset tokens, and the checks in front of
queueing. The queueing transaction itself (``_recovery_mail``) stays in the
backends: its member check, quota count and inserts are one atomic step, under a
row lock (PostgreSQL) or the write lock (SQLite)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from vault.store._common import check_token_hash
from vault.store.rows import NewPasswordReset, OutboxMessage, RecoveryMailOutcome
from vault.store.sql import guards
from vault.store.sql.dialect import both
from vault.store.sql.executor import ForeignKeyViolation, SqlExecutor, Tx

# One conditional UPDATE: the check and the mark cannot be split; a concurrent
# consumer waits on the row lock (or the write lock), then finds used_at set.
_CONSUME = both(
    "UPDATE password_resets SET used_at = $2 WHERE token_hash = $1 "
    "AND used_at IS NULL AND expires_at > $2 RETURNING member_id"
)
_INSERT_RESET = both(
    "INSERT INTO password_resets (token_hash, member_id, expires_at) VALUES ($1, $2, $3)"
)
_FIND = both(
    "SELECT member_id FROM password_resets WHERE token_hash = $1 "
    "AND used_at IS NULL AND expires_at > $2"
)


class SqlRecoveryTokens(SqlExecutor):
    """A reset token's hash is used once, and looked up without being used."""

    async def _take_quota(self, tx: Tx, key: Any, at: Any, limit: int, since: Any) -> bool:
        """Inside the transaction: record a mail sent ``at`` unless ``limit`` were sent
        after ``since`` (times in the column's encoding); whether it was recorded."""
        raise NotImplementedError

    async def _recovery_mail(
        self,
        message: OutboxMessage,
        reset: NewPasswordReset | None,
        quota: tuple[int, Any] | None,
    ) -> RecoveryMailOutcome:
        """One transaction: the member check, the quota (limit, since in the column's
        encoding) when given, the reset row when given, the mail."""
        d = self._dialect
        row = guards.outbox_params(d, message)
        key, at = row[1], row[4]
        reset_row = (
            None
            if reset is None
            else (check_token_hash(reset.token_hash), key, d.time(reset.expires_at))
        )

        async def body(tx: Tx) -> RecoveryMailOutcome:
            # FOR SHARE holds the member against a concurrent shred until commit.
            if await tx.fetchval(guards.MEMBER_EXISTS[d.name], key) is None:
                await tx.decoy_write()  # as costly as the inserts
                return "no_member"
            if quota is not None and not await self._take_quota(tx, key, at, *quota):
                return "limited"
            if reset_row is not None:
                await tx.run(_INSERT_RESET[d.name], *reset_row)
            await tx.run(guards.INSERT_OUTBOX[d.name], *row)
            return "queued"

        try:
            return await self._in_transaction(body)
        except ForeignKeyViolation:
            return "no_member"

    async def create_password_reset(
        self, token_hash: bytes, member_id: str, expires_at: datetime, message: OutboxMessage
    ) -> bool:
        d = self._dialect
        if d.member_id(member_id) != d.member_id(message.member_id):
            raise ValueError("the message is for another member")
        reset = NewPasswordReset(token_hash, expires_at)
        return await self._recovery_mail(message, reset, None) == "queued"

    async def queue_recovery_mail(
        self,
        message: OutboxMessage,
        *,
        limit: int,
        since: datetime,
        reset: NewPasswordReset | None = None,
    ) -> RecoveryMailOutcome:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        return await self._recovery_mail(message, reset, (limit, self._dialect.time(since)))

    async def consume_password_reset(self, token_hash: bytes, now: datetime) -> str | None:
        d = self._dialect
        rows = await self._run_returning(
            _CONSUME[d.name], check_token_hash(token_hash), d.time(now)
        )
        return str(rows[0][0]) if rows else None

    async def find_password_reset(self, token_hash: bytes, now: datetime) -> str | None:
        d = self._dialect
        rows = await self._fetch(_FIND[d.name], check_token_hash(token_hash), d.time(now))
        return str(rows[0][0]) if rows else None
