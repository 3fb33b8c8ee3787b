"""Key events, the key hierarchy's audit trail (part of
:class:`vault.store.contracts.keys.KeyStore`), once for both backends."""

from __future__ import annotations

import json

from vault.store._common import check_limit
from vault.store.rows import KeyEvent
from vault.store.sql.dialect import both
from vault.store.sql.executor import SqlExecutor

_RECORD = both(
    "INSERT INTO key_events (at, actor, operation, kek_version, member_id, details, caller) "
    "VALUES ($1, $2, $3, $4, $5, $6{jsonb}, $7)"
)
_LIST = both(
    "SELECT at, actor, operation, kek_version, member_id, details{text}, caller "
    "FROM key_events ORDER BY event_id DESC LIMIT $1"
)


class SqlKeyEvents(SqlExecutor):
    """Appended by key management, read newest first."""

    async def record_key_event(self, event: KeyEvent) -> None:
        d = self._dialect
        await self._run(
            _RECORD[d.name],
            d.time(event.at),
            event.actor,
            event.operation,
            event.kek_version,
            None if event.member_id is None else d.member_id(event.member_id),
            json.dumps(dict(event.details), sort_keys=True),
            event.caller,
        )

    async def list_key_events(self, limit: int = 100) -> list[KeyEvent]:
        d = self._dialect
        rows = await self._fetch(_LIST[d.name], check_limit(limit))
        return [
            KeyEvent(
                d.from_time(at),
                actor,
                operation,
                version,
                None if member is None else str(member),
                json.loads(details),
                caller,
            )
            for at, actor, operation, version, member, details, caller in rows
        ]
