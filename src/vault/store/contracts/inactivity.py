"""Inactivity: the notices and the expiry of inactive members."""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

from vault.store.rows import (
    OutboxMessage,
)


class InactivityStore(Protocol):
    """The inactivity sweep's reads and its notice write."""

    async def members_due_for_notice(
        self, last_seen_before: datetime, limit: int
    ) -> list[tuple[str, datetime]]:
        """(member_id, last_seen_at) of members inactive since before the cutoff who
        have no pending inactivity notice, oldest first (indexed; the sweep's cost
        follows the due members, not the total)."""
        ...

    async def record_inactivity_notice(
        self, member_id: str, last_seen_at: datetime, message: OutboxMessage
    ) -> bool:
        """Mark the notice sent and enqueue its e-mail in one transaction, only if
        the member's last_seen_at is still ``last_seen_at`` (no login since) and no
        notice is pending. False otherwise."""
        ...

    async def members_due_for_expiry(
        self, last_seen_before: datetime, noticed_before: datetime, limit: int
    ) -> list[str]:
        """Members inactive since before ``last_seen_before`` whose notice went out
        before ``noticed_before`` (a login clears the notice), oldest first."""
        ...
