"""Account recovery: reset tokens and the recovery-mail quota."""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

from vault.store.rows import (
    NewPasswordReset,
    OutboxMessage,
    RecoveryMailOutcome,
)


class RecoveryStore(Protocol):
    """Password-reset token hashes and recovery mail under a per-member quota."""

    async def create_password_reset(
        self, token_hash: bytes, member_id: str, expires_at: datetime, message: OutboxMessage
    ) -> bool:
        """Store a reset token's hash (32 bytes, SHA-256; never the token) and enqueue
        its e-mail ``message`` (for the same member) in one transaction. False, with
        nothing written, if the member is gone."""
        ...

    async def consume_password_reset(self, token_hash: bytes, now: datetime) -> str | None:
        """Atomically mark the token used and return its member id; None (and no
        change) if it is unknown, already used, or expired at ``now``. Of two
        concurrent calls with one token, at most one gets the member id."""
        ...

    async def queue_recovery_mail(
        self,
        message: OutboxMessage,
        *,
        limit: int,
        since: datetime,
        reset: NewPasswordReset | None = None,
    ) -> RecoveryMailOutcome:
        """Enqueue an account-recovery mail (a login-ID reminder; with ``reset``, a
        password reset and its token's hash, in the same transaction) unless the
        member is gone (``"no_member"``) or already had ``limit`` recovery mails
        queued after ``since`` (``"limited"``); then nothing is written. The count
        and the insert are one atomic step: concurrent calls, from any replica,
        never queue more than ``limit`` (``limit`` >= 1; the count is per member,
        kept in the database, and holds only times)."""
        ...

    async def find_password_reset(self, token_hash: bytes, now: datetime) -> str | None:
        """The member id of a token that is unused and unexpired at ``now``, without
        using it (only :meth:`consume_password_reset` does that); None otherwise."""
        ...
