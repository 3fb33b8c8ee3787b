"""The access-log retention purge on PostgreSQL: the lifecycle's partition drop, next to the
batched DELETE it replaced, on two identical databases in the same run.

    python bench/purge.py [--members 100000] [--entries 2000000] [--batch 500]
                          [--now 2025-07-03T00:00:00+00:00] [--database-url ADMIN_DSN]
                          [--json out.json]

A fresh database (``pv_bench_purge_<hex>_svc``) is created on the server of
``--database-url``; the vault migrates it (monthly partitions of access_log, migration 0006)
and M members are seeded with COPY (``seed.py``). The monthly partitions of the 9 months
before ``--now`` are made by ``PostgresStore.ensure_access_log_partitions``, then N entries
are copied in time order, evenly spaced over those 9 months (checked: none in
access_log_default). After VACUUM (ANALYZE) and CHECKPOINT the database is cloned
(``CREATE DATABASE ... TEMPLATE``, ``..._raw``), so both start byte for byte the same. Then,
each after a CHECKPOINT, with a login (``PostgresStore.record_login``: UPDATE members and
INSERT INTO access_log) every 10 ms from a second connection pool the whole time:

- service: ``Lifecycle.purge_access_logs()`` on a FrozenClock at ``--now`` with the policy's
  6-month retention: ``purge_access_log(before, batch)`` until a call returns less than a
  batch; it detaches and drops the months wholly older than the cutoff, then batch-deletes
  what is older in the boundary month;
- raw: the same rows by the method before partitions: one ``DELETE ... WHERE (entry_id, at)
  IN (SELECT ... WHERE at < cutoff ORDER BY at LIMIT batch FOR UPDATE SKIP LOCKED)`` per
  transaction, until a batch is short.

Reported: rows purged per second for each and the ratio service / raw; the longest call and
the longest single transaction of each (for the service by kind: detach, drop, delete); the
login latency before (idle) and during each purge. Checked: both purged the expected
entries, none older than the cutoff is left, the same entries remain in both.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import secrets
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import structlog
from guard import PG_BENCH_FAILURES, run_guarded
from rewrap import ADMIN_DSN, _connect, create_database, database_url, drop_database
from seed import ACCESS_COLUMNS, CT_HEADER, SEED_CHUNK, Activity, SeedOptions, seed

import vault
from vault.clock import FrozenClock
from vault.lifecycle import Lifecycle, LifecyclePolicy
from vault.store.base import NewAccessEntry
from vault.store.postgres import PostgresStore

MONTHS = 9  # of access log before "now"
DEFAULT_NOW = datetime(2025, 7, 3, tzinfo=UTC)  # the cutoff (now - 183 days) is 2025-01-01
LOGIN_EVERY = 0.010  # seconds between the concurrent logins
IDLE_SECONDS = 2.0  # of logins before each purge, for comparison
LOGIN_MEMBERS = 64  # the members who log in (round-robin)
# The service's batch delete (vault.store.postgres), which is the pre-partition statement
# (``entry_id IN (SELECT entry_id ...)``) with the partition key added: on the partitioned
# table the old form would probe every partition's primary key for each id.
RAW_DELETE = (
    "DELETE FROM access_log WHERE at < $1 AND (entry_id, at) IN ("
    "SELECT entry_id, at FROM access_log "
    "WHERE at < $1 ORDER BY at LIMIT $2 FOR UPDATE SKIP LOCKED)"
)


def _add_months(at: datetime, months: int) -> datetime:
    index = at.year * 12 + at.month - 1 + months
    return at.replace(year=index // 12, month=index % 12 + 1, day=min(at.day, 28))


def _month(at: datetime) -> datetime:
    return at.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


# --- results -----------------------------------------------------------------------------
@dataclass
class Logins:
    """Concurrent logins: latencies (s) before the purge and overlapping it."""

    idle: list[float] = field(default_factory=list)
    during: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        return {
            "idle_count": len(self.idle),
            "idle_median_ms": _ms(statistics.median(self.idle)) if self.idle else 0.0,
            "idle_max_ms": _ms(max(self.idle, default=0.0)),
            "during_count": len(self.during),
            "during_median_ms": _ms(statistics.median(self.during)) if self.during else 0.0,
            "during_p99_ms": _ms(_quantile(self.during, 0.99)),
            "during_max_ms": _ms(max(self.during, default=0.0)),
        }


@dataclass
class Pass:
    scenario: str
    rows: int = 0
    seconds: float = 0.0
    #: Per purge_access_log call (service) or DELETE transaction (raw): seconds, rows.
    calls: list[tuple[float, int]] = field(default_factory=list)
    #: Every transaction of the purge: kind, seconds (the service's detach/drop/delete;
    #: the raw pass's are its calls).
    transactions: list[tuple[str, float]] = field(default_factory=list)
    #: The service's ``_drop_access_log_partitions`` per call: seconds, entries dropped.
    drops: list[tuple[float, int]] = field(default_factory=list)
    logins: Logins = field(default_factory=Logins)

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0

    def longest(self, kind: str | None = None) -> float:
        return max((s for k, s in self.transactions if kind in (None, k)), default=0.0)

    def tenths(self) -> tuple[float, float]:
        """Mean call time in the first and the last tenth of the pass (full calls)."""
        durations = [s for s, _ in self.calls]
        if not durations:
            return 0.0, 0.0
        k = max(1, len(durations) // 10)
        return sum(durations[:k]) / k, sum(durations[-k:]) / k

    def as_dict(self) -> dict[str, Any]:
        kinds = sorted({k for k, _ in self.transactions})
        first, last = self.tenths()
        return {
            "scenario": self.scenario,
            "rows": self.rows,
            "seconds": round(self.seconds, 4),
            "rows_per_s": round(self.rows_per_s, 1),
            "calls": len(self.calls),
            "longest_call_ms": round(_ms(max((s for s, _ in self.calls), default=0.0)), 2),
            "first_tenth_call_ms": round(_ms(first), 2),
            "last_tenth_call_ms": round(_ms(last), 2),
            "transactions": {
                k: {
                    "count": sum(1 for t, _ in self.transactions if t == k),
                    "longest_ms": round(_ms(self.longest(k)), 2),
                    "total_ms": round(_ms(sum(s for t, s in self.transactions if t == k)), 2),
                }
                for k in kinds
            },
            "drops": [(round(_ms(s), 2), n) for s, n in self.drops],
            "logins": {k: round(v, 2) for k, v in self.logins.summary().items()},
        }


@dataclass
class Results:
    members: int
    entries: int
    batch: int
    now: datetime
    cutoff: datetime
    start: datetime = DEFAULT_NOW
    to_purge: int = 0
    in_boundary_month: int = 0  # of to_purge: after the start of the cutoff's month
    partitions: dict[str, int] = field(default_factory=dict)
    seed_seconds: float = 0.0
    clone_seconds: float = 0.0
    passes: list[Pass] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        service, raw = self.passes
        return service.rows_per_s / raw.rows_per_s if raw.rows_per_s else 0.0


def _ms(seconds: float) -> float:
    return seconds * 1e3


def _quantile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --- the service's store, timed ----------------------------------------------------------
class _Statements:
    """A connection that remembers the statements executed on it."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self.statements: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    async def execute(self, query: str, *args: Any) -> Any:
        self.statements.append(query)
        return await self._conn.execute(query, *args)

    def kind(self) -> str:
        for statement in self.statements:
            for marker, kind in (
                ("DETACH PARTITION", "detach"),
                ("DROP TABLE", "drop"),
                ("DELETE FROM access_log", "delete"),
                ("CREATE TABLE", "create"),
            ):
                if marker in statement:
                    return kind
        return "other"


class TimedStore(PostgresStore):
    """The service's store as it is, with every transaction, every purge_access_log call and
    every partition drop timed (wall clock, from the pool acquire to after COMMIT)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        super().__init__(pool)
        self.calls: list[tuple[float, int]] = []
        self.transactions: list[tuple[str, float]] = []
        self.drops: list[tuple[float, int]] = []

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Any]:
        started = time.perf_counter()
        recorder: _Statements | None = None
        try:
            async with super()._transaction() as conn:
                recorder = _Statements(conn)
                yield recorder
        finally:
            kind = recorder.kind() if recorder is not None else "other"
            self.transactions.append((kind, time.perf_counter() - started))

    async def _drop_access_log_partitions(self, before: datetime) -> int:
        started = time.perf_counter()
        dropped = await super()._drop_access_log_partitions(before)
        self.drops.append((time.perf_counter() - started, dropped))
        return dropped

    async def purge_access_log(self, before: datetime, limit: int) -> int:
        started = time.perf_counter()
        count = await super().purge_access_log(before, limit)
        self.calls.append((time.perf_counter() - started, count))
        return count


async def _no_shred(*args: Any, **kwargs: Any) -> None:
    raise RuntimeError("the purge shredded a member")


# --- seeding -----------------------------------------------------------------------------
async def seed_vault(url: str, results: Results) -> list[uuid.UUID]:
    """Members (seed.py), the monthly partitions, then the access log in time order."""
    member_ids: list[uuid.UUID] = []

    def keep(index: int, member_id: uuid.UUID, dek: bytes, activity: Activity) -> None:
        member_ids.append(member_id)

    with tempfile.TemporaryDirectory(prefix="privacy-vault-bench-purge-") as tmp:
        async with vault.open_vault(
            data_dir=Path(tmp) / "data", database_url=url, argon2=vault.CHEAPEST
        ) as v:
            await seed(url, v._provider, SeedOptions(results.members, on_member=keep))
    store = await PostgresStore.open(url, pool_size=1)
    try:
        month = _month(results.start)
        while month <= results.now:
            await store.ensure_access_log_partitions(month)  # this month and the next two
            month = _add_months(month, 1)
        await store.ensure_access_log_partitions()  # the database clock's, as the purge does
    finally:
        await store.close()
    async with _connect(url) as conn:
        await conn.execute("SET session_replication_role = replica")  # as seed.py: no FK checks
        await copy_access_log(conn, member_ids, results)
        default = await conn.fetchval("SELECT count(*) FROM access_log_default")
        if default:
            raise RuntimeError(f"{default} entries landed in access_log_default")
        rows = await conn.fetch(
            "SELECT tableoid::regclass::text AS name, count(*) FROM access_log GROUP BY 1 "
            "ORDER BY 1"
        )
        results.partitions = {str(r["name"]): int(r["count"]) for r in rows}
        if sum(results.partitions.values()) != results.entries:
            raise RuntimeError(f"seeded {results.partitions}, expected {results.entries}")
        for table in ("members", "member_keys", "access_log"):
            await conn.execute(f"VACUUM (ANALYZE) {table}")
        with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
            await conn.execute("CHECKPOINT")
    return member_ids


async def copy_access_log(
    conn: asyncpg.Connection, member_ids: Sequence[uuid.UUID], results: Results
) -> None:
    """N entries, evenly spaced from ``start`` to ``now``, in time order (as a log grows):
    random members, ciphertext-sized random blobs as seed.py writes them."""
    rng = random.Random(secrets.randbits(64))
    n = results.entries
    span = (results.now - results.start) // timedelta(microseconds=1)
    boundary = _month(results.cutoff)
    done = 0
    while done < n:
        chunk = min(SEED_CHUNK, n - done)
        noise = rng.randbytes(chunk * 80)
        rows: list[tuple[Any, ...]] = []
        for i in range(chunk):
            j = done + i
            at = results.start + timedelta(microseconds=(2 * j + 1) * span // (2 * n))
            if at < results.cutoff:
                results.to_purge += 1
                if at >= boundary:
                    results.in_boundary_month += 1
            blob = noise[i * 80 : i * 80 + 80]
            rows.append(
                (
                    member_ids[rng.randrange(len(member_ids))],
                    at,
                    CT_HEADER + blob[:36],  # action: 33 + 8 bytes
                    CT_HEADER + blob[36:],  # ip: 33 + 16 bytes
                )
            )
        await conn.copy_records_to_table("access_log", records=rows, columns=ACCESS_COLUMNS)
        done += chunk
        print(f"  access log {done:,}/{n:,}", file=sys.stderr, end="\r")
    print(file=sys.stderr)


async def clone_database(admin_dsn: str, template: str, name: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        # FILE_COPY: a checkpoint and a copy of the files, instead of WAL for every page.
        await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}" STRATEGY FILE_COPY')
    finally:
        await conn.close()


# --- the concurrent logins ---------------------------------------------------------------
async def login_load(
    store: PostgresStore, members: Sequence[uuid.UUID], at: datetime, stop: asyncio.Event
) -> list[tuple[float, float]]:
    """One login every LOGIN_EVERY seconds (never two at once) until ``stop``:
    (start, end) of each, perf_counter seconds."""
    samples: list[tuple[float, float]] = []
    due = time.perf_counter()
    i = 0
    while not stop.is_set():
        entry = NewAccessEntry(
            at + timedelta(microseconds=i),
            CT_HEADER + os.urandom(36),
            CT_HEADER + os.urandom(44),
        )
        started = time.perf_counter()
        if not await store.record_login(str(members[i % len(members)]), entry, dek_id=1):
            raise RuntimeError("a login was refused")
        ended = time.perf_counter()
        samples.append((started, ended))
        i += 1
        due = max(due + LOGIN_EVERY, ended)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max(0.0, due - time.perf_counter()))
    return samples


@contextlib.asynccontextmanager
async def logins_around(
    url: str, members: Sequence[uuid.UUID], at: datetime, logins: Logins
) -> AsyncIterator[None]:
    """Logins from their own pool (the server's) for IDLE_SECONDS, then through the body;
    a login is "during" when it overlaps the body."""
    store = await PostgresStore.open(url, pool_size=2)
    stop = asyncio.Event()
    try:
        task = asyncio.create_task(login_load(store, members, at, stop))
        await asyncio.sleep(IDLE_SECONDS)
        begin = time.perf_counter()
        try:
            yield
        finally:
            end = time.perf_counter()
            stop.set()
            samples = await task
        for started, ended in samples:
            if ended < begin:
                logins.idle.append(ended - started)
            elif started <= end:
                logins.during.append(ended - started)
    finally:
        await store.close()


# --- the two purges ----------------------------------------------------------------------
async def service_pass(url: str, results: Results, members: Sequence[uuid.UUID]) -> Pass:
    result = Pass("service")
    store = await TimedStore.open(url)
    try:
        await _settle(url)
        policy = LifecyclePolicy(batch_size=results.batch)
        lifecycle = Lifecycle(store, _no_shred, FrozenClock(results.now), policy)
        async with logins_around(url, members, results.now, result.logins):
            started = time.perf_counter()
            result.rows = await lifecycle.purge_access_logs()
            result.seconds = time.perf_counter() - started
        result.calls, result.transactions, result.drops = (
            store.calls,
            store.transactions,
            store.drops,
        )
    finally:
        await store.close()
    return result


async def raw_pass(url: str, results: Results, members: Sequence[uuid.UUID]) -> Pass:
    result = Pass("raw")
    await _settle(url)
    async with _connect(url) as conn, logins_around(url, members, results.now, result.logins):
        started = time.perf_counter()
        while True:
            began = time.perf_counter()
            async with conn.transaction():
                status = await conn.execute(RAW_DELETE, results.cutoff, results.batch)
            seconds = time.perf_counter() - began
            count = int(status.rsplit(" ", 1)[-1])
            result.calls.append((seconds, count))
            result.transactions.append(("delete", seconds))
            result.rows += count
            if count < results.batch:
                break
        result.seconds = time.perf_counter() - started
    return result


async def _settle(url: str) -> None:
    async with _connect(url) as conn:
        with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
            await conn.execute("CHECKPOINT")


async def check(urls: Sequence[str], results: Results) -> None:
    """Each purge removed exactly the entries older than the cutoff; the same seeded entries
    remain in both (the logins' entries are at or after ``now``)."""
    expected = results.entries - results.to_purge
    remaining: list[tuple[int, Any, Any]] = []
    for p in results.passes:
        if p.rows != results.to_purge:
            raise RuntimeError(f"{p.scenario} purged {p.rows:,}, expected {results.to_purge:,}")
    for url in urls:
        async with _connect(url) as conn:
            old = await conn.fetchval(
                "SELECT count(*) FROM access_log WHERE at < $1", results.cutoff
            )
            if old:
                raise RuntimeError(f"{old} entries older than the cutoff are left")
            row = await conn.fetchrow(
                "SELECT count(*), min(at), sum(hashtext(entry_id::text || at::text)) "
                "FROM access_log WHERE at < $1",
                results.now,
            )
            remaining.append((int(row[0]), row[1], row[2]))
            default = await conn.fetchval("SELECT count(*) FROM access_log_default")
            if default:
                raise RuntimeError(f"{default} entries in access_log_default")
    for count, oldest, _ in remaining:
        if count != expected or oldest < results.cutoff:
            raise RuntimeError(f"{count:,} entries left (oldest {oldest}), expected {expected:,}")
    if remaining[0] != remaining[1]:
        raise RuntimeError(f"the two databases differ after the purges: {remaining}")


async def measure(admin_dsn: str, results: Results) -> None:
    base = f"pv_bench_purge_{secrets.token_hex(4)}"
    names = (f"{base}_svc", f"{base}_raw")
    urls = [database_url(admin_dsn, name) for name in names]
    await create_database(admin_dsn, names[0])
    try:
        print(
            f"{results.members:,} members, {results.entries:,} access-log entries: seeding...",
            file=sys.stderr,
        )
        started = time.perf_counter()
        members = await seed_vault(urls[0], results)
        results.seed_seconds = time.perf_counter() - started
        started = time.perf_counter()
        await clone_database(admin_dsn, names[0], names[1])
        results.clone_seconds = time.perf_counter() - started
        print(
            f"  seeded in {results.seed_seconds:.1f} s, cloned in {results.clone_seconds:.1f} s",
            file=sys.stderr,
        )
        login_members = members[:LOGIN_MEMBERS]
        service = await service_pass(urls[0], results, login_members)
        print(f"  service: {service.rows_per_s:,.0f} rows/s", file=sys.stderr)
        raw = await raw_pass(urls[1], results, login_members)
        print(f"  raw:     {raw.rows_per_s:,.0f} rows/s", file=sys.stderr)
        results.passes = [service, raw]
        await check(urls, results)
    finally:
        for name in names:
            await drop_database(admin_dsn, name)


# --- the report --------------------------------------------------------------------------
def report(results: Results) -> None:
    r = results
    print(
        f"\n{r.members:,} members, {r.entries:,} access-log entries from {r.start:%Y-%m-%d} "
        f"to {r.now:%Y-%m-%d %H:%M} UTC, batch {r.batch}"
    )
    print(
        f"cutoff {r.cutoff:%Y-%m-%d %H:%M} (now - 183 days): {r.to_purge:,} entries to purge, "
        f"{r.in_boundary_month:,} of them in the cutoff's month"
    )
    print(
        "partitions: "
        + ", ".join(f"{name.removeprefix('access_log_')} {n:,}" for name, n in r.partitions.items())
    )
    print(f"seeding {r.seed_seconds:.1f} s, clone {r.clone_seconds:.1f} s")
    print(
        f"\n{'purge':<8} {'rows':>9} {'seconds':>8} {'rows/s':>11} {'calls':>6} "
        f"{'longest call':>12} {'longest txn':>11} {'call ms 1st/last 10th':>21} "
        f"{'login ms idle med/max':>21} {'login ms during med/p99/max':>27}"
    )
    for p in r.passes:
        first, last = p.tenths()
        logins = p.logins.summary()
        idle = f"{logins['idle_median_ms']:.1f} / {logins['idle_max_ms']:.1f}"
        during = (
            f"{logins['during_median_ms']:.1f} / {logins['during_p99_ms']:.1f} / "
            f"{logins['during_max_ms']:.1f}"
        )
        print(
            f"{p.scenario:<8} {p.rows:>9,} {p.seconds:>8.3f} {p.rows_per_s:>11,.0f} "
            f"{len(p.calls):>6} {_ms(max(s for s, _ in p.calls)):>9.1f} ms "
            f"{_ms(p.longest()):>8.1f} ms {f'{_ms(first):.1f} / {_ms(last):.1f}':>21} "
            f"{idle:>21} {during:>27}"
        )
    service = r.passes[0]
    kinds = sorted({k for k, _ in service.transactions})
    print("\nservice transactions (wall time, pool acquire to after COMMIT):")
    for kind in kinds:
        times = [s for k, s in service.transactions if k == kind]
        print(
            f"  {kind:<7} {len(times):>4} x, longest {_ms(max(times)):.1f} ms, "
            f"total {_ms(sum(times)):.1f} ms"
        )
    for seconds, dropped in service.drops:
        if dropped:
            print(f"  detach + drop step: {dropped:,} entries in {_ms(seconds):.1f} ms")
    print(f"\nservice / raw rows/s: {r.ratio:.1f}")
    print(
        f"checked: both purged {r.to_purge:,}, none older than the cutoff left, the same "
        f"{r.entries - r.to_purge:,} seeded entries remain in both"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=100_000, help="members seeded")
    parser.add_argument(
        "--entries", type=int, default=2_000_000, help="access-log entries over 9 months"
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=LifecyclePolicy().batch_size,
        help="rows per purge call / DELETE (default: the lifecycle policy's)",
    )
    parser.add_argument(
        "--now",
        type=datetime.fromisoformat,
        default=DEFAULT_NOW,
        help="the lifecycle's frozen clock, with an offset (default: %(default)s, whose "
        "cutoff is a month boundary; a later day puts the rest of the cutoff's month "
        "in the batch delete)",
    )
    parser.add_argument(
        "--database-url",
        default=ADMIN_DSN,
        help="a database on the server, to create and drop the bench databases from",
    )
    parser.add_argument("--json", type=Path, help="write the results to this file")
    args = parser.parse_args(argv)
    if args.members < 1 or args.entries < 1 or args.batch < 1:
        parser.error("--members, --entries and --batch must be at least 1")
    if args.now.tzinfo is None:
        parser.error("--now needs an offset, e.g. +00:00")
    now = args.now.astimezone(UTC)
    policy = LifecyclePolicy(batch_size=args.batch)
    results = Results(
        args.members,
        args.entries,
        args.batch,
        now,
        now - policy.access_log_retention,
        start=_add_months(now, -MONTHS),
    )
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))  # warnings+
    failed = run_guarded(
        lambda: asyncio.run(measure(args.database_url, results)), PG_BENCH_FAILURES
    )
    if failed is not None:
        return failed
    report(results)
    if args.json:
        document = {
            "config": {
                "members": args.members,
                "entries": args.entries,
                "batch": args.batch,
                "now": now.isoformat(),
                "cutoff": results.cutoff.isoformat(),
                "login_every_s": LOGIN_EVERY,
                "database": "postgresql",
                "cpus": os.cpu_count(),
            },
            "to_purge": results.to_purge,
            "in_boundary_month": results.in_boundary_month,
            "partitions": results.partitions,
            "seed_seconds": round(results.seed_seconds, 3),
            "clone_seconds": round(results.clone_seconds, 3),
            "passes": [p.as_dict() for p in results.passes],
            "service_over_raw": round(results.ratio, 2),
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
