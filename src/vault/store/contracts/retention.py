"""The separated retention store (a database of its own)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Protocol

from vault.store.rows import (
    KekUsage,
    MemberKeyRow,
    RetainedMember,
    RetainedSummary,
    RetentionEvent,
    RewrapUpdate,
)


class RetentionStore(Protocol):
    """The separated storage for withdrawn members' retained data (policy section 6):
    a database of its own, which no member API reads. Same conventions as Store.

    Its wrapped DEKs are under the vault's KEK versions, so key management re-wraps
    them (``member_keys_to_rewrap`` / ``apply_rewrap``, as on Store) and the destroy
    guard counts them (``kek_usage``).
    """

    async def close(self) -> None: ...

    async def migrate(self) -> list[int]: ...

    async def put_retained(self, member: RetainedMember, stale_before: datetime) -> bool:
        """Insert the copy unconfirmed, in one transaction. An unconfirmed copy of the
        same member is replaced if the same attempt wrote it (a retry after
        KeyChanged) or it was made before ``stale_before`` (a crash's leftover; the
        caller has just seen the member alive in the vault). False, with nothing
        changed, if a confirmed copy or another attempt's recent copy is there."""
        ...

    async def confirm_retained(self, member_id: str) -> bool:
        """Mark the copy confirmed (the vault's shred committed). False if none."""
        ...

    async def get_retained(self, member_id: str) -> RetainedMember | None: ...

    async def list_retained(
        self, limit: int, after_member_id: str | None = None
    ) -> list[RetainedSummary]:
        """Confirmed and unconfirmed copies by member id, after the cursor when given."""
        ...

    async def retained_due(self, now: datetime, limit: int) -> list[str]:
        """Confirmed copies whose destroy-after time is at or before ``now``, oldest
        first (indexed: a sweep costs what is due)."""
        ...

    async def unconfirmed_before(self, before: datetime, limit: int) -> list[str]:
        """Unconfirmed copies made before ``before`` (left by a crash)."""
        ...

    async def delete_retained(self, member_id: str, *, attempt: str | None = None) -> bool:
        """Destroy the copy (its wrapped DEK with it) in one transaction, then scrub
        what the backend can; False if there was none. With ``attempt``, only an
        unconfirmed copy that attempt wrote."""
        ...

    async def purge_access_log(self, before: datetime, limit: int) -> int:
        """As Store.purge_access_log: the 6-month rule holds in retention too."""
        ...

    async def count_access_log_before(self, before: datetime) -> int: ...

    async def kek_usage(self) -> list[KekUsage]:
        """Per KEK version holding retained DEKs: ``retained_keys`` counts them."""
        ...

    async def member_keys_to_rewrap(
        self, target_version: int, after_member_id: str | None, limit: int
    ) -> list[MemberKeyRow]: ...

    async def apply_rewrap(self, updates: Sequence[RewrapUpdate]) -> int: ...

    async def record_event(self, event: RetentionEvent) -> None: ...

    async def list_events(self, member_id: str | None = None) -> list[RetentionEvent]:
        """Oldest first."""
        ...
