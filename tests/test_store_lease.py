"""The LeaseStore contract: the sidecar's lease. Every test that uses the ``store`` or
``store_url`` fixture runs once on SQLite and once on PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from store_support import (
    T0,
    ts,
)

from vault.store import (
    Store,
)


async def test_lease_is_exclusive_until_it_expires(vault: Store) -> None:
    ttl = timedelta(seconds=60)
    assert await vault.acquire_lease("lifecycle", "a", T0, ttl) is True
    assert await vault.acquire_lease("lifecycle", "b", ts(30), ttl) is False
    # The holder renews; the lease moves on from the renewal.
    assert await vault.acquire_lease("lifecycle", "a", ts(50), ttl) is True
    assert await vault.acquire_lease("lifecycle", "b", ts(100), ttl) is False
    # Expired: anyone takes it.
    assert await vault.acquire_lease("lifecycle", "b", ts(110), ttl) is True
    assert await vault.acquire_lease("lifecycle", "a", ts(120), ttl) is False
    # Other names are independent.
    assert await vault.acquire_lease("other", "a", ts(120), ttl) is True


async def test_release_frees_only_the_holders_lease(vault: Store) -> None:
    ttl = timedelta(seconds=60)
    assert await vault.acquire_lease("lifecycle", "a", T0, ttl)
    await vault.release_lease("lifecycle", "b")  # not b's: no effect
    assert await vault.acquire_lease("lifecycle", "b", ts(1), ttl) is False
    await vault.release_lease("lifecycle", "a")
    assert await vault.acquire_lease("lifecycle", "b", ts(2), ttl) is True


async def test_exactly_one_of_concurrent_acquirers_wins(vault: Store) -> None:
    for round_ in range(5):
        name = f"race-{round_}"
        results = await asyncio.gather(
            *(vault.acquire_lease(name, f"h{i}", T0, timedelta(seconds=60)) for i in range(8))
        )
        assert sum(results) == 1
    # And of concurrent takers of an expired lease.
    results = await asyncio.gather(
        *(vault.acquire_lease("race-0", f"x{i}", ts(3600), timedelta(seconds=60)) for i in range(8))
    )
    assert sum(results) == 1
