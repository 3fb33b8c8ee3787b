"""Multi-process grpc.aio load driver and the raw argon2id baselines it is compared with.

``run_schedule`` runs one interleaved schedule of slices (see ``Slice``) in spawned
processes: P load workers, each with one grpc.aio channel per server and C concurrent
in-flight calls of the slice's RPC, and, when the schedule has raw slices, one argon2-cffi
process with os.cpu_count() threads (argon2-cffi releases the GIL). The processes stay up
for the whole schedule and each runs only its own slices, so a scenario not in its slice
sends nothing. Every slice keeps the latency of each successful call that completes inside
its measured window; every non-OK status (warm-up and settling included) is counted by code
and message.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import multiprocessing
import os
import queue
import signal
import sys
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import grpc
from argon2 import PasswordHasher

try:
    from privacyvault.v1 import member_pb2, member_pb2_grpc

    SOURCE_PATH: str | None = None
except ImportError:  # not pip-installed yet: use the source tree (and pass it to servers)
    SOURCE_PATH = str(Path(__file__).resolve().parent.parent / "src")
    sys.path.insert(0, SOURCE_PATH)
    from privacyvault.v1 import member_pb2, member_pb2_grpc

Rpc = Literal["GetMember", "Authenticate", "SignUp"]
RawOp = Literal["hash", "verify"]
PASSWORD = "bench-Passw0rd-long-enough"
CLIENT_IP = (("x-client-ip", "203.0.113.7"),)
CALL_TIMEOUT = 30.0
START_MARGIN = 0.25  # s from "all processes ready" to the schedule's origin
_READY = "ready"
_CTX = multiprocessing.get_context("spawn")


@dataclass(frozen=True)
class Argon2Params:
    """argon2id costs, for the service (environment) and the raw baseline; OWASP defaults."""

    time_cost: int = 2
    memory_cost: int = 19456  # KiB
    parallelism: int = 1

    def env(self) -> dict[str, str]:
        return {
            "PRIVACY_VAULT_ARGON2_TIME_COST": str(self.time_cost),
            "PRIVACY_VAULT_ARGON2_MEMORY_COST": str(self.memory_cost),
            "PRIVACY_VAULT_ARGON2_PARALLELISM": str(self.parallelism),
        }


@dataclass(frozen=True)
class Load:
    """One RPC load, as plain picklable data: the workers build their requests from it."""

    address: str
    rpc: Rpc
    concurrency: int  # in-flight calls per worker process
    member_ids: tuple[str, ...] = ()  # GetMember targets, round-robin
    login_ids: tuple[str, ...] = ()  # Authenticate targets, round-robin (password PASSWORD)
    tag: str = ""  # SignUp: unique login ids are f"{tag}w{worker}n{counter}"


@dataclass(frozen=True)
class Slice:
    """One stretch of a schedule, in seconds after the schedule's origin.

    ``scenario`` is loaded from ``start``; the successful calls that complete in
    [``begin``, ``end``] are counted. ``start`` to ``begin`` lets the previous slice's
    in-flight calls drain and this load reach its steady state. A warm-up slice counts
    its errors only.
    """

    scenario: str
    start: float
    begin: float
    end: float
    warmup: bool = False


@dataclass
class Sample:
    latencies_ms: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)


@dataclass
class Stats:
    name: str
    seconds: float
    latencies_ms: list[float]
    errors: Counter[str]
    slice_rps: list[float] = field(default_factory=list)  # one per measured slice, in order

    @classmethod
    def merge(
        cls, name: str, seconds: float, samples: Sequence[Sample], slice_rps: Sequence[float] = ()
    ) -> Stats:
        latencies = sorted(x for s in samples for x in s.latencies_ms)
        errors = sum((s.errors for s in samples), Counter[str]())
        return cls(name, seconds, latencies, errors, list(slice_rps))

    @property
    def rps(self) -> float:
        return len(self.latencies_ms) / self.seconds

    def percentile(self, q: float) -> float | None:
        """Nearest-rank percentile of the (sorted) latencies in ms; None when nothing succeeded."""
        if not self.latencies_ms:
            return None
        return self.latencies_ms[max(0, math.ceil(q * len(self.latencies_ms)) - 1)]

    def summary(self) -> dict[str, Any]:
        p50, p99 = self.percentile(0.50), self.percentile(0.99)
        return {
            "rps": round(self.rps, 1),
            "ok": len(self.latencies_ms),
            "seconds": self.seconds,
            "slice_rps": [round(x, 1) for x in self.slice_rps],
            "p50_ms": p50 and round(p50, 3),
            "p99_ms": p99 and round(p99, 3),
            "errors": sum(self.errors.values()),
            "error_statuses": dict(self.errors),
        }


@dataclass(frozen=True)
class _Start:
    """How the processes of one schedule agree on its origin.

    Each says it is ready; the parent then publishes one origin on ``time.monotonic()``,
    which is system-wide (CLOCK_MONOTONIC on Linux), so every process's slices line up
    however late it wakes, and a load ends exactly where the next one's slice starts.
    """

    out: Any  # multiprocessing queue of (index, READY | result | traceback)
    index: int
    event: Any
    origin: Any  # multiprocessing.Value("d")

    def wait(self) -> float:
        self.out.put((self.index, _READY))
        if not self.event.wait(120):
            raise RuntimeError("the schedule never started")
        return float(self.origin.value)


async def _pause_until(at: float) -> None:
    await asyncio.sleep(max(0.0, at - time.monotonic()))


def signup_request(login_id: str) -> member_pb2.SignUpRequest:
    return member_pb2.SignUpRequest(
        login_id=login_id,
        password=PASSWORD,
        name="Bench Member",
        email=f"{login_id}@example.com",
        birth_date="1990-01-01",
    )


def _status(error: grpc.aio.AioRpcError) -> str:
    return f"{error.code().name}: {(error.details() or '')[:120]}"


def _caller(stub: Any, load: Load, worker: int) -> Callable[[int], Awaitable[Any]]:
    """A call for the n-th request of this worker; all but SignUp's requests are pre-built."""
    if load.rpc == "GetMember":
        gets = [
            member_pb2.GetMemberRequest(member_id=m, purpose=member_pb2.PURPOSE_IDENTIFICATION)
            for m in load.member_ids
        ]
        return lambda n: stub.GetMember(gets[n % len(gets)], timeout=CALL_TIMEOUT)
    if load.rpc == "Authenticate":
        auths = [
            member_pb2.AuthenticateRequest(login_id=login, password=PASSWORD)
            for login in load.login_ids
        ]
        return lambda n: stub.Authenticate(
            auths[n % len(auths)], metadata=CLIENT_IP, timeout=CALL_TIMEOUT
        )
    return lambda n: stub.SignUp(signup_request(f"{load.tag}w{worker}n{n}"), timeout=CALL_TIMEOUT)


async def _slice(
    call: Callable[[int], Awaitable[Any]],
    counter: Iterator[int],
    concurrency: int,
    times: tuple[float, float],
    measured: bool,
) -> Sample:
    """Keep `concurrency` calls in flight until `end`, then let the last ones finish."""
    sample = Sample()
    begin, end = times

    async def one_in_flight() -> None:
        while (t0 := time.monotonic()) < end:
            try:
                await call(next(counter))
            except grpc.aio.AioRpcError as error:
                sample.errors[_status(error)] += 1
                continue
            t1 = time.monotonic()
            if measured and begin <= t1 <= end:
                sample.latencies_ms.append((t1 - t0) * 1000)

    await asyncio.gather(*(one_in_flight() for _ in range(concurrency)))
    return sample


async def _drive(
    loads: Mapping[str, Load], worker: int, schedule: Sequence[Slice], start: _Start
) -> dict[int, Sample]:
    async with contextlib.AsyncExitStack() as stack:
        stubs: dict[str, Any] = {}
        for address in sorted({load.address for load in loads.values()}):
            channel = await stack.enter_async_context(grpc.aio.insecure_channel(address))
            await asyncio.wait_for(channel.channel_ready(), 30)
            stubs[address] = member_pb2_grpc.MemberServiceStub(channel)
        calls = {name: _caller(stubs[load.address], load, worker) for name, load in loads.items()}
        counters = {name: itertools.count() for name in loads}  # SignUp ids unique per run
        origin = await asyncio.to_thread(start.wait)
        results: dict[int, Sample] = {}
        for index, part in enumerate(schedule):
            load = loads.get(part.scenario)
            if load is None:
                continue  # another process's slice: this one sends nothing
            await _pause_until(origin + part.start)
            results[index] = await _slice(
                calls[part.scenario],
                counters[part.scenario],
                load.concurrency,
                (origin + part.begin, origin + part.end),
                not part.warmup,
            )
    return results


def _load_worker(
    loads: Mapping[str, Load], worker: int, schedule: Sequence[Slice], start: _Start
) -> dict[int, Sample]:
    return asyncio.run(_drive(loads, worker, schedule, start))


def _argon2_worker(
    ops: Mapping[str, RawOp], params: Argon2Params, schedule: Sequence[Slice], start: _Start
) -> dict[int, Sample]:
    hasher = PasswordHasher(params.time_cost, params.memory_cost, parallelism=params.parallelism)
    encoded = hasher.hash(PASSWORD)
    runs: dict[RawOp, Callable[[], object]] = {
        "hash": lambda: hasher.hash(PASSWORD),
        "verify": lambda: hasher.verify(encoded, PASSWORD),
    }

    def loop(run: Callable[[], object], begin: float, end: float, measured: bool) -> list[float]:
        latencies = []
        while (t0 := time.monotonic()) < end:
            run()
            t1 = time.monotonic()
            if measured and begin <= t1 <= end:
                latencies.append((t1 - t0) * 1000)
        return latencies

    threads = os.cpu_count() or 1
    results: dict[int, Sample] = {}
    with ThreadPoolExecutor(threads) as pool:  # threads made once, idle between slices
        origin = start.wait()
        for index, part in enumerate(schedule):
            op = ops.get(part.scenario)
            if op is None:
                continue
            time.sleep(max(0.0, origin + part.start - time.monotonic()))
            window = (runs[op], origin + part.begin, origin + part.end, not part.warmup)
            futures = [pool.submit(loop, *window) for _ in range(threads)]
            results[index] = Sample([x for f in futures for x in f.result()])
    return results


def _entry(target: Callable[..., dict[int, Sample]], start: _Start, *args: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # on Ctrl-C the parent stops us
    try:
        result: dict[int, Sample] | str = target(*args, start)
    except Exception:
        result = traceback.format_exc()
    start.out.put((start.index, result))


def _in_processes(
    jobs: Sequence[tuple[Callable[..., dict[int, Sample]], tuple[Any, ...]]], length: float
) -> list[dict[int, Sample]]:
    """Run target(*args, start) for each job in its own spawned process, start them together
    once all are ready, and return their results; kill them all on any exit."""
    out = _CTX.Queue()
    event = _CTX.Event()
    origin = _CTX.Value("d", 0.0)
    procs = [
        _CTX.Process(
            target=_entry, args=(target, _Start(out, i, event, origin), *args), daemon=True
        )
        for i, (target, args) in enumerate(jobs)
    ]
    for proc in procs:
        proc.start()
    ready: set[int] = set()
    results: dict[int, dict[int, Sample]] = {}
    deadline = time.monotonic() + 120  # to get ready; then the schedule's length on top
    try:
        while len(results) < len(procs):
            try:
                index, result = out.get(timeout=1)
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for p in procs):
                    raise RuntimeError("a bench worker process died") from None
                if time.monotonic() > deadline:
                    raise RuntimeError("bench workers timed out") from None
                continue
            if isinstance(result, str) and result != _READY:
                raise RuntimeError(f"bench worker failed:\n{result}")
            if result == _READY:
                ready.add(index)
                if len(ready) == len(procs):
                    origin.value = time.monotonic() + START_MARGIN
                    event.set()
                    deadline = origin.value + length + 120
            else:
                results[index] = result
    finally:
        done = len(results) == len(procs)  # else failed or interrupted: do not wait
        for proc in procs:
            proc.join(timeout=5 if done else 0)
            if proc.is_alive():
                proc.kill()
                proc.join()
    return [results[i] for i in range(len(procs))]


def run_schedule(
    schedule: Sequence[Slice],
    loads: Mapping[str, Load],
    workers: int,
    raw: Mapping[str, RawOp] | None = None,
    params: Argon2Params | None = None,
) -> list[Sample]:
    """Run every slice of `schedule` (RPC scenarios from `loads` on `workers` processes, raw
    argon2 ones from `raw` in one more); returns one merged Sample per slice, in order."""
    jobs: list[tuple[Callable[..., dict[int, Sample]], tuple[Any, ...]]] = [
        (_load_worker, (dict(loads), w, tuple(schedule))) for w in range(workers)
    ]
    if raw:
        jobs.append((_argon2_worker, (dict(raw), params or Argon2Params(), tuple(schedule))))
    known = set(loads) | set(raw or ())
    if unknown := {part.scenario for part in schedule} - known:
        raise ValueError(f"no load for {sorted(unknown)}")
    per_process = _in_processes(jobs, max((part.end for part in schedule), default=0.0))
    merged: list[Sample] = []
    for index in range(len(schedule)):
        samples = [r[index] for r in per_process if index in r]
        merged.append(
            Sample(
                [x for s in samples for x in s.latencies_ms],
                sum((s.errors for s in samples), Counter[str]()),
            )
        )
    return merged


async def seed(address: str, count: int, tag: str, concurrency: int = 8) -> list[tuple[str, str]]:
    """Sign up `count` members; returns their (member_id, login_id). Any error aborts."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = member_pb2_grpc.MemberServiceStub(channel)
        limit = asyncio.Semaphore(concurrency)

        async def sign_up(n: int) -> tuple[str, str]:
            login_id = f"{tag}seed{n}"
            async with limit:
                try:
                    reply = await stub.SignUp(signup_request(login_id), timeout=CALL_TIMEOUT)
                except grpc.aio.AioRpcError as error:
                    raise RuntimeError(f"seeding SignUp failed: {_status(error)}") from None
            return reply.member_id, login_id

        return list(await asyncio.gather(*(sign_up(n) for n in range(count))))
