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
from vault.store.sql.dialect import both
from vault.store.sql.executor import SqlExecutor

# One conditional UPDATE: the check and the mark cannot be split; a concurrent
# consumer waits on the row lock (or the write lock), then finds used_at set.
_CONSUME = both(
    "UPDATE password_resets SET used_at = $2 WHERE token_hash = $1 "
    "AND used_at IS NULL AND expires_at > $2 RETURNING member_id"
)
_FIND = both(
    "SELECT member_id FROM password_resets WHERE token_hash = $1 "
    "AND used_at IS NULL AND expires_at > $2"
)


class SqlRecoveryTokens(SqlExecutor):
    """A reset token's hash is used once, and looked up without being used."""

    async def _recovery_mail(
        self,
        message: OutboxMessage,
        reset: NewPasswordReset | None,
        quota: tuple[int, Any] | None,
    ) -> RecoveryMailOutcome:
        """The backend's one transaction: the member check, the quota (limit, since
        in the column's encoding) when given, the reset row when given, the mail."""
        raise NotImplementedError

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
