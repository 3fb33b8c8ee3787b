"""One lifecycle expiry sweep over the due members, next to a direct shred of as many.

    python bench/sweep.py [--members 1000000] [--due-fraction 0.01] [--compare-members 100000]
                          [--database-url ADMIN_DSN] [--json out.json] [--check]

Per size (``--compare-members`` first, then ``--members``) a fresh database
(``pv_bench_sweep_<hex>``) is created on the server of ``--database-url`` and dropped at the
end, also on Ctrl-C or an error. The vault opens on it (local key provider, cheapest argon2)
and N members are seeded with COPY: real DEKs wrapped under KEK v1, 2 consents and 3
access-log entries per due member. ``due`` = N x ``--due-fraction`` members (the same
absolute number at the comparison size) are due for expiry in each of two halves, spread
evenly through the table: last seen 366-426 days ago, inactivity notice sent 31-51 days
ago. Everyone else was seen within the last 300 days and has no notice (so nobody is due
for a notice either). Then, on the same database:

- the sweep's SELECTs, timed and under EXPLAIN (ANALYZE, BUFFERS): the expiry listing of
  one batch and of every due member, and the (empty) notice listing;
- direct: ``Vault.shred(member_id)`` of the direct half, one after the other;
- sweep: ``Lifecycle.expire_inactive()`` (the sidecar's step: batches of the policy's 500,
  each member re-read and shredded through ``Vault.shred``) on a FrozenClock set to now,
  which then finds exactly the sweep half;
- empty: ``Lifecycle.run_round()`` with nothing due (expiry, notices, access-log purge),
  5 times.

Targets at ``--members``: sweep shreds/s >= 0.5 x direct shreds/s, and the median empty round
<= 50 ms; --check exits 1 on a miss (2 when the bench could not run).
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
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import structlog
from guard import PG_BENCH_FAILURES, run_guarded
from rewrap import ADMIN_DSN, _connect, create_database, database_url, drop_database
from seed import TWO_YEARS, Activity, SeedOptions, seed

import vault
from vault.clock import FrozenClock
from vault.lifecycle import Lifecycle, LifecyclePolicy
from vault.providers.base import KeyProvider

RATIO_TARGET = 0.5  # sweep shreds/s over direct shreds/s, at least
EMPTY_LIMIT_MS = 50.0  # median empty round, at most
EMPTY_ROUNDS = 5
SELECT_REPEATS = 5
ACCESS_PER_DUE = 3
CONSENTS = ("marketing_email", "analytics")
ACTIVE_SPAN = timedelta(days=300)  # everyone not due was seen within this
DUE_SEEN = timedelta(days=366)  # due members were last seen at least this long ago ...
DUE_NOTICE = timedelta(days=31)  # ... and noticed at least this long ago
DUE_SPREAD = 60 * 86_400  # seconds of spread of the due members' last_seen_at
NOTICE_SPREAD = 20 * 86_400
REASON = "bench"

EXPIRY_SELECT = (
    "SELECT member_id FROM members WHERE inactivity_notice_at IS NOT NULL "
    "AND last_seen_at < $1 AND inactivity_notice_at < $2 ORDER BY last_seen_at LIMIT $3"
)
NOTICE_SELECT = (
    "SELECT member_id, last_seen_at FROM members "
    "WHERE inactivity_notice_at IS NULL AND last_seen_at < $1 "
    "ORDER BY last_seen_at LIMIT $2"
)
_PLAN_KEYS = ("Limit", "Sort", "Scan", "Index Cond", "Filter", "Heap Blocks", "Buffers")


@dataclass
class Run:
    members: int
    due_per_half: int
    seed_seconds: float = 0.0
    #: members_due_for_expiry with everyone due still there (2 x due_per_half):
    #: one batch (the policy's 500) and all of them; median of SELECT_REPEATS, ms.
    expiry_select_batch_ms: float = 0.0
    expiry_select_all_ms: float = 0.0
    notice_select_ms: float = 0.0  # nothing due for a notice
    members_pages: int = 0  # heap pages of the members table after seeding
    expiry_plan: list[str] = field(default_factory=list)  # LIMIT 500, key lines
    #: The same with bitmap scans off: what an ordered index scan would touch.
    expiry_plan_no_bitmap: list[str] = field(default_factory=list)
    notice_plan: list[str] = field(default_factory=list)
    empty_expiry_plan: list[str] = field(default_factory=list)  # after the sweep
    direct_seconds: float = 0.0
    sweep_seconds: float = 0.0
    sweep_batches: int = 0
    sweep_first_batch_ms: float = 0.0
    sweep_last_full_batch_ms: float = 0.0
    empty_round_ms: list[float] = field(default_factory=list)

    @property
    def direct_per_s(self) -> float:
        return self.due_per_half / self.direct_seconds if self.direct_seconds else 0.0

    @property
    def sweep_per_s(self) -> float:
        return self.due_per_half / self.sweep_seconds if self.sweep_seconds else 0.0

    @property
    def ratio(self) -> float:
        return self.sweep_per_s / self.direct_per_s if self.direct_per_s else 0.0

    @property
    def empty_median_ms(self) -> float:
        return statistics.median(self.empty_round_ms) if self.empty_round_ms else 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {
            "direct_shreds_per_s": round(self.direct_per_s, 1),
            "sweep_shreds_per_s": round(self.sweep_per_s, 1),
            "sweep_over_direct": round(self.ratio, 3),
            "empty_round_median_ms": round(self.empty_median_ms, 2),
        }


@dataclass
class Seeded:
    sweep: list[uuid.UUID]
    direct: list[uuid.UUID]


# --- seeding -----------------------------------------------------------------------------
async def seed_due(
    url: str, provider: KeyProvider, members: int, due_per_half: int, now: datetime
) -> Seeded:
    """COPY ``members`` members with their keys (``seed.seed``); every ``stride``-th member
    is due, alternately in the sweep's and the direct shred's half, with consents and
    access-log entries."""
    stride = members // (2 * due_per_half)
    due: list[uuid.UUID] = []

    def activity(index: int, rng: random.Random) -> Activity:
        position, rest = divmod(index, stride)
        if rest == 0 and position < 2 * due_per_half:
            seen = now - DUE_SEEN - timedelta(seconds=rng.randrange(DUE_SPREAD))
            notice = now - DUE_NOTICE - timedelta(seconds=rng.randrange(NOTICE_SPREAD))
            extras = True
        else:
            seen = now - timedelta(seconds=rng.randrange(int(ACTIVE_SPAN.total_seconds())))
            notice, extras = None, False
        created = seen - timedelta(seconds=rng.randrange(TWO_YEARS))
        return Activity(created, seen, notice, extras)

    def keep(index: int, member_id: uuid.UUID, dek: bytes, seeded_as: Activity) -> None:
        if seeded_as.extras:
            due.append(member_id)

    options = SeedOptions(
        members,
        activity=activity,
        consents=CONSENTS,
        access_log=ACCESS_PER_DUE,
        on_member=keep,
    )
    await seed(url, provider, options)
    # The due members in seeding order alternate between the halves, the sweep's first.
    seeded = Seeded(due[0::2], due[1::2])
    if len(seeded.sweep) != due_per_half or len(seeded.direct) != due_per_half:
        raise RuntimeError(f"seeded {len(seeded.sweep)} + {len(seeded.direct)} due members")
    return seeded


async def settle(conn: asyncpg.Connection) -> None:
    """Untimed, before each measurement: dead tuples gone, statistics fresh, checkpointed."""
    for table in ("members", "member_keys", "consents", "access_log", "outbox"):
        await conn.execute(f"VACUUM (ANALYZE) {table}")
    with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
        await conn.execute("CHECKPOINT")


# --- measurements ------------------------------------------------------------------------
async def plan(conn: asyncpg.Connection, query: str, *args: Any) -> list[str]:
    rows = await conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS) {query}", *args)
    lines = [str(r[0]).rstrip() for r in rows]
    # The execution's lines; of the planning section only its time.
    cut = next((i for i, line in enumerate(lines) if line.startswith("Planning")), len(lines))
    kept = [line for line in lines[:cut] if any(k in line for k in _PLAN_KEYS)]
    return kept + [line for line in lines[cut:] if line.startswith(("Planning Time", "Execution"))]


async def median_ms(call: Any, repeats: int = SELECT_REPEATS) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        await call()
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


async def check_gone(conn: asyncpg.Connection, ids: Sequence[uuid.UUID], members: int) -> None:
    ids = list(ids)
    for table in ("members", "member_keys", "consents", "access_log"):
        left = await conn.fetchval(
            f"SELECT count(*) FROM {table} WHERE member_id = ANY($1::uuid[])", ids
        )
        if left:
            raise RuntimeError(f"{left} {table} rows of shredded members are left")
    records = await conn.fetchval(
        "SELECT count(*) FROM destruction_records WHERE member_id = ANY($1::uuid[])", ids
    )
    if records != len(ids):
        raise RuntimeError(f"{records} destruction records for {len(ids)} shreds")
    remaining = await conn.fetchval("SELECT count(*) FROM members")
    if remaining != members:
        raise RuntimeError(f"{remaining} members left, expected {members}")


async def measure(admin_dsn: str, members: int, due_per_half: int) -> Run:
    run = Run(members, due_per_half)
    name = f"pv_bench_sweep_{secrets.token_hex(4)}"
    url = database_url(admin_dsn, name)
    await create_database(admin_dsn, name)
    try:
        with tempfile.TemporaryDirectory(prefix="privacy-vault-bench-sweep-") as tmp:
            async with (
                vault.open_vault(
                    data_dir=Path(tmp) / "data", database_url=url, argon2=vault.CHEAPEST
                ) as v,
                _connect(url) as conn,
            ):
                await _measure(v, conn, url, run)
    finally:
        await drop_database(admin_dsn, name)
    return run


async def _measure(v: vault.Vault, conn: asyncpg.Connection, url: str, run: Run) -> None:
    now = datetime.now(UTC)
    clock = FrozenClock(now)
    policy = LifecyclePolicy()
    batch = policy.batch_size
    print(
        f"{run.members:,} members, {run.due_per_half:,} due in each half: seeding...",
        file=sys.stderr,
    )
    started = time.perf_counter()
    seeded = await seed_due(url, v._provider, run.members, run.due_per_half, now)
    run.seed_seconds = time.perf_counter() - started
    print(f"  seeded in {run.seed_seconds:.1f} s", file=sys.stderr)
    await settle(conn)

    # The sweep's own cutoffs (vault.lifecycle): strict, one tick past the boundary.
    tick = timedelta(microseconds=1)
    seen_cutoff = now - policy.inactivity + tick
    notice_cutoff = now - policy.notice_lead + tick
    notice_seen_cutoff = now - (policy.inactivity - policy.notice_lead) + tick
    store = v.parts.store
    due_all = 2 * run.due_per_half
    listed = await store.members_due_for_expiry(seen_cutoff, notice_cutoff, due_all + 1)
    if len(listed) != due_all:
        raise RuntimeError(f"{len(listed)} members due for expiry, expected {due_all}")
    if await store.members_due_for_notice(notice_seen_cutoff, batch):
        raise RuntimeError("members are due for a notice")
    run.expiry_select_batch_ms = await median_ms(
        lambda: store.members_due_for_expiry(seen_cutoff, notice_cutoff, batch)
    )
    run.expiry_select_all_ms = await median_ms(
        lambda: store.members_due_for_expiry(seen_cutoff, notice_cutoff, due_all)
    )
    run.notice_select_ms = await median_ms(
        lambda: store.members_due_for_notice(notice_seen_cutoff, batch)
    )
    run.expiry_plan = await plan(conn, EXPIRY_SELECT, seen_cutoff, notice_cutoff, batch)
    run.notice_plan = await plan(conn, NOTICE_SELECT, notice_seen_cutoff, batch)
    await conn.execute("SET enable_bitmapscan = off")
    try:
        run.expiry_plan_no_bitmap = await plan(
            conn, EXPIRY_SELECT, seen_cutoff, notice_cutoff, batch
        )
    finally:
        await conn.execute("RESET enable_bitmapscan")
    run.members_pages = await conn.fetchval(
        "SELECT pg_relation_size('members') / current_setting('block_size')::int"
    )

    # Direct: the same Vault.shred the sidecar calls, on the direct half, back to back.
    await settle(conn)
    started = time.perf_counter()
    for member_id in seeded.direct:
        await v.shred(str(member_id), REASON)
    run.direct_seconds = time.perf_counter() - started
    print(f"  direct: {run.direct_per_s:,.0f} shreds/s", file=sys.stderr)
    await check_gone(conn, seeded.direct, run.members - run.due_per_half)

    # Sweep: what is due now is exactly the sweep half.
    await settle(conn)
    marks: list[tuple[float, int]] = []

    async def on_batch(step: str, count: int) -> None:
        marks.append((time.perf_counter(), count))

    lifecycle = Lifecycle(store, v.shred, clock, policy, on_batch=on_batch)
    started = time.perf_counter()
    shredded = await lifecycle.expire_inactive()
    run.sweep_seconds = time.perf_counter() - started
    if shredded != run.due_per_half:
        raise RuntimeError(f"the sweep shredded {shredded}, expected {run.due_per_half}")
    durations = [
        (b - a, count)
        for a, (b, count) in zip([started, *(m[0] for m in marks)], marks, strict=False)
    ]
    full = [d for d, count in durations if count == batch]
    run.sweep_batches = len(marks)
    run.sweep_first_batch_ms = durations[0][0] * 1e3 if durations else 0.0
    run.sweep_last_full_batch_ms = full[-1] * 1e3 if full else 0.0
    print(f"  sweep:  {run.sweep_per_s:,.0f} shreds/s", file=sys.stderr)
    await check_gone(conn, seeded.sweep, run.members - 2 * run.due_per_half)

    # Empty: a whole round with nothing due.
    await settle(conn)
    run.empty_expiry_plan = await plan(conn, EXPIRY_SELECT, seen_cutoff, notice_cutoff, batch)
    empty = Lifecycle(store, v.shred, clock, policy)
    for _ in range(EMPTY_ROUNDS):
        started = time.perf_counter()
        report = await empty.run_round()
        run.empty_round_ms.append((time.perf_counter() - started) * 1e3)
        if report.shredded or report.notices or report.access_log_purged:
            raise RuntimeError(f"the empty round did something: {report.as_dict()}")


# --- the report --------------------------------------------------------------------------
def report(runs: list[Run]) -> bool:
    print(
        f"\n{'members':>10} {'due/half':>8} {'seed s':>7} {'direct/s':>9} {'sweep/s':>8} "
        f"{'sweep/direct':>12} {'batches':>7} {'batch ms 1st/last':>17} "
        f"{'SELECT ms 500/all':>17} {'notice SELECT ms':>16} {'empty round ms':>14}"
    )
    for r in runs:
        batch_ms = f"{r.sweep_first_batch_ms:.0f} / {r.sweep_last_full_batch_ms:.0f}"
        select_ms = f"{r.expiry_select_batch_ms:.2f} / {r.expiry_select_all_ms:.2f}"
        print(
            f"{r.members:>10,} {r.due_per_half:>8,} {r.seed_seconds:>7.1f} "
            f"{r.direct_per_s:>9,.0f} {r.sweep_per_s:>8,.0f} {r.ratio:>12.2f} "
            f"{r.sweep_batches:>7} {batch_ms:>17} {select_ms:>17} "
            f"{r.notice_select_ms:>16.2f} {r.empty_median_ms:>14.2f}"
        )
    main, *_ = runs[-1:]
    for r in runs:
        print(
            f"\nEXPLAIN (ANALYZE, BUFFERS), {r.members:,} members ({r.members_pages:,} heap pages):"
        )
        for title, lines in (
            (f"expiry, {2 * r.due_per_half:,} due, LIMIT 500", r.expiry_plan),
            ("the same, enable_bitmapscan = off (for comparison)", r.expiry_plan_no_bitmap),
            ("notice, none due, LIMIT 500", r.notice_plan),
            ("expiry, none due (after the sweep), LIMIT 500", r.empty_expiry_plan),
        ):
            print(f"  {title}:")
            for line in lines:
                print(f"    {line}")
    if len(runs) > 1:
        small = runs[0]
        select = _ratio(main.expiry_select_all_ms, small.expiry_select_all_ms)
        print(
            f"\n{main.members:,} vs {small.members:,} members, same due count: "
            f"sweep shreds/s x{_ratio(main.sweep_per_s, small.sweep_per_s):.2f}, "
            f"expiry SELECT (all due) time x{select:.2f}, "
            f"empty round time x{_ratio(main.empty_median_ms, small.empty_median_ms):.2f}"
        )
    ratio_ok = main.ratio >= RATIO_TARGET
    empty_ok = main.empty_median_ms <= EMPTY_LIMIT_MS
    print(
        f"\nsweep / direct at {main.members:,}: {main.ratio:.2f} (target >= {RATIO_TARGET})  "
        f"{'PASS' if ratio_ok else 'MISS'}"
    )
    print(
        f"empty round at {main.members:,}: median {main.empty_median_ms:.1f} ms of "
        f"{EMPTY_ROUNDS}, max {max(main.empty_round_ms):.1f} ms (target median <= "
        f"{EMPTY_LIMIT_MS:.0f} ms)  {'PASS' if empty_ok else 'MISS'}"
    )
    return ratio_ok and empty_ok


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=1_000_000, help="members seeded")
    parser.add_argument(
        "--due-fraction",
        type=float,
        default=0.01,
        help="members due for expiry in each half (sweep, direct), as a fraction of --members",
    )
    parser.add_argument(
        "--compare-members",
        type=int,
        default=100_000,
        help="also run at this size with the same due count first (0: skip)",
    )
    parser.add_argument(
        "--database-url",
        default=ADMIN_DSN,
        help="a database on the server, to create and drop the bench databases from",
    )
    parser.add_argument("--json", type=Path, help="write the results to this file")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target misses")
    args = parser.parse_args(argv)
    due = round(args.members * args.due_fraction)
    if due < 1 or 2 * due > args.members:
        parser.error("--members x --due-fraction must be at least 1 and at most half the members")
    sizes = [args.members]
    if args.compare_members:
        if 2 * due > args.compare_members:
            parser.error("--compare-members must hold twice the due members")
        sizes.insert(0, args.compare_members)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))  # warnings+
    runs: list[Run] = []
    failed = run_guarded(
        lambda: runs.extend(asyncio.run(measure(args.database_url, size, due)) for size in sizes),
        PG_BENCH_FAILURES,
    )
    if failed is not None:
        return failed
    ok = report(runs)
    if args.json:
        document = {
            "config": {
                "members": args.members,
                "due_fraction": args.due_fraction,
                "compare_members": args.compare_members,
                "batch_size": LifecyclePolicy().batch_size,
                "database": "postgresql",
                "cpus": os.cpu_count(),
            },
            "targets": {
                "sweep_over_direct_min": RATIO_TARGET,
                "empty_round_ms_max": EMPTY_LIMIT_MS,
            },
            "runs": [r.as_dict() for r in runs],
            "ok": ok,
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    return 1 if args.check and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
