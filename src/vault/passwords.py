"""Password hashing with argon2id, off the event loop, behind a bounded queue.

The encoded hash is then encrypted under the member's DEK by the vault, so
shredding the member destroys it too.

Each hash or verification takes a slot; past ``queue_limit`` slots (running or
waiting) a call is refused at once with :class:`~vault.errors.Overloaded` rather
than queued behind work that would outlast every caller's deadline. The slot is
taken and the job submitted on the caller's thread (no extra hand-off), and given
back by the worker when the job is done, cancelled or not.
"""

from __future__ import annotations

import asyncio
import math
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from argon2 import PasswordHasher as _Argon2Hasher
from argon2 import Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from vault.errors import Overloaded

#: The default queue: this many jobs (running or waiting) per worker thread.
QUEUE_PER_WORKER = 8
#: The bounds of the retry delay suggested to a refused caller, in seconds.
MIN_RETRY_AFTER, MAX_RETRY_AFTER = 0.1, 5.0
_R = TypeVar("_R")
# Weight of the newest job in the running mean of a job's duration.
_MEAN_WEIGHT = 0.1


def usable_cpus(
    proc_cgroup: Path = Path("/proc/self/cgroup"), cgroup_root: Path = Path("/sys/fs/cgroup")
) -> int:
    """The CPUs this process may use, not the machine's: the CPUs it may run on (a
    cpuset, taskset), and at most its cgroup's CPU quota rounded up (a Kubernetes CPU
    limit, ``docker --cpus``). More hashing threads than that only take turns, and the
    queue (QUEUE_PER_WORKER a thread) would admit work the quota cannot finish."""
    if hasattr(os, "sched_getaffinity"):
        cpus = len(os.sched_getaffinity(0)) or 1
    else:
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota(proc_cgroup, cgroup_root)
    return cpus if quota is None else max(1, min(cpus, math.ceil(quota)))


def cgroup_cpu_quota(proc_cgroup: Path, cgroup_root: Path) -> float | None:
    """The lowest CPU quota (in CPUs) on this process's cgroup and its ancestors, cgroup
    v2 (cpu.max) or v1 (cpu.cfs_quota_us / cpu.cfs_period_us); None without one, or
    where it cannot be read."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    quotas: list[float] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # v2: one hierarchy
            base, read = cgroup_root, _v2_quota
        elif "cpu" in controllers.split(","):  # v1: the cpu controller's own mount
            base, read = cgroup_root / controllers, _v1_quota
        else:
            continue
        here = base / path.lstrip("/")
        for directory in (here, *here.parents):
            if directory != base and base not in directory.parents:
                break
            if (quota := read(directory)) is not None:
                quotas.append(quota)
    return min(quotas) if quotas else None


def _v2_quota(directory: Path) -> float | None:
    try:
        quota, period = (directory / "cpu.max").read_text().split()
        return int(quota) / int(period) if quota != "max" and int(period) > 0 else None
    except (OSError, ValueError):
        return None


def _v1_quota(directory: Path) -> float | None:
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


@dataclass(frozen=True, slots=True)
class Argon2Profile:
    """argon2id cost parameters; memory_cost is in KiB."""

    time_cost: int
    memory_cost: int
    parallelism: int

    def __post_init__(self) -> None:
        if self.time_cost < 1 or self.parallelism < 1 or self.memory_cost < 8 * self.parallelism:
            raise ValueError("argon2 needs time_cost >= 1, parallelism >= 1, memory >= 8*p KiB")


#: OWASP's recommended argon2id profile: m=19 MiB, t=2, p=1. The default.
OWASP = Argon2Profile(time_cost=2, memory_cost=19 * 1024, parallelism=1)
#: Only for tests: as cheap as argon2 allows.
CHEAPEST = Argon2Profile(time_cost=1, memory_cost=8, parallelism=1)


@dataclass(frozen=True, slots=True)
class PasswordStats:
    """Counts since start: jobs admitted (hashes, verifications, the decoy's
    included), jobs refused because the queue was full, and jobs in flight now;
    and the pool's threads."""

    hashed: int
    verified: int
    refused: int
    in_flight: int
    workers: int


class PasswordHasher:
    """argon2id on a dedicated thread pool; argon2-cffi releases the GIL while hashing."""

    def __init__(
        self,
        profile: Argon2Profile = OWASP,
        *,
        workers: int | None = None,
        queue_limit: int | None = None,
    ) -> None:
        self.profile = profile
        self.workers = workers or usable_cpus()
        self.queue_limit = queue_limit or QUEUE_PER_WORKER * self.workers
        if self.workers < 1 or self.queue_limit < 1:
            raise ValueError("workers and queue_limit must be at least 1")
        self._hasher = _Argon2Hasher(
            time_cost=profile.time_cost,
            memory_cost=profile.memory_cost,
            parallelism=profile.parallelism,
            hash_len=32,
            salt_len=16,
            type=Type.ID,
        )
        self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="argon2")
        # Slots are given back from worker threads: the counters share one lock.
        self._lock = threading.Lock()
        self._in_flight = 0
        self._hashed = self._verified = self._refused = 0
        # Verified against when the login ID is unknown, so that costs what a
        # wrong password costs. Timed: the first estimate of a job's duration.
        started = time.perf_counter()
        self._decoy = self._hasher.hash(os.urandom(16).hex())
        self._mean_seconds = time.perf_counter() - started
        # Everything up to the salt names the parameters; a hash that starts the
        # same way and is as long was made with the current ones.
        self._current_prefix = self._decoy[
            : self._decoy.rindex("$", 0, self._decoy.rindex("$")) + 1
        ]

    @property
    def stats(self) -> PasswordStats:
        with self._lock:
            return PasswordStats(
                self._hashed, self._verified, self._refused, self._in_flight, self.workers
            )

    def _admit(self, hashing: bool) -> None:
        """Take a slot, or refuse at once with the time the queue needs to drain."""
        with self._lock:
            if self._in_flight >= self.queue_limit:
                self._refused += 1
                drain = self._in_flight / self.workers * self._mean_seconds
                raise Overloaded(
                    min(max(drain, MIN_RETRY_AFTER), MAX_RETRY_AFTER), "password_hashing"
                )
            self._in_flight += 1
            if hashing:
                self._hashed += 1
            else:
                self._verified += 1

    def _done(self, seconds: float | None) -> None:
        with self._lock:
            self._in_flight -= 1
            if seconds is not None:
                self._mean_seconds += _MEAN_WEIGHT * (seconds - self._mean_seconds)

    def _timed(self, fn: Callable[..., _R], *args: str) -> _R:
        started = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self._done(time.perf_counter() - started)

    async def _run(self, hashing: bool, fn: Callable[..., _R], *args: str) -> _R:
        self._admit(hashing)
        try:
            job: Future[_R] = self._pool.submit(self._timed, fn, *args)
        except BaseException:
            self._done(None)
            raise

        def cancelled(done: Future[_R]) -> None:
            # A job cancelled before it started never ran _timed: give its slot back.
            if done.cancelled():
                self._done(None)

        job.add_done_callback(cancelled)
        return await asyncio.wrap_future(job)

    async def hash(self, password: str) -> str:
        return str(await self._run(True, self._hasher.hash, password))

    def _verify(self, encoded: str, password: str) -> bool:
        try:
            return bool(self._hasher.verify(encoded, password))
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    async def verify(self, encoded: str, password: str) -> bool:
        return await self._run(False, self._verify, encoded, password)

    async def verify_decoy(self, password: str) -> bool:
        """Burn the time of one verification; always False."""
        await self._run(False, self._verify, self._decoy, password)
        return False

    def needs_rehash(self, encoded: str) -> bool:
        if len(encoded) == len(self._decoy) and encoded.startswith(self._current_prefix):
            return False
        try:
            return bool(self._hasher.check_needs_rehash(encoded))
        except InvalidHashError:
            return True

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
