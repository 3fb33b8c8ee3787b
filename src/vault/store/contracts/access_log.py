"""The member's access log and its 6-month rule."""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

from vault.store.contracts.idempotency import IdempotencyKey
from vault.store.rows import (
    AccessEntryRow,
    NewAccessEntry,
)


class AccessLogStore(Protocol):
    """The access log: appended by the member's actions, read in pages, purged after 6 months."""

    async def append_access(
        self,
        member_id: str,
        entry: NewAccessEntry,
        *,
        dek_id: int,
        idempotency: IdempotencyKey | None = None,
    ) -> bool:
        """False if no such member; KeyChanged as for update_member. With
        ``idempotency``, the key is stored in the same transaction (see
        IdempotencyStore)."""
        ...

    async def list_access(
        self,
        member_id: str,
        limit: int,
        before: tuple[datetime, int] | None = None,
    ) -> list[AccessEntryRow]:
        """Entries newest first (by ``at``, then ``entry_id``), strictly older than
        the ``(at, entry_id)`` cursor when given."""
        ...

    async def purge_access_log(self, before: datetime, limit: int) -> int:
        """Delete access-log entries older than ``before``; returns how many. Called in a
        loop until it returns less than ``limit``. Each call deletes at most ``limit``
        rows one by one in a short transaction; PostgreSQL first drops whole monthly
        partitions that lie entirely before ``before`` (their rows count too, so such a
        call can return more than ``limit``)."""
        ...

    async def count_access_log_before(self, before: datetime) -> int:
        """How many access-log entries are older than ``before`` (a dry run's count)."""
        ...
