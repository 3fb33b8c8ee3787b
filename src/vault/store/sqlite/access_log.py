"""SQLite: the member's access log."""

from __future__ import annotations

import sqlite3
from datetime import datetime
from typing import Any

from vault.store._common import (
    canonical_member_id,
    check_limit,
)
from vault.store.rows import (
    AccessEntryRow,
    NewAccessEntry,
)
from vault.store.sql.access_log import INSERT_ACCESS, entry_ciphertexts, optional_bytes
from vault.store.sqlite._db import _from_us, _SqliteDatabase, _to_us
from vault.store.sqlite._shared import (
    _member_has_dek,
)


class SqliteAccessLog(_SqliteDatabase):
    """SQLite: the member's access log."""

    # --- access log ------------------------------------------------------------
    async def append_access(self, member_id: str, entry: NewAccessEntry, *, dek_id: int) -> bool:
        member_id = canonical_member_id(member_id)
        params = (member_id, _to_us(entry.at), *entry_ciphertexts(entry))

        def work(conn: sqlite3.Connection) -> bool:
            if not _member_has_dek(conn, member_id, dek_id):
                return False
            conn.execute(
                INSERT_ACCESS["sqlite"],
                params,
            )
            return True

        return await self._write(work)

    async def list_access(
        self,
        member_id: str,
        limit: int,
        before: tuple[datetime, int] | None = None,
    ) -> list[AccessEntryRow]:
        member_id = canonical_member_id(member_id)
        limit = check_limit(limit)
        if before is None:
            query = (
                "SELECT entry_id, at, action_ct, ip_ct, caller_ct FROM access_log "
                "WHERE member_id = ? "
                "ORDER BY at DESC, entry_id DESC LIMIT ?"
            )
            params: tuple[Any, ...] = (member_id, limit)
        else:
            query = (
                "SELECT entry_id, at, action_ct, ip_ct, caller_ct FROM access_log "
                "WHERE member_id = ? AND (at, entry_id) < (?, ?) "
                "ORDER BY at DESC, entry_id DESC LIMIT ?"
            )
            params = (member_id, _to_us(before[0]), int(before[1]), limit)

        def work(conn: sqlite3.Connection) -> list[AccessEntryRow]:
            return [
                AccessEntryRow(
                    entry_id=int(r["entry_id"]),
                    at=_from_us(r["at"]),
                    action_ct=bytes(r["action_ct"]),
                    ip_ct=bytes(r["ip_ct"]),
                    caller_ct=optional_bytes(r["caller_ct"]),
                )
                for r in conn.execute(query, params)
            ]

        return self._read(work)
