"""The sidecar's lease."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Protocol


class LeaseStore(Protocol):
    """A named lease row: one holder at a time, across processes and hosts."""

    async def acquire_lease(self, name: str, holder: str, now: datetime, ttl: timedelta) -> bool:
        """Take or renew the lease row ``name`` for ``holder`` until now + ttl, if it
        is free, expired, or already ``holder``'s. One portable conditional write
        (no advisory locks): of two sidecars, exactly one gets True."""
        ...

    async def release_lease(self, name: str, holder: str) -> None: ...
