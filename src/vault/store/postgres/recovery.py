"""PostgreSQL: the recovery-mail quota as an array of send times (the rest of
recovery is in vault.store.sql.recovery)."""

from __future__ import annotations

from typing import Any

from vault.store.postgres._db import _PostgresDatabase
from vault.store.sql.executor import Tx

# One statement counts and records: ON CONFLICT DO UPDATE locks the member's quota
# row and evaluates its WHERE on the newest version, so concurrent calls (on any
# replica) queue no more than the limit.
_TAKE = (
    "INSERT INTO recovery_mail_quota AS q (member_id, sent_at) "
    "VALUES ($1, ARRAY[$2::timestamptz]) "
    "ON CONFLICT (member_id) DO UPDATE "
    "SET sent_at = ARRAY(SELECT t FROM unnest(q.sent_at) AS t WHERE t > $3 ORDER BY t) "
    "|| $2::timestamptz "
    "WHERE (SELECT count(*) FROM unnest(q.sent_at) AS t WHERE t > $3) < $4 "
    "RETURNING true"
)


class PostgresRecovery(_PostgresDatabase):
    """PostgreSQL: the recovery-mail quota's bookkeeping."""

    async def _take_quota(self, tx: Tx, key: Any, at: Any, limit: int, since: Any) -> bool:
        return bool(await tx.fetchval(_TAKE, key, at, since, limit))
