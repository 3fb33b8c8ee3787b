"""The password threads: one per CPU the process may run on (its cpuset or taskset
mask), not one per CPU of the machine, which in a container pinned to fewer CPUs
would only make the hashing threads take turns."""

from __future__ import annotations

import os

import pytest

from vault import CHEAPEST, PasswordHasher

pytestmark = pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this platform"
)


def test_the_default_pool_has_one_thread_per_usable_cpu() -> None:
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(allowed)})  # this thread only; restored below
    try:
        pinned = PasswordHasher(CHEAPEST)
    finally:
        os.sched_setaffinity(0, allowed)
    unpinned, configured = PasswordHasher(CHEAPEST), PasswordHasher(CHEAPEST, workers=3)
    try:
        assert pinned.workers == 1
        assert unpinned.workers == len(allowed)
        assert configured.workers == 3  # the setting wins
    finally:
        for hasher in (pinned, unpinned, configured):
            hasher.close()
