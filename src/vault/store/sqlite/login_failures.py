"""SQLite: recording a failed login (the counters and the access-log entry, one write)."""

from __future__ import annotations

import sqlite3

from vault.errors import KeyChanged
from vault.store._common import canonical_member_id
from vault.store.contracts.login_failures import FailedLogin, FailureCount
from vault.store.sql.login_failures import APPEND_ENTRY, COUNT_FAILURE, COUNT_IP_FAILURE
from vault.store.sqlite._db import _SqliteDatabase, _to_us
from vault.store.sqlite._shared import _member_has_dek

_COUNT, _COUNT_IP = COUNT_FAILURE["sqlite"], COUNT_IP_FAILURE["sqlite"]
_APPEND = APPEND_ENTRY["sqlite"]


class SqliteLoginFailures(_SqliteDatabase):
    """SQLite: one write transaction per failed login (the write lock serialises
    every counter update of the file)."""

    async def record_login_failure(self, failure: FailedLogin) -> FailureCount:
        at = _to_us(failure.at)
        entry = failure.entry
        member_id = None if failure.member_id is None else canonical_member_id(failure.member_id)
        ip = None
        if failure.ip_hmac is not None:
            if failure.ip_window_since is None:
                raise ValueError("an IP failure needs its window")
            ip = (bytes(failure.ip_hmac), at, _to_us(failure.ip_window_since))

        def work(conn: sqlite3.Connection) -> FailureCount:
            written = False
            if entry is not None and member_id is not None:
                try:
                    written = _member_has_dek(conn, member_id, failure.dek_id)
                except KeyChanged:
                    written = False
                if written:
                    conn.execute(
                        _APPEND, (member_id, at, bytes(entry.action_ct), bytes(entry.ip_ct))
                    )
            (failures,) = conn.execute(_COUNT, (bytes(failure.login_hmac), at)).fetchone()
            if ip is not None:
                conn.execute(_COUNT_IP, ip)
            return FailureCount(int(failures), written)

        return await self._write(work)
