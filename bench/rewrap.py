"""Re-wrapping every member DEK on PostgreSQL, next to a raw batched UPDATE of the same rows.

    python bench/rewrap.py [--members 1000000] [--batch-size N[,N...]] [--rounds R]
                           [--database-url ADMIN_DSN] [--json out.json] [--check]
                           [--profile out.prof]

A fresh database (``pv_bench_rewrap_<hex>``) is created on the server of ``--database-url``
and dropped at the end, also on Ctrl-C or an error. The vault opens on it (local key
provider, cheapest argon2), N members are seeded with COPY (real DEKs wrapped under KEK v1
by the vault's own provider), and then, back to back on the same table:

- service: ``vault.keys.rotate()``, then ``vault.keys.rewrap(batch_size=B)`` over all keys;
- raw: a new target version, then the same keyset SELECT and the same
  ``UPDATE ... FROM unnest(...)`` per batch of B, one transaction per batch, sequential,
  writing precomputed bytes of the same length (the wrapped DEK, its header version
  patched): the database work of a re-wrap without its crypto.

The ratio service rows/s / raw rows/s has a target of 0.5; --check exits 1 on a miss.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import os
import secrets
import struct
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import structlog
from guard import PG_BENCH_FAILURES, run_guarded
from seed import Activity, SeedOptions, seed

import vault
from vault.bindings import dek_context
from vault.keyadmin import DEFAULT_BATCH, MAX_BATCH
from vault.providers.base import KeyProvider

TARGET = 0.5
ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
SAMPLE = 1_000  # members whose DEK is kept to check that re-wrapping kept it
Scenario = Literal["service", "raw"]

# The service's own statements (vault.store.postgres), and the raw baseline's. The raw
# SELECT is the keyset query in its plain form: it starts after the all-zero UUID.
RAW_SELECT = (
    "SELECT member_id, dek_id, kek_version, wrapped_dek FROM member_keys "
    "WHERE kek_version <> $1 AND member_id > $2 ORDER BY member_id LIMIT $3"
)
APPLY_REWRAP = (
    "UPDATE member_keys AS k SET kek_version = u.to_version, wrapped_dek = u.wrapped "
    "FROM unnest($1::uuid[], $2::int[], $3::int[], $4::int[], $5::bytea[]) "
    "AS u(member_id, dek_id, from_version, to_version, wrapped) "
    "WHERE k.member_id = u.member_id AND k.dek_id = u.dek_id "
    "AND k.kek_version = u.from_version"
)
_VERSION = struct.Struct(">I")


@dataclass
class Pass:
    scenario: Scenario
    batch_size: int
    rows: int
    seconds: float
    batches: int
    #: Mean seconds per batch in the first and the last tenth of the pass (a keyset scan
    #: that degrades with progress shows here).
    first_tenth_batch_s: float
    last_tenth_batch_s: float

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0


@dataclass
class Pair:
    batch_size: int
    service_rows_per_s: float
    raw_rows_per_s: float
    ratio: float
    passed: bool


@dataclass
class Results:
    members: int
    seed_seconds: float = 0.0
    passes: list[Pass] = field(default_factory=list)


def _tenths(marks: Sequence[float], start: float) -> tuple[float, float]:
    """Mean batch duration in the first and last tenth of a pass, from batch end times."""
    durations = [b - a for a, b in zip([start, *marks[:-1]], marks, strict=True)]
    if not durations:
        return 0.0, 0.0
    k = max(1, len(durations) // 10)
    return sum(durations[:k]) / k, sum(durations[-k:]) / k


# --- the database ------------------------------------------------------------------------
def database_url(admin_dsn: str, name: str) -> str:
    parts = urlsplit(admin_dsn)
    return urlunsplit(parts._replace(path=f"/{name}"))


async def create_database(admin_dsn: str, name: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


async def drop_database(admin_dsn: str, name: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        # FORCE: connections an interrupted run left open are terminated.
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def settle(conn: asyncpg.Connection) -> None:
    """Before each timed pass (untimed): remove the previous pass's dead tuples, so each
    pass starts on the same table, and checkpoint, so each pays the same full-page writes."""
    await conn.execute("VACUUM (ANALYZE) member_keys")
    with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
        await conn.execute("CHECKPOINT")


async def version_counts(conn: asyncpg.Connection) -> dict[int, int]:
    rows = await conn.fetch("SELECT kek_version, count(*) FROM member_keys GROUP BY kek_version")
    return {int(r[0]): int(r[1]) for r in rows}


# --- the two scenarios -------------------------------------------------------------------
async def service_pass(v: vault.Vault, batch_size: int, results: Results) -> Pass:
    await v.keys.rotate("bench")
    marks: list[float] = []
    last = None
    start = time.perf_counter()
    async for progress in v.keys.rewrap("bench", batch_size=batch_size):
        marks.append(time.perf_counter())
        last = progress
    seconds = time.perf_counter() - start
    if last is None or not last.done:
        raise RuntimeError("rewrap did not finish")
    if last.skipped or last.rewrapped != results.members + 1:  # + the index key
        raise RuntimeError(f"rewrap moved {last.rewrapped} keys, skipped {last.skipped}")
    first, final = _tenths(marks[:-1], start)  # the last mark is the closing event
    return Pass("service", batch_size, results.members, seconds, last.batches, first, final)


async def raw_pass(
    conn: asyncpg.Connection, target: int, batch_size: int, *, patch: bool = True
) -> tuple[int, float, list[float], float]:
    """Walk member_keys by member id in batches: SELECT the keys not under ``target``,
    then UPDATE them from unnest() in one transaction per batch, no overlap. With
    ``patch`` the rows move to ``target`` and the wrapped DEK's header names it (the bytes
    no longer unwrap); without, each row is rewritten as it is (the warm-up)."""
    select = await conn.prepare(RAW_SELECT)
    after = uuid.UUID(int=0)
    rows = 0
    header = b"\x01" + _VERSION.pack(target)
    marks: list[float] = []
    start = time.perf_counter()
    while True:
        keys = await select.fetch(target, after, batch_size)
        if not keys:
            break
        if patch:
            to = [target] * len(keys)
            wrapped = [header + k[3][5:] for k in keys]
        else:
            to = [k[2] for k in keys]
            wrapped = [k[3] for k in keys]
        async with conn.transaction():
            status = await conn.execute(
                APPLY_REWRAP,
                [k[0] for k in keys],
                [k[1] for k in keys],
                [k[2] for k in keys],
                to,
                wrapped,
            )
        rows += int(status.rsplit(" ", 1)[-1])
        after = keys[-1][0]
        marks.append(time.perf_counter())
    return rows, time.perf_counter() - start, marks, start


async def restore(conn: asyncpg.Connection, version: int) -> None:
    """Undo a raw pass (untimed): put back the header version, so the DEKs unwrap again."""
    await conn.execute(
        "UPDATE member_keys SET kek_version = $1, "
        "wrapped_dek = overlay(wrapped_dek PLACING $2::bytea FROM 2 FOR 4)",
        version,
        _VERSION.pack(version),
    )


async def verify(
    conn: asyncpg.Connection, provider: KeyProvider, version: int, sample: dict[str, bytes]
) -> None:
    """Every key is under ``version``; the sampled DEKs unwrap under it, unchanged."""
    members = await conn.fetchval("SELECT count(*) FROM members")
    counts = await version_counts(conn)
    if counts != {version: members}:
        raise RuntimeError(f"member keys by KEK version {counts}, expected {version}: {members}")
    index_version = await conn.fetchval("SELECT kek_version FROM index_keys")
    if index_version != version:
        raise RuntimeError(f"the index key is under KEK version {index_version}, not {version}")
    rows = await conn.fetch(
        "SELECT member_id, dek_id, kek_version, wrapped_dek FROM member_keys "
        "WHERE member_id = ANY($1::uuid[])",
        [uuid.UUID(m) for m in sample],
    )
    if len(rows) != len(sample):
        raise RuntimeError("sampled members are missing")
    for r in rows:
        mid = str(r["member_id"])
        material = await provider.unwrap(
            version, bytes(r["wrapped_dek"]), dek_context(mid, int(r["dek_id"]))
        )
        if material != sample[mid]:
            raise RuntimeError(f"member {mid}: the re-wrapped DEK is not the seeded one")


async def measure(args: argparse.Namespace, url: str, results: Results) -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))  # warnings+
    with tempfile.TemporaryDirectory(prefix="privacy-vault-bench-rewrap-") as tmp:
        async with vault.open_vault(
            data_dir=Path(tmp) / "data", database_url=url, argon2=vault.CHEAPEST
        ) as v:
            provider: KeyProvider = v._provider
            print(f"seeding {args.members:,} members...", file=sys.stderr)
            started = time.perf_counter()
            sample: dict[str, bytes] = {}
            every = max(1, args.members // SAMPLE)

            def keep(index: int, member_id: uuid.UUID, dek: bytes, activity: Activity) -> None:
                if index % every == 0:
                    sample[str(member_id)] = dek

            await seed(url, provider, SeedOptions(args.members, vacuum=True, on_member=keep))
            results.seed_seconds = time.perf_counter() - started
            print(f"  seeded in {results.seed_seconds:.1f} s", file=sys.stderr)
            async with _connect(url) as conn:
                await verify(conn, provider, 1, sample)
                await _passes(args, v, conn, provider, sample, results)


@contextlib.asynccontextmanager
async def _connect(url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(url)
    try:
        yield conn
    finally:
        await conn.close()


async def _passes(
    args: argparse.Namespace,
    v: vault.Vault,
    conn: asyncpg.Connection,
    provider: KeyProvider,
    sample: dict[str, bytes],
    results: Results,
) -> None:
    # Warm-up (untimed): one raw pass rewriting every row as it is, in the timed passes'
    # order. An update moves a row here (the table has no free space after seeding, and
    # the re-wrap changes the indexed kek_version: no HOT update), so the first pass ever
    # turns the table from insertion order (random member ids) into member-id order, with
    # half of it free after VACUUM. Every timed pass then starts from that steady state,
    # vacuumed, checkpointed and cache-warm, whichever scenario ran before it.
    await settle(conn)
    started = time.perf_counter()
    await raw_pass(conn, 0, max(args.batch_size), patch=False)
    print(f"  warm-up pass {time.perf_counter() - started:.1f} s", file=sys.stderr)
    profiler = cProfile.Profile() if args.profile else None
    valid = 1  # the KEK version every wrapped DEK really unwraps under
    for round_ in range(args.rounds):
        # Service first in even rounds, raw first in odd ones: neither side always
        # follows the other.
        order: tuple[Scenario, ...] = ("service", "raw") if round_ % 2 == 0 else ("raw", "service")
        for batch_size in args.batch_size:
            for scenario in order:
                if scenario == "service":
                    await settle(conn)
                    if profiler:
                        profiler.enable()
                    done = await service_pass(v, batch_size, results)
                    if profiler:
                        profiler.disable()
                    valid = (await v.keys.status()).active_version
                    await verify(conn, provider, valid, sample)
                else:
                    target = (await v.keys.rotate("bench")).version
                    await settle(conn)
                    rows, seconds, marks, start = await raw_pass(conn, target, batch_size)
                    counts = await version_counts(conn)
                    if rows != results.members or counts != {target: rows}:
                        raise RuntimeError(f"raw pass: {rows} rows, {counts}")
                    first, final = _tenths(marks, start)
                    done = Pass("raw", batch_size, rows, seconds, len(marks), first, final)
                    # Back to DEKs that unwrap (untimed), for a later service pass.
                    await restore(conn, valid)
                    await verify(conn, provider, valid, sample)
                results.passes.append(done)
                print(
                    f"  {done.scenario:<8} batch {batch_size:>6}: "
                    f"{done.rows_per_s:>10,.0f} rows/s ({done.seconds:.1f} s)",
                    file=sys.stderr,
                )
    if profiler:
        profiler.dump_stats(args.profile)


# --- the report --------------------------------------------------------------------------
def pairs(results: Results) -> list[Pair]:
    """Per batch size: total rows / total seconds of each scenario, and their ratio."""
    out: list[Pair] = []
    for batch_size in dict.fromkeys(p.batch_size for p in results.passes):
        rate: dict[str, float] = {}
        for scenario in ("service", "raw"):
            chosen = [
                p for p in results.passes if p.batch_size == batch_size and p.scenario == scenario
            ]
            seconds = sum(p.seconds for p in chosen)
            rate[scenario] = sum(p.rows for p in chosen) / seconds if seconds else 0.0
        ratio = rate["service"] / rate["raw"] if rate["raw"] else 0.0
        out.append(Pair(batch_size, rate["service"], rate["raw"], ratio, ratio >= TARGET))
    return out


def report(results: Results) -> list[Pair]:
    seed_rate = results.members / results.seed_seconds if results.seed_seconds else 0.0
    print(
        f"\nseeding {results.members:,} members (COPY, real DEK wraps): "
        f"{results.seed_seconds:.1f} s, {seed_rate:,.0f} members/s (not in the ratio)"
    )
    print(
        f"\n{'scenario':<10} {'batch':>6} {'rows':>10} {'seconds':>8} {'rows/s':>10} "
        f"{'batch ms (first/last 10%)':>26}"
    )
    for p in results.passes:
        tenths = f"{p.first_tenth_batch_s * 1e3:.1f} / {p.last_tenth_batch_s * 1e3:.1f}"
        print(
            f"{p.scenario:<10} {p.batch_size:>6} {p.rows:>10,} {p.seconds:>8.2f} "
            f"{p.rows_per_s:>10,.0f} {tenths:>26}"
        )
    print()
    result = pairs(results)
    for pair in result:
        verdict = "PASS" if pair.passed else "MISS"
        print(
            f"service / raw, batch {pair.batch_size:>6}: {pair.ratio:5.2f}  "
            f"(target >= {TARGET})  {verdict}"
        )
    return result


def _batch_sizes(text: str) -> list[int]:
    sizes = [int(part) for part in text.split(",") if part.strip()]
    if not sizes or not all(1 <= s <= MAX_BATCH for s in sizes):
        raise argparse.ArgumentTypeError(f"batch sizes are 1-{MAX_BATCH}")
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=1_000_000, help="members seeded")
    parser.add_argument(
        "--batch-size",
        type=_batch_sizes,
        default=[DEFAULT_BATCH],
        help=f"rows per batch, or a comma-separated list (default: the service's {DEFAULT_BATCH})",
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="pairs per batch size (order alternates)"
    )
    parser.add_argument(
        "--database-url",
        default=ADMIN_DSN,
        help="a database on the server, to create and drop the bench database from",
    )
    parser.add_argument("--json", type=Path, help="write the results to this file")
    parser.add_argument("--check", action="store_true", help="exit 1 when a ratio misses")
    parser.add_argument("--profile", type=Path, help="cProfile the service passes to this file")
    args = parser.parse_args(argv)
    if args.members < 1 or args.rounds < 1:
        parser.error("--members and --rounds must be at least 1")
    name = f"pv_bench_rewrap_{secrets.token_hex(4)}"
    results = Results(args.members)

    def work() -> None:
        asyncio.run(create_database(args.database_url, name))
        try:
            asyncio.run(measure(args, database_url(args.database_url, name), results))
        finally:
            asyncio.run(drop_database(args.database_url, name))

    failed = run_guarded(work, PG_BENCH_FAILURES)
    if failed is not None:
        return failed
    result = report(results)
    ok = all(pair.passed for pair in result)
    if args.json:
        document = {
            "config": {
                "members": args.members,
                "batch_sizes": args.batch_size,
                "rounds": args.rounds,
                "database": "postgresql",
                "cpus": os.cpu_count(),
            },
            "seed_seconds": round(results.seed_seconds, 3),
            "passes": [asdict(p) | {"rows_per_s": round(p.rows_per_s, 1)} for p in results.passes],
            "ratios": [asdict(p) | {"target": TARGET} for p in result],
            "ok": ok,
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    return 1 if args.check and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
