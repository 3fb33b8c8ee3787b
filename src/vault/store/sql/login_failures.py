"""Brute-force counters (:class:`vault.store.contracts.login_failures.LoginFailureStore`),
written once for both backends. Recording a failure is one transaction in each
backend (it may append to the member's access log); its statements are here."""

from __future__ import annotations

from datetime import datetime

from vault.store._common import check_limit
from vault.store.contracts.login_failures import LoginFailureState
from vault.store.sql.dialect import both
from vault.store.sql.executor import SqlExecutor

# Both counters in one read (scalar subqueries: NULL where there is no row).
_STATE = both(
    "SELECT (SELECT failures FROM login_failures WHERE login_hmac = $1), "
    "(SELECT last_failure_at FROM login_failures WHERE login_hmac = $1), "
    "(SELECT failures FROM ip_failures WHERE ip_hmac = $2), "
    "(SELECT window_start FROM ip_failures WHERE ip_hmac = $2)"
)
# One statement counts: of concurrent failures each waits on the row (PostgreSQL)
# or the write lock (SQLite) and adds to the newest value, so none is lost.
COUNT_FAILURE = both(
    "INSERT INTO login_failures (login_hmac, failures, last_failure_at) VALUES ($1, 1, $2) "
    "ON CONFLICT (login_hmac) DO UPDATE SET failures = login_failures.failures + 1, "
    "last_failure_at = excluded.last_failure_at RETURNING failures"
)
# A fixed window per IP: a window that started at or before $3 has ended, and the
# failure starts a new one.
COUNT_IP_FAILURE = both(
    "INSERT INTO ip_failures (ip_hmac, window_start, failures) VALUES ($1, $2, 1) "
    "ON CONFLICT (ip_hmac) DO UPDATE SET "
    "failures = CASE WHEN ip_failures.window_start <= $3 THEN 1 "
    "ELSE ip_failures.failures + 1 END, "
    "window_start = CASE WHEN ip_failures.window_start <= $3 THEN excluded.window_start "
    "ELSE ip_failures.window_start END"
)
#: A failed login's access-log entry, in the failure's transaction.
APPEND_ENTRY = both(
    "INSERT INTO access_log (member_id, at, action_ct, ip_ct) VALUES ($1, $2, $3, $4)"
)
_CLEAR = both("DELETE FROM login_failures WHERE login_hmac = $1")
#: The member's shred, before the members row goes: its counter goes with it.
SHRED_FAILURES = both(
    "DELETE FROM login_failures WHERE login_hmac = "
    "(SELECT login_hmac FROM members WHERE member_id = $1)"
)
_PURGE_COUNTERS = both(
    "DELETE FROM login_failures WHERE login_hmac IN (SELECT f.login_hmac FROM "
    "login_failures AS f WHERE f.last_failure_at < $1 AND NOT EXISTS "
    "(SELECT 1 FROM members AS m WHERE m.login_hmac = f.login_hmac) LIMIT $2)"
)
_PURGE_IPS = both(
    "DELETE FROM ip_failures WHERE ip_hmac IN "
    "(SELECT ip_hmac FROM ip_failures WHERE window_start < $1 LIMIT $2)"
)


class SqlLoginFailures(SqlExecutor):
    """The counters' read, reset and purge."""

    async def login_failure_state(
        self, login_hmac: bytes, ip_hmac: bytes | None
    ) -> LoginFailureState:
        d = self._dialect
        ip = None if ip_hmac is None else bytes(ip_hmac)
        ((failures, last, ip_failures, window),) = await self._fetch(
            _STATE[d.name], bytes(login_hmac), ip
        )
        return LoginFailureState(
            failures=int(failures or 0),
            last_failure_at=None if last is None else d.from_time(last),
            ip_failures=int(ip_failures or 0),
            ip_window_start=None if window is None else d.from_time(window),
        )

    async def clear_login_failures(self, login_hmac: bytes) -> None:
        await self._run(_CLEAR[self._dialect.name], bytes(login_hmac))

    async def purge_login_failures(self, before: datetime, limit: int) -> int:
        d = self._dialect
        limit = check_limit(limit)
        purged = await self._run(_PURGE_COUNTERS[d.name], d.time(before), limit)
        if purged < limit:
            purged += await self._run(_PURGE_IPS[d.name], d.time(before), limit - purged)
        return purged
