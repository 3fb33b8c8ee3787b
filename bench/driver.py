"""Multi-process grpc.aio load driver and the raw argon2id baselines it is compared with.

Each measurement runs in spawned processes: ``run_load`` starts P workers, each with one
grpc.aio channel and C concurrent in-flight calls; ``run_argon2`` runs argon2-cffi on a
thread pool with os.cpu_count() threads (argon2-cffi releases the GIL). Both run a warm-up,
then a fixed window, and keep the latency of every successful call that completes inside
the window; every non-OK status (warm-up included) is counted by code and message.
"""

from __future__ import annotations

import asyncio
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
from collections.abc import Awaitable, Callable, Sequence
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
PASSWORD = "bench-Passw0rd-long-enough"
CLIENT_IP = (("x-client-ip", "203.0.113.7"),)
CALL_TIMEOUT = 30.0
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
    warmup: float
    duration: float
    member_ids: tuple[str, ...] = ()  # GetMember targets, round-robin
    login_ids: tuple[str, ...] = ()  # Authenticate targets, round-robin (password PASSWORD)
    tag: str = ""  # SignUp: unique login ids are f"{tag}w{worker}n{counter}"


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

    @classmethod
    def merge(cls, name: str, seconds: float, samples: Sequence[Sample]) -> Stats:
        latencies = sorted(x for s in samples for x in s.latencies_ms)
        return cls(name, seconds, latencies, sum((s.errors for s in samples), Counter()))

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
            "p50_ms": p50 and round(p50, 3),
            "p99_ms": p99 and round(p99, 3),
            "errors": sum(self.errors.values()),
            "error_statuses": dict(self.errors),
        }


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


async def _drive(load: Load, worker: int, barrier: Any) -> Sample:
    sample = Sample()
    async with grpc.aio.insecure_channel(load.address) as channel:
        await asyncio.wait_for(channel.channel_ready(), 30)
        call = _caller(member_pb2_grpc.MemberServiceStub(channel), load, worker)
        counter = itertools.count()
        await asyncio.to_thread(barrier.wait, 60)  # all workers start together
        begin = time.perf_counter() + load.warmup
        end = begin + load.duration

        async def one_in_flight() -> None:
            while (t0 := time.perf_counter()) < end:
                try:
                    await call(next(counter))
                except grpc.aio.AioRpcError as error:
                    sample.errors[_status(error)] += 1
                    continue
                t1 = time.perf_counter()
                if begin <= t1 <= end:
                    sample.latencies_ms.append((t1 - t0) * 1000)

        await asyncio.gather(*(one_in_flight() for _ in range(load.concurrency)))
    return sample


def _load_worker(load: Load, worker: int, barrier: Any) -> Sample:
    return asyncio.run(_drive(load, worker, barrier))


def _argon2_worker(op: str, params: Argon2Params, warmup: float, duration: float) -> Sample:
    hasher = PasswordHasher(params.time_cost, params.memory_cost, parallelism=params.parallelism)
    encoded = hasher.hash(PASSWORD)
    run: Callable[[], object] = (
        (lambda: hasher.hash(PASSWORD))
        if op == "hash"
        else (lambda: hasher.verify(encoded, PASSWORD))
    )
    begin = time.perf_counter() + warmup
    end = begin + duration

    def loop() -> list[float]:
        latencies = []
        while (t0 := time.perf_counter()) < end:
            run()
            t1 = time.perf_counter()
            if begin <= t1 <= end:
                latencies.append((t1 - t0) * 1000)
        return latencies

    threads = os.cpu_count() or 1
    with ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(loop) for _ in range(threads)]
        return Sample([x for f in futures for x in f.result()])


def _entry(target: Callable[..., Sample], out: Any, index: int, *args: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # on Ctrl-C the parent stops us
    try:
        result: Sample | str = target(*args)
    except Exception:
        result = traceback.format_exc()
    out.put((index, result))


def _in_processes(
    target: Callable[..., Sample], arg_lists: Sequence[tuple[Any, ...]], timeout: float
) -> list[Sample]:
    """Run target(*args) for each args in its own spawned process; kill them all on any exit."""
    out = _CTX.Queue()
    procs = [
        _CTX.Process(target=_entry, args=(target, out, i, *args), daemon=True)
        for i, args in enumerate(arg_lists)
    ]
    for proc in procs:
        proc.start()
    results: dict[int, Sample] = {}
    deadline = time.monotonic() + timeout
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
            if isinstance(result, str):
                raise RuntimeError(f"bench worker failed:\n{result}")
            results[index] = result
    finally:
        done = len(results) == len(procs)  # else failed or interrupted: do not wait
        for proc in procs:
            proc.join(timeout=5 if done else 0)
            if proc.is_alive():
                proc.kill()
                proc.join()
    return [results[i] for i in range(len(procs))]


def run_load(name: str, load: Load, workers: int) -> Stats:
    barrier = _CTX.Barrier(workers)
    arg_lists = [(load, w, barrier) for w in range(workers)]
    timeout = load.warmup + load.duration + 120
    return Stats.merge(name, load.duration, _in_processes(_load_worker, arg_lists, timeout))


def run_argon2(
    name: str, op: Literal["hash", "verify"], params: Argon2Params, warmup: float, duration: float
) -> Stats:
    timeout = warmup + duration + 120
    samples = _in_processes(_argon2_worker, [(op, params, warmup, duration)], timeout)
    return Stats.merge(name, duration, samples)


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
