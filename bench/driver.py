"""Multi-process grpc.aio load driver and the raw argon2id baselines it is compared with.

``run_schedule`` runs a list of slices (see ``Slice``), one after the other, in spawned
processes that stay up for the whole list: P load workers, each with one grpc.aio channel
per server and C concurrent in-flight calls of the slice's RPC, and, when the list has raw
slices, one argon2-cffi process with a thread per usable CPU (argon2-cffi releases the GIL).
Only the processes that own a slice's scenario run it; the others, and the servers not in
it, sit idle. The parent starts a slice only when every call of the previous one has
returned, so no work spills into the next measurement. Each slice keeps the latency of
every successful call that completes inside its measured window; every non-OK status
(warm-up and settling included) is counted by code and message.
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
    from vault.passwords import usable_cpus

    SOURCE_PATH: str | None = None
except ImportError:  # not pip-installed yet: use the source tree (and pass it to servers)
    SOURCE_PATH = str(Path(__file__).resolve().parent.parent / "src")
    sys.path.insert(0, SOURCE_PATH)
    from privacyvault.v1 import member_pb2, member_pb2_grpc
    from vault.passwords import usable_cpus

Rpc = Literal["GetMember", "Authenticate", "SignUp"]
RawOp = Literal["hash", "verify"]
PASSWORD = "bench-Passw0rd-long-enough"
CLIENT_IP = (("x-client-ip", "203.0.113.7"),)
CALL_TIMEOUT = 30.0
START_MARGIN = 0.02  # s from the parent's go to a slice's start: its owners wake up
READY, DONE, FAILED = "ready", "done", "failed"
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
class ClientTls:
    """mTLS for the driver's channels, as PEM bytes: the CA, the client's key and cert."""

    ca: bytes
    key: bytes
    cert: bytes

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.ca, self.key, self.cert)


def open_channel(address: str, tls: ClientTls | None = None) -> grpc.aio.Channel:
    if tls is None:
        return grpc.aio.insecure_channel(address)
    return grpc.aio.secure_channel(address, tls.credentials())


@dataclass(frozen=True)
class Pinning:
    """``bench/run.py --pin``: the servers and raw argon2 may run on the ``server`` CPUs
    only, the load workers on the ``client`` CPUs: the client's own work is then off
    the cores the two sides of a ratio are measured on."""

    server: frozenset[int]
    client: frozenset[int]

    @classmethod
    def halves(cls) -> Pinning:
        """The first half of this process's CPUs (at least one) for the servers, the rest
        for the client."""
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            raise RuntimeError("--pin needs at least 2 CPUs")
        half = len(cpus) // 2
        return cls(frozenset(cpus[:half]), frozenset(cpus[half:]))

    def server_command(self, cmd: list[str]) -> list[str]:
        return ["taskset", "--cpu-list", ",".join(map(str, sorted(self.server))), *cmd]


@dataclass(frozen=True)
class Load:
    """One RPC load, as plain picklable data: the workers build their requests from it."""

    address: str
    rpc: Rpc
    concurrency: int  # in-flight calls per worker process
    member_ids: tuple[str, ...] = ()  # GetMember targets, round-robin
    login_ids: tuple[str, ...] = ()  # Authenticate targets, round-robin (password PASSWORD)
    tag: str = ""  # SignUp: unique login ids are f"{tag}w{worker}n{counter}"
    tls: ClientTls | None = None  # mTLS (bench/run.py --tls), else plaintext


@dataclass(frozen=True)
class Slice:
    """One stretch of a schedule: ``scenario`` is loaded for ``settle`` + ``length`` seconds
    and the successful calls that complete in the last ``length`` seconds are counted. The
    settling lets the load reach its steady state. A warm-up slice counts its errors only."""

    scenario: str
    settle: float
    length: float
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
class _Link:
    """A worker process's end of the parent's protocol: it reports READY, then runs each
    (slice index, slice, start time) it is sent and reports (DONE, index, sample), until it
    is sent None. The start time is on ``time.monotonic()``, which is system-wide
    (CLOCK_MONOTONIC on Linux), so all owners of a slice start and stop it together."""

    index: int
    out: Any  # multiprocessing queue shared by all workers: (worker, kind, payload)
    commands: Any  # multiprocessing queue for this worker only

    def send(self, kind: str, payload: object = None) -> None:
        self.out.put((self.index, kind, payload))


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
        # Right passwords only: a success leaves the failure counters alone (one read),
        # so the load never trips the lockout or the per-IP throttle (failures only);
        # a call that fails is reported and fails --check.
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


async def _drive(loads: Mapping[str, Load], worker: int, link: _Link) -> None:
    async with contextlib.AsyncExitStack() as stack:
        stubs: dict[str, Any] = {}
        tls = {load.address: load.tls for load in loads.values()}
        for address in sorted(tls):
            channel = await stack.enter_async_context(open_channel(address, tls[address]))
            await asyncio.wait_for(channel.channel_ready(), 30)
            stubs[address] = member_pb2_grpc.MemberServiceStub(channel)
        calls = {name: _caller(stubs[load.address], load, worker) for name, load in loads.items()}
        counters = {name: itertools.count() for name in loads}  # SignUp ids unique per run
        link.send(READY)
        while (command := await asyncio.to_thread(link.commands.get)) is not None:
            index, part, start = command
            load = loads[part.scenario]
            await asyncio.sleep(max(0.0, start - time.monotonic()))
            begin = start + part.settle
            sample = await _slice(
                calls[part.scenario],
                counters[part.scenario],
                load.concurrency,
                (begin, begin + part.length),
                not part.warmup,
            )
            link.send(DONE, (index, sample))


def _load_worker(
    loads: Mapping[str, Load], worker: int, cpus: frozenset[int] | None, link: _Link
) -> None:
    if cpus is not None:
        os.sched_setaffinity(0, cpus)
    asyncio.run(_drive(loads, worker, link))


def _argon2_worker(
    ops: Mapping[str, RawOp], params: Argon2Params, cpus: frozenset[int] | None, link: _Link
) -> None:
    # Its own session, like the service (run.serve): with the kernel's autogroup scheduling
    # each session is one CPU-share group, so on a shared machine the raw hashing threads
    # and the service's get the same share, not this process's share of the bench's group.
    with contextlib.suppress(OSError):
        os.setsid()
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

    if cpus is not None:
        os.sched_setaffinity(0, cpus)
    threads = usable_cpus()  # the service pool's default: affinity and cgroup quota
    with ThreadPoolExecutor(threads) as pool:  # threads made once, idle between slices
        link.send(READY)
        while (command := link.commands.get()) is not None:
            index, part, start = command
            time.sleep(max(0.0, start - time.monotonic()))
            begin = start + part.settle
            window = (runs[ops[part.scenario]], begin, begin + part.length, not part.warmup)
            futures = [pool.submit(loop, *window) for _ in range(threads)]
            link.send(DONE, (index, Sample([x for f in futures for x in f.result()])))


def _entry(target: Callable[..., None], link: _Link, *args: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # on Ctrl-C the parent stops us
    try:
        target(*args, link)
    except Exception:
        link.send(FAILED, traceback.format_exc())


class _Workers:
    """The parent's side: spawned worker processes, killed on any exit of the block."""

    def __init__(self, jobs: Sequence[tuple[Callable[..., None], tuple[Any, ...]]]) -> None:
        self.out = _CTX.Queue()
        self.links = [_Link(i, self.out, _CTX.Queue()) for i in range(len(jobs))]
        self.procs = [
            _CTX.Process(target=_entry, args=(target, link, *args), daemon=True)
            for link, (target, args) in zip(self.links, jobs, strict=True)
        ]

    def __enter__(self) -> _Workers:
        for proc in self.procs:
            proc.start()
        self.receive(READY, set(range(len(self.procs))), 120)
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:  # done: let them leave; else failed or interrupted: do not wait
            for link in self.links:
                link.commands.put(None)
        for proc in self.procs:
            proc.join(timeout=5 if exc[0] is None else 0)
            if proc.is_alive():
                proc.kill()
                proc.join()

    def receive(self, kind: str, workers: set[int], timeout: float) -> list[Any]:
        """Wait for one `kind` message from each of `workers`; return their payloads."""
        payloads: list[Any] = []
        pending = set(workers)
        deadline = time.monotonic() + timeout
        while pending:
            try:
                worker, got, payload = self.out.get(timeout=1)
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for p in self.procs):
                    raise RuntimeError("a bench worker process died") from None
                if time.monotonic() > deadline:
                    raise RuntimeError("bench workers timed out") from None
                continue
            if got == FAILED:
                raise RuntimeError(f"bench worker failed:\n{payload}")
            if got != kind or worker not in pending:
                raise RuntimeError(f"bench worker {worker} sent {got} out of turn")
            pending.discard(worker)
            payloads.append(payload)
        return payloads

    def run(self, index: int, part: Slice, owners: set[int]) -> Sample:
        start = time.monotonic() + START_MARGIN
        for worker in owners:
            self.links[worker].commands.put((index, part, start))
        timeout = START_MARGIN + part.settle + part.length + CALL_TIMEOUT + 30
        samples = [sample for _, sample in self.receive(DONE, owners, timeout)]
        return Sample(
            [x for s in samples for x in s.latencies_ms],
            sum((s.errors for s in samples), Counter[str]()),
        )


def run_schedule(
    schedule: Sequence[Slice],
    loads: Mapping[str, Load],
    workers: int,
    raw: Mapping[str, RawOp] | None = None,
    params: Argon2Params | None = None,
    pin: Pinning | None = None,
) -> list[Sample]:
    """Run the slices of `schedule` one after the other (RPC scenarios from `loads` on
    `workers` processes, raw argon2 ones from `raw` in one more); each starts when every
    call of the one before has returned. Returns one merged Sample per slice, in order."""
    raw = raw or {}
    if unknown := {part.scenario for part in schedule} - set(loads) - set(raw):
        raise ValueError(f"no load for {sorted(unknown)}")
    client, server = (None, None) if pin is None else (pin.client, pin.server)
    jobs: list[tuple[Callable[..., None], tuple[Any, ...]]] = [
        (_load_worker, (dict(loads), w, client)) for w in range(workers)
    ]
    if raw:
        jobs.append((_argon2_worker, (dict(raw), params or Argon2Params(), server)))
    load_workers, argon2 = set(range(workers)), {workers}
    with _Workers(jobs) as processes:
        return [
            processes.run(i, part, load_workers if part.scenario in loads else argon2)
            for i, part in enumerate(schedule)
        ]


async def seed(
    address: str, count: int, tag: str, concurrency: int = 8, tls: ClientTls | None = None
) -> list[tuple[str, str]]:
    """Sign up `count` members; returns their (member_id, login_id). Any error aborts."""
    async with open_channel(address, tls) as channel:
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
