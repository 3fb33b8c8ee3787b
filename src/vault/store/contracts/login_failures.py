"""Brute-force protection: failure counters per account and per client IP."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from vault.store.rows import NewAccessEntry


@dataclass(frozen=True, slots=True)
class LoginFailureState:
    """What is counted against one login attempt: the account's consecutive
    failures (0 if none) and when the last one was, and the client IP's failures
    in its current window and when that window started (0 / None if none)."""

    failures: int = 0
    last_failure_at: datetime | None = None
    ip_failures: int = 0
    ip_window_start: datetime | None = None


@dataclass(frozen=True, slots=True)
class FailedLogin:
    """One failed password check. ``ip_hmac`` is None where no client IP is known
    (ChangePassword, Withdraw); ``ip_window_since`` is when a window starting at or
    before it has ended. ``entry`` is the member's access-log entry (for a known
    account), sealed under DEK ``dek_id`` of ``member_id``."""

    login_hmac: bytes
    at: datetime
    ip_hmac: bytes | None = None
    ip_window_since: datetime | None = None
    member_id: str | None = None
    entry: NewAccessEntry | None = None
    dek_id: int = 0

    def __repr__(self) -> str:
        return f"<FailedLogin at={self.at.isoformat()}>"


@dataclass(frozen=True, slots=True)
class FailureCount:
    """The account's consecutive failures after the one recorded, and whether its
    access-log entry was written (False: the member is gone or its DEK changed)."""

    failures: int
    entry_written: bool


class LoginFailureStore(Protocol):
    """Counters in the database, so they hold across replicas. Keyed by HMACs
    (the login ID's blind index, the IP's HMAC): no PII."""

    async def login_failure_state(
        self, login_hmac: bytes, ip_hmac: bytes | None
    ) -> LoginFailureState:
        """The account's and the IP's counters, in one read."""
        ...

    async def record_login_failure(self, failure: FailedLogin) -> FailureCount:
        """One transaction: the account's counter +1 (one atomic upsert: concurrent
        failures, on any replica, are all counted), the IP's window +1 (a window
        that started at or before ``ip_window_since`` starts again at ``at``), and
        the access-log entry when given (skipped, not failed, if the member is gone
        or ``dek_id`` is no longer its DEK)."""
        ...

    async def clear_login_failures(self, login_hmac: bytes) -> None:
        """Forget the account's failures (a successful login, a password reset)."""
        ...

    async def purge_login_failures(self, before: datetime, limit: int) -> int:
        """Delete at most ``limit`` counters whose last failure is before ``before``
        and that no member's login ID has (a member's counter stays until a
        success, a reset or the shred), and IP windows that started before
        ``before``; returns how many rows went."""
        ...
