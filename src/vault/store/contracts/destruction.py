"""Crypto-shredding and the destruction records."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Protocol

from vault.store.rows import (
    DestructionRecord,
    RetentionCheck,
)


class DestructionStore(Protocol):
    """Shredding a member, tombstones and destruction records."""

    async def shred_member(
        self,
        member_id: str,
        destroyed_at: datetime,
        reason: str,
        *,
        last_seen_before: datetime | None = None,
        retention: RetentionCheck | None = None,
        withdrawal: bool = False,
    ) -> DestructionRecord | None:
        """Crypto-shred: in one transaction delete the member's DEK rows, blind
        indexes, ciphertexts, consents, access log, pending mail and password
        reset tokens, corrections; leave a tombstone and a
        destruction record. Then scrub what the backend can (SQLite: WAL
        checkpoint). None if no such member (already shredded or never was), or if
        ``last_seen_before`` is given and the member connected at or after it (checked
        in the same transaction: an expiry never shreds a member who just logged in).

        With ``retention`` (a withdrawal whose data was copied to the retention
        store), the record carries ``retained_until``; KeyChanged, with nothing
        changed, if the member no longer matches the check (see RetentionCheck).

        ``withdrawal``: the member withdrew; if they consent to STATISTICS at this
        moment, the withdrawals of the day (UTC) of ``destroyed_at`` count one more
        (StatisticsStore), in the same transaction."""
        ...

    async def record_destruction(
        self, record: DestructionRecord, *, unless: Sequence[str] = ()
    ) -> bool:
        """Add a destruction record for something destroyed elsewhere (the retained
        copy), unless the member already has one with the same reason or one of the
        ``unless`` reasons (the same destruction recorded by another path): False then."""
        ...

    async def is_destroyed(self, member_id: str) -> bool:
        """Whether a tombstone exists for the member."""
        ...

    async def list_destruction_records(
        self, member_id: str | None = None
    ) -> list[DestructionRecord]:
        """Destruction records, oldest first; only the member's when given."""
        ...
