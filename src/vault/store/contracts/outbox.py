"""The mail outbox."""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

from vault.store.rows import (
    OutboxMessage,
)


class OutboxStore(Protocol):
    """Queued mail: due, retried, sent."""

    async def enqueue_outbox(self, message: OutboxMessage) -> bool:
        """Add a message unless its member is gone; False then."""
        ...

    async def due_outbox(self, now: datetime, limit: int) -> list[OutboxMessage]:
        """Messages whose next attempt is due, oldest first."""
        ...

    async def outbox_sent(self, message_id: str) -> None:
        """Remove a message that was delivered (or dropped)."""
        ...

    async def outbox_retry(
        self, message_id: str, attempts: int, next_attempt_at: datetime
    ) -> None: ...

    async def outbox_depth(self, now: datetime) -> tuple[int, int]:
        """(messages waiting, of which due by ``now``): counts for the metrics."""
        ...
