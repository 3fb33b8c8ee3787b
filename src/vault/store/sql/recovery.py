"""Using and looking up reset tokens (part of
:class:`vault.store.contracts.recovery.RecoveryStore`), once for both backends.
Queueing recovery mail under the quota stays in the backends: its count and insert
are one atomic step, taken under a row lock (PostgreSQL) or the write lock (SQLite)."""

from __future__ import annotations

from datetime import datetime

from vault.store._common import check_token_hash
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
