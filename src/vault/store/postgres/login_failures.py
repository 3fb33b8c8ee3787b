"""PostgreSQL: recording a failed login (the counters and the access-log entry, one
transaction)."""

from __future__ import annotations

import asyncpg

from vault.errors import KeyChanged
from vault.store._common import require_aware
from vault.store.contracts.login_failures import FailedLogin, FailureCount
from vault.store.postgres._db import _PostgresDatabase, _uuid
from vault.store.postgres._shared import _check_dek, _MemberGone
from vault.store.sql.login_failures import APPEND_ENTRY, COUNT_FAILURE, COUNT_IP_FAILURE

_COUNT, _COUNT_IP = COUNT_FAILURE["postgres"], COUNT_IP_FAILURE["postgres"]
_APPEND = APPEND_ENTRY["postgres"]


class PostgresLoginFailures(_PostgresDatabase):
    """PostgreSQL: one transaction per failed login. The lock order of the
    package docstring holds: the access-log entry (members row, then key row)
    comes before the counter rows, which no member transaction locks first."""

    async def record_login_failure(self, failure: FailedLogin) -> FailureCount:
        at = require_aware(failure.at)
        entry = failure.entry
        if failure.ip_hmac is not None and failure.ip_window_since is None:
            raise ValueError("an IP failure needs its window")
        async with self._transaction() as conn:
            written = False
            if entry is not None and failure.member_id is not None:
                key = _uuid(failure.member_id)
                try:
                    async with conn.transaction():  # a savepoint: the count stands
                        await conn.execute(
                            _APPEND, key, at, bytes(entry.action_ct), bytes(entry.ip_ct)
                        )
                        await _check_dek(conn, key, failure.dek_id)
                    written = True
                except (asyncpg.ForeignKeyViolationError, _MemberGone, KeyChanged):
                    written = False
            failures = await conn.fetchval(_COUNT, bytes(failure.login_hmac), at)
            if failure.ip_hmac is not None:
                assert failure.ip_window_since is not None
                await conn.execute(
                    _COUNT_IP, bytes(failure.ip_hmac), at, require_aware(failure.ip_window_since)
                )
        return FailureCount(int(failures), written)
