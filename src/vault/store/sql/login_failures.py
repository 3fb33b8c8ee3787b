"""Brute-force counters (:class:`vault.store.contracts.login_failures.LoginFailureStore`),
written once for both backends, the failure's transaction included (the counters
and, for a known account, the member's access-log entry)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from vault.errors import KeyChanged
from vault.store._common import check_limit
from vault.store.contracts.login_failures import FailedLogin, FailureCount, LoginFailureState
from vault.store.sql import guards
from vault.store.sql.dialect import Dialect, both
from vault.store.sql.executor import MemberGone, SqlExecutor, Tx
from vault.store.sql.members import INSERT_ACCESS, entry_ciphertexts

# Both counters in one read (scalar subqueries: NULL where there is no row).
_STATE = both(
    "SELECT (SELECT failures FROM login_failures WHERE login_hmac = $1), "
    "(SELECT last_failure_at FROM login_failures WHERE login_hmac = $1), "
    "(SELECT failures FROM ip_failures WHERE ip_hmac = $2), "
    "(SELECT window_start FROM ip_failures WHERE ip_hmac = $2)"
)
# One statement counts: of concurrent failures each waits on the row (PostgreSQL)
# or the write lock (SQLite) and adds to the newest value, so none is lost.
_COUNT_FAILURE = both(
    "INSERT INTO login_failures (login_hmac, failures, last_failure_at) VALUES ($1, 1, $2) "
    "ON CONFLICT (login_hmac) DO UPDATE SET failures = login_failures.failures + 1, "
    "last_failure_at = excluded.last_failure_at RETURNING failures"
)
# A fixed window per IP: a window that started at or before $3 has ended, and the
# failure starts a new one.
_COUNT_IP_FAILURE = both(
    "INSERT INTO ip_failures (ip_hmac, window_start, failures) VALUES ($1, $2, 1) "
    "ON CONFLICT (ip_hmac) DO UPDATE SET "
    "failures = CASE WHEN ip_failures.window_start <= $3 THEN 1 "
    "ELSE ip_failures.failures + 1 END, "
    "window_start = CASE WHEN ip_failures.window_start <= $3 THEN excluded.window_start "
    "ELSE ip_failures.window_start END"
)
_CLEAR = both("DELETE FROM login_failures WHERE login_hmac = $1")
#: The counter of the member's login ID: with the shred (before the members row
#: goes) and with a password reset.
DELETE_MEMBER_FAILURES = both(
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


def _ip_row(d: Dialect, failure: FailedLogin) -> tuple[Any, ...] | None:
    """_COUNT_IP_FAILURE's arguments; None where no client IP is known."""
    if failure.ip_hmac is None:
        return None
    if failure.ip_window_since is None:
        raise ValueError("an IP failure needs its window")
    return (bytes(failure.ip_hmac), d.time(failure.at), d.time(failure.ip_window_since))


async def _append_entry(tx: Tx, d: Dialect, key: Any, dek_id: int, row: tuple[Any, ...]) -> bool:
    """The member's access-log entry, in the lock order (the members row, then the
    key row, then the entry); skipped (False), not failed, if the member is gone or
    ``dek_id`` is no longer its DEK: the count stands either way."""
    if await tx.fetchval(guards.MEMBER_EXISTS[d.name], key) is None:
        return False
    try:
        await guards.check_dek(tx, d, key, dek_id)
    except (MemberGone, KeyChanged):
        return False
    await tx.run(INSERT_ACCESS[d.name], *row)
    return True


class SqlLoginFailures(SqlExecutor):
    """Recording a failed login, and the counters' read, reset and purge."""

    async def record_login_failure(self, failure: FailedLogin) -> FailureCount:
        d = self._dialect
        at = d.time(failure.at)
        ip_row = _ip_row(d, failure)
        entry, member_id = failure.entry, failure.member_id
        key = None if member_id is None else d.member_id(member_id)
        log_row = None
        if entry is not None and key is not None:
            log_row = (key, at, *entry_ciphertexts(entry))

        async def body(tx: Tx) -> FailureCount:
            # The entry first (its member's rows, in the lock order), then the
            # counter rows, which no member transaction locks. One upsert counts:
            # concurrent failures wait on the row and add to the newest value.
            written = log_row is not None and await _append_entry(
                tx, d, key, failure.dek_id, log_row
            )
            failures = await tx.fetchval(_COUNT_FAILURE[d.name], bytes(failure.login_hmac), at)
            if ip_row is not None:
                await tx.run(_COUNT_IP_FAILURE[d.name], *ip_row)
            return FailureCount(int(failures), written)

        return await self._in_transaction(body)

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
