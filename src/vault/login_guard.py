"""The one place a member's password is checked, and the brute-force rules around it.

Every password check (Authenticate, ChangePassword, Withdraw, an e-mail change)
goes through :meth:`LoginGuard.check`, so every failure counts toward the one
counter of the account and no RPC is a way around the lockout:

- the counter is per account, keyed by the login ID's blind index (an unknown
  login ID is counted alike), in the database (it holds across replicas) and
  bumped by one atomic upsert (parallel guesses are all counted);
- from ``lock_after`` consecutive failures on, the account is locked for a period
  that doubles with each further failure (``lock_base``, at most ``lock_max``)
  from the last one; from ``permanent_after`` on, until a password reset. A
  refused attempt during a lock is a failure too. A success (outside a lock)
  clears the counter; so do a reset (in the new password's own transaction) and
  the member's shred; nothing else;
- a locked account answers exactly like a wrong password: the same error, after
  the same work (the argon2 verification runs, and the failure is recorded);
- a client IP with ``ip_failure_limit`` failed logins (on any accounts) in its
  window is refused (TooManyAttempts, with the time until the window ends) before
  any password is checked. Only failures count: the logins of a busy NAT succeed
  and do not use it up, and a success does not reset it (else one valid account
  would reset an attacker's throttle between guesses).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

import structlog

from vault import _hazmat, member_cipher
from vault.activity import Activity
from vault.clock import Clock
from vault.errors import AuthenticationFailed, TooManyAttempts
from vault.member_keys import MemberKeys
from vault.passwords import PasswordHasher
from vault.store.contracts.access_log import AccessLogStore
from vault.store.contracts.login_failures import (
    FailedLogin,
    LoginFailureState,
    LoginFailureStore,
)
from vault.store.rows import MemberRow

log = structlog.get_logger("vault")

#: NIST SP 800-63B's ceiling of consecutive failures.
MAX_PERMANENT_AFTER = 100
#: Counters and IP windows older than this are purged (unknown IDs only), so no
#: IP window may be longer.
STALE_COUNTERS = timedelta(days=1)
#: Access-log actions of a failed password check.
LOGIN_FAILED, PASSWORD_CHECK_FAILED = "login.failed", "password_check.failed"
_MAX_DOUBLINGS = 40


@dataclass(frozen=True, slots=True)
class LoginGuardSettings:
    lock_after: int = 10
    lock_base: timedelta = timedelta(minutes=1)
    lock_max: timedelta = timedelta(hours=1)
    permanent_after: int = MAX_PERMANENT_AFTER
    ip_failure_limit: int = 100
    ip_window: timedelta = timedelta(minutes=15)

    def __post_init__(self) -> None:
        if not 1 <= self.lock_after < self.permanent_after <= MAX_PERMANENT_AFTER:
            raise ValueError("need 1 <= lock_after < permanent_after <= 100")
        if not timedelta(0) < self.lock_base <= self.lock_max:
            raise ValueError("need 0 < lock_base <= lock_max")
        if self.ip_failure_limit < 1 or not timedelta(0) < self.ip_window <= STALE_COUNTERS:
            raise ValueError("need ip_failure_limit >= 1 and 0 < ip_window <= 1 day")

    def lock_period(self, failures: int) -> timedelta:
        """How long ``failures`` consecutive failures lock the account (from the last)."""
        if failures < self.lock_after:
            return timedelta(0)
        doublings = min(failures - self.lock_after, _MAX_DOUBLINGS)
        return min(self.lock_base * (1 << doublings), self.lock_max)


class LoginGuardStores(LoginFailureStore, AccessLogStore, Protocol):
    """The counters, and the access log for a failure the counter's transaction
    could not log (the member's key changed meanwhile)."""


class LoginGuard:
    """Checks passwords under the failure counters (see the module docstring)."""

    def __init__(
        self,
        store: LoginGuardStores,
        hasher: PasswordHasher,
        member_keys: MemberKeys,
        clock: Clock,
        settings: LoginGuardSettings,
        ip_key: _hazmat.MacKey,
        decoy: tuple[_hazmat.SecretKey, bytes],
        activity: Activity | None = None,
    ) -> None:
        self._store = store
        self._activity = activity or Activity()
        self._hasher = hasher
        self._member_keys = member_keys
        self._clock = clock
        self.settings = settings
        self._ip_key = ip_key
        self._decoy_key, self._decoy_ct = decoy

    def ip_hmac(self, ip: str) -> bytes:
        """The IP as stored: an HMAC under a key of its own (never the address)."""
        return _hazmat.keyed_digest(self._ip_key, b"pv.client-ip\x00" + ip.encode())

    def locked(self, state: LoginFailureState, now: datetime) -> bool:
        s = self.settings
        if state.failures >= s.permanent_after:
            return True
        last = state.last_failure_at
        return last is not None and now < last + s.lock_period(state.failures)

    def _throttle(self, state: LoginFailureState, now: datetime) -> None:
        start, window = state.ip_window_start, self.settings.ip_window
        if start is None or state.ip_failures < self.settings.ip_failure_limit:
            return
        if now < start + window:
            self._activity.login_throttled += 1
            raise TooManyAttempts((start + window - now).total_seconds())

    async def check(
        self,
        login_hmac: bytes,
        found: tuple[MemberRow, _hazmat.SecretKey] | None,
        password: str,
        ip: str | None = None,
        action: str = PASSWORD_CHECK_FAILED,
    ) -> str:
        """The member's encoded password hash if ``password`` is right and the account
        is not locked; AuthenticationFailed otherwise (wrong, unknown or locked: one
        error after the same work). ``found`` is the member and its DEK, None for an
        unknown login ID; ``ip`` the client's canonical IP where one is known."""
        ip_hmac = None if ip is None else self.ip_hmac(ip)
        state = await self._store.login_failure_state(login_hmac, ip_hmac)
        if ip_hmac is not None:
            self._throttle(state, self._clock.now())
        if found is None:
            # Same work as a wrong password: a decryption and a verification.
            _hazmat.open_field(self._decoy_key, "decoy", "password_hash", self._decoy_ct)
            await self._hasher.verify_decoy(password)
            encoded, right = "", False
        else:
            row, dek = found
            encoded = member_cipher.open_row_field(dek, row, "password_hash")
            right = await self._hasher.verify(encoded, password)
        locked = self.locked(state, self._clock.now())
        if right and not locked:
            if state.failures:
                await self._store.clear_login_failures(login_hmac)
            return encoded
        failures = await self._record_failure(login_hmac, found, ip, ip_hmac, action)
        self._activity.login_failures += 1
        if not locked and failures >= self.settings.lock_after:
            self._activity.lockouts += 1  # this failure locked it
        raise AuthenticationFailed

    async def _record_failure(
        self,
        login_hmac: bytes,
        found: tuple[MemberRow, _hazmat.SecretKey] | None,
        ip: str | None,
        ip_hmac: bytes | None,
        action: str,
    ) -> int:
        """Record the failure; the account's consecutive failures now."""
        now = self._clock.now()
        failure = FailedLogin(
            login_hmac, now, ip_hmac, None if ip_hmac is None else now - self.settings.ip_window
        )
        if found is not None:
            row, dek = found
            mid = row.member_id
            entry = member_cipher.seal_access(dek, mid, now, action, ip or "")
            failure = FailedLogin(
                login_hmac, now, ip_hmac, failure.ip_window_since, mid, entry, row.key.dek_id
            )
        count = await self._store.record_login_failure(failure)
        if found is not None and not count.entry_written:
            await self._log_again(found[0].member_id, now, action, ip or "")
        return count.failures

    async def _log_again(self, member_id: str, at: datetime, action: str, ip: str) -> None:
        """The member's key changed under the failure: log it under the new key
        (the count stands). A member shredded meanwhile has no log to write."""

        async def write(row: MemberRow, key: _hazmat.SecretKey) -> bool:
            entry = member_cipher.seal_access(key, member_id, at, action, ip)
            return await self._store.append_access(member_id, entry, dek_id=row.key.dek_id)

        try:
            await self._member_keys.under_current_key(member_id, write)
        except Exception as exc:  # noqa: BLE001 - the failure is counted; say so and go on
            log.warning("failed_login_not_logged", member_id=member_id, error=type(exc).__name__)
