"""SQLite: the recovery-mail quota as a JSON list of send times (the rest of
recovery is in vault.store.sql.recovery)."""

from __future__ import annotations

import json
from typing import Any

from vault.store.sql.executor import Tx
from vault.store.sqlite._db import _SqliteDatabase

_SENT = "SELECT sent_at FROM recovery_mail_quota WHERE member_id = ?"
_RECORD = (
    "INSERT INTO recovery_mail_quota (member_id, sent_at) VALUES (?, ?) "
    "ON CONFLICT (member_id) DO UPDATE SET sent_at = excluded.sent_at"
)


class SqliteRecovery(_SqliteDatabase):
    """SQLite: the recovery-mail quota's bookkeeping. BEGIN IMMEDIATE serialises
    every writer of the file, so the count and the insert cannot be split."""

    async def _take_quota(self, tx: Tx, key: Any, at: Any, limit: int, since: Any) -> bool:
        sent = await tx.fetchval(_SENT, key)
        recent = [] if sent is None else [int(t) for t in json.loads(sent) if t > since]
        if len(recent) >= limit:
            return False
        await tx.run(_RECORD, key, json.dumps([*recent, at]))
        return True
