"""One command: each service RPC measured interleaved with its baseline, in one run, on one machine.

    python bench/run.py [--pairs 8] [--slice 1.5] [--database-url URL] [--json out.json] [--check]
    python bench/run.py --tls ...   (the mTLS pairs of bench/tls_bench.py instead)
    python bench/run.py --metrics ...   (GetMember with / without metrics, bench/metrics_bench.py)

Pairs: bare grpc.aio echo server / GetMember; raw argon2id verify / Authenticate; raw
argon2id hash / SignUp. Each pair of scenarios alternates in short slices, A B B A A B ...,
with all servers up the whole time and only one loaded; the ratio is taken per adjacent pair
of slices, and its median and spread are reported with the pooled rates. Authenticate runs
in rounds of three, with argon2 verify behind a bare grpc.aio server (bench/echo_server.py)
as the third: Authenticate / that floor is the service's own work around the hash, the
floor / raw what the gRPC framework and the client leave of the machine (a diagnostic,
no target); SignUp likewise with the bare server's argon2 hash (both diagnostics).
--check exits 1 when a median misses its target or any call returned a non-OK status.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
from driver import (
    SOURCE_PATH,
    Argon2Params,
    ClientTls,
    Load,
    Pinning,
    RawOp,
    Sample,
    Slice,
    Stats,
    run_schedule,
    seed,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc
from guard import run_guarded


@dataclass(frozen=True)
class Ratio:
    service: str
    baseline: str
    target: float | None  # None: reported, never a miss (a diagnostic)


RATIOS = (
    Ratio("GetMember", "echo baseline", 0.6),
    Ratio("Authenticate", "argon2 verify (raw)", 0.9),
    Ratio("SignUp", "argon2 hash (raw)", 0.85),
)
#: Measured in the same rounds as Authenticate / raw: argon2 verify behind a bare grpc.aio
#: server (bench/echo_server.py). Against it, Authenticate shows the service's own work
#: around the hash (the failure counters, lookups, session, access log and their durable
#: write: at most 15%); against raw, it shows what the framework and the client leave.
BARE_VERIFY, BARE_HASH = "argon2 verify, bare grpc.aio", "argon2 hash, bare grpc.aio"
AUTHENTICATE_FLOOR = (
    Ratio("Authenticate", BARE_VERIFY, 0.85),
    Ratio(BARE_VERIFY, "argon2 verify (raw)", None),
)
#: The same for SignUp (argon2 hash behind the bare server).
SIGN_UP_FLOOR = (
    Ratio("SignUp", BARE_HASH, None),
    Ratio(BARE_HASH, "argon2 hash (raw)", None),
)
ECHO_SERVER = [sys.executable, str(Path(__file__).with_name("echo_server.py"))]
SERVICE = [sys.executable, "-m", "service", "serve"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@contextlib.contextmanager
def serve(
    cmd: list[str], env: dict[str, str], log: Path, tls: ClientTls | None = None
) -> Iterator[str]:
    """Start a server subprocess, wait until grpc.health.v1 reports SERVING, stop it on exit.
    With ``tls`` the server speaks mTLS and health is asked over it."""
    address = f"127.0.0.1:{_free_port()}"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd,
            env={**env, "PRIVACY_VAULT_LISTEN_ADDRESS": address},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches us; we stop it
        )
    try:
        deadline = time.monotonic() + 60
        channel = (
            grpc.insecure_channel(address)
            if tls is None
            else grpc.secure_channel(address, tls.credentials())
        )
        with channel:
            health: Any = health_pb2_grpc.HealthStub(channel)  # typeshed lacks its methods
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"{' '.join(cmd)} exited ({proc.returncode}):\n{_tail(log)}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{' '.join(cmd)} not SERVING after 60 s:\n{_tail(log)}")
                try:
                    reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        yield address
        if proc.poll() is not None:
            raise RuntimeError(f"{' '.join(cmd)} died during the run:\n{_tail(log)}")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def loop_env(env: dict[str, str], event_loop: str) -> dict[str, str]:
    """``env`` with the server's event loop (PRIVACY_VAULT_EVENT_LOOP) set."""
    return {**env, "PRIVACY_VAULT_EVENT_LOOP": event_loop}


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


@dataclass(frozen=True)
class Paired:
    """A ratio measured as `pairs` adjacent (service slice, baseline slice) pairs."""

    ratio: Ratio
    per_pair: list[float]  # service RPS / baseline RPS of each pair, in time order
    pooled: float  # pooled service RPS / pooled baseline RPS

    @property
    def median(self) -> float:
        return statistics.median(self.per_pair)

    @property
    def quartiles(self) -> tuple[float, float]:
        q1, _, q3 = statistics.quantiles(self.per_pair, n=4, method="inclusive")
        return q1, q3

    @property
    def passed(self) -> bool:
        return self.ratio.target is None or self.median >= self.ratio.target

    def row(self) -> dict[str, object]:
        q1, q3 = self.quartiles
        return {
            **asdict(self.ratio),
            "ratio": round(self.median, 3),  # the median of the per-pair ratios
            "q1": round(q1, 3),
            "q3": round(q3, 3),
            "min": round(min(self.per_pair), 3),
            "max": round(max(self.per_pair), 3),
            "pooled": round(self.pooled, 3),
            "per_pair": [round(x, 3) for x in self.per_pair],
            "pass": self.passed,
        }


def interleave(
    names: Sequence[str], rounds: int, length: float, settle: float, warmup: float
) -> list[Slice]:
    """A warm-up of each scenario, then `rounds` rounds with each scenario once, in
    A B C, C B A, A B C ... order: none always goes first, so a steady drift tilts every
    other round up and the rest down, and cancels in the median and in the pooled rates."""
    slices = [Slice(name, warmup, 0.0, warmup=True) for name in names]
    for round_ in range(rounds):
        for name in names if round_ % 2 == 0 else reversed(names):
            slices.append(Slice(name, settle, length))
    return slices


def measure_group(
    args: argparse.Namespace,
    ratios: Sequence[Ratio],
    loads: dict[str, Load],
    raw: dict[str, RawOp] | None = None,
    params: Argon2Params | None = None,
) -> tuple[list[Paired], list[Stats]]:
    """Every scenario the ratios name, interleaved in one schedule; each ratio is taken
    per round (the two slices of one round are at most a round apart)."""
    names = list(dict.fromkeys(n for r in ratios for n in (r.baseline, r.service)))
    schedule = interleave(names, args.pairs, args.slice, args.settle, args.warmup)
    samples = run_schedule(schedule, loads, args.workers, raw, params, args.pinning)
    stats: dict[str, Stats] = {}
    for name in names:
        mine = [
            (part, s) for part, s in zip(schedule, samples, strict=True) if part.scenario == name
        ]
        measured = [s for part, s in mine if not part.warmup]
        per_slice = [len(s.latencies_ms) / args.slice for s in measured]
        errors = Sample(errors=sum((s.errors for _, s in mine), Counter[str]()))
        stats[name] = Stats.merge(name, args.pairs * args.slice, [*measured, errors], per_slice)
    paired = []
    for ratio in ratios:
        service, baseline = stats[ratio.service], stats[ratio.baseline]
        per_pair = [
            svc / base if base else 0.0
            for svc, base in zip(service.slice_rps, baseline.slice_rps, strict=True)
        ]
        pooled = service.rps / baseline.rps if baseline.rps else 0.0
        paired.append(Paired(ratio, per_pair, pooled))
        print(
            f"  {ratio.service} / {ratio.baseline}: median {paired[-1].median:.3f}, per pair "
            + " ".join(f"{x:.2f}" for x in per_pair),
            file=sys.stderr,
        )
    return paired, list(stats.values())


def measure_pairs(
    args: argparse.Namespace,
    ratio: Ratio,
    loads: dict[str, Load],
    raw: dict[str, RawOp] | None = None,
    params: Argon2Params | None = None,
) -> tuple[Paired, list[Stats]]:
    """One ratio: its service and its baseline, interleaved."""
    (paired,), stats = measure_group(args, [ratio], loads, raw, params)
    return paired, stats


def report(results: dict[str, Stats], paired: list[Paired]) -> bool:
    print(
        f"\n{'scenario':<22} {'RPS':>9} {'slice min':>10} {'slice max':>10} "
        f"{'p50 ms':>8} {'p99 ms':>8} {'errors':>7}"
    )
    for stats in results.values():
        print(
            f"{stats.name:<22} {_fmt(stats.rps):>9} {_fmt(min(stats.slice_rps)):>10} "
            f"{_fmt(max(stats.slice_rps)):>10} {_fmt(stats.percentile(0.5), 2):>8} "
            f"{_fmt(stats.percentile(0.99), 2):>8} {sum(stats.errors.values()):>7}"
        )
    for stats in results.values():
        for status, count in stats.errors.most_common():
            print(f"  {stats.name}: {count} x {status}")
    ok = not any(stats.errors for stats in results.values())
    print(
        f"\n{'ratio (per pair of slices)':<60} {'median':>6}  {'IQR':>11}  {'min..max':>11}  "
        f"{'pooled':>6}"
    )
    for p in paired:
        ok = ok and p.passed
        q1, q3 = p.quartiles
        if p.ratio.target is None:
            verdict = "(reported, no target)"
        else:
            verdict = f"(target median >= {p.ratio.target})  {'PASS' if p.passed else 'MISS'}"
        print(
            f"{p.ratio.service + ' / ' + p.ratio.baseline:<60} {p.median:6.3f}  "
            f"{q1:5.2f}-{q3:<5.2f}  {min(p.per_pair):5.2f}-{max(p.per_pair):<5.2f}  "
            f"{p.pooled:6.2f}  {verdict}"
        )
    return ok


def measure(args: argparse.Namespace, tmp: Path) -> tuple[dict[str, Stats], list[Paired]]:
    params = Argon2Params(args.argon2_time_cost, args.argon2_memory_cost, args.argon2_parallelism)
    env = {**os.environ, **params.env(), "PRIVACY_VAULT_DATA_DIR": str(tmp / "data")}
    if SOURCE_PATH:  # stubs and service not installed: run them from the source tree
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [SOURCE_PATH, env.get("PYTHONPATH")]))
    if args.database_url:
        env["PRIVACY_VAULT_DATABASE_URL"] = args.database_url
    (tmp / "data").mkdir()
    results: dict[str, Stats] = {}
    paired: list[Paired] = []
    get_member, authenticate, sign_up = RATIOS

    def pairs(
        ratio: Ratio,
        loads: dict[str, Load],
        raw: dict[str, RawOp] | None = None,
        more: Sequence[Ratio] = (),
    ) -> None:
        group, stats = measure_group(args, [ratio, *more], loads, raw, params)
        paired.extend(group)
        results.update((s.name, s) for s in stats)

    per_ratio = 2 * args.warmup + 2 * args.pairs * (args.settle + args.slice)
    print(
        f"running {len(args.only)} interleaved groups of scenarios, ~{per_ratio:.0f} s "
        "each (Authenticate's and SignUp's, of three, half as long again)...",
        file=sys.stderr,
    )
    # Both servers stay up all through: the one not in the current slice sits idle.
    echo_cmd, service_cmd = ECHO_SERVER, SERVICE
    if args.pinning is not None:
        echo_cmd, service_cmd = map(args.pinning.server_command, (echo_cmd, service_cmd))
    with (
        serve(echo_cmd, loop_env(env, args.echo_event_loop), tmp / "echo.log") as echo,
        serve(service_cmd, loop_env(env, args.service_event_loop), tmp / "service.log") as address,
    ):
        tag = f"b{secrets.token_hex(4)}"  # unique per run, also against a reused PostgreSQL
        members = asyncio.run(seed(address, args.members, tag))
        ids, logins = tuple(m for m, _ in members), tuple(login for _, login in members)
        echo_ids = tuple(str(uuid.uuid4()) for _ in range(args.members))
        if get_member.service in args.only:
            pairs(
                get_member,
                {
                    get_member.baseline: Load(
                        echo, "GetMember", args.concurrency, member_ids=echo_ids
                    ),
                    get_member.service: Load(
                        address, "GetMember", args.concurrency, member_ids=ids
                    ),
                },
            )
        if authenticate.service in args.only:
            pairs(
                authenticate,
                {
                    authenticate.service: Load(
                        address, "Authenticate", args.password_concurrency, login_ids=logins
                    ),
                    BARE_VERIFY: Load(
                        echo, "Authenticate", args.password_concurrency, login_ids=logins
                    ),
                },
                {authenticate.baseline: "verify"},
                AUTHENTICATE_FLOOR,
            )
        if sign_up.service in args.only:
            pairs(
                sign_up,
                {
                    sign_up.service: Load(address, "SignUp", args.password_concurrency, tag=tag),
                    BARE_HASH: Load(echo, "SignUp", args.password_concurrency, tag=tag),
                },
                {sign_up.baseline: "hash"},
                SIGN_UP_FLOOR,
            )
    return results, paired


def _positive(value: str) -> float:
    number = float(value)
    if number <= 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return number


def _pairs(value: str) -> int:
    number = int(value)
    if number < 2:
        raise argparse.ArgumentTypeError("at least 2 pairs (the spread needs two)")
    return number


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--pairs", type=_pairs, default=8, help="pairs of slices (baseline, service) per ratio"
    )
    parser.add_argument("--slice", type=_positive, default=1.5, help="seconds measured per slice")
    parser.add_argument(
        "--settle",
        type=float,
        default=0.3,
        help="seconds each slice is loaded before it is measured (reaches its steady state)",
    )
    parser.add_argument(
        "--warmup", type=float, default=2.0, help="unmeasured seconds of each side first"
    )
    parser.add_argument("--workers", type=int, default=2, help="driver processes")
    parser.add_argument(
        "--echo-event-loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="the echo baseline's loop (default: a bare grpc.aio server's, asyncio)",
    )
    parser.add_argument(
        "--service-event-loop",
        choices=("asyncio", "uvloop"),
        default="uvloop",
        help="the service's loop (default: its own default, uvloop)",
    )
    parser.add_argument(
        "--concurrency", type=int, default=16, help="in-flight calls per worker for echo/GetMember"
    )
    parser.add_argument(
        "--password-concurrency",
        type=int,
        default=4,
        help="in-flight calls per worker for Authenticate/SignUp",
    )
    parser.add_argument("--members", type=int, default=64, help="members seeded via SignUp")
    parser.add_argument("--database-url", help="PRIVACY_VAULT_DATABASE_URL for the service")
    owasp = Argon2Params()
    parser.add_argument("--argon2-time-cost", type=int, default=owasp.time_cost)
    parser.add_argument("--argon2-memory-cost", type=int, default=owasp.memory_cost, help="KiB")
    parser.add_argument("--argon2-parallelism", type=int, default=owasp.parallelism)
    parser.add_argument(
        "--only",
        action="append",
        choices=[r.service for r in RATIOS],
        help="measure only this ratio (repeatable; default: all)",
    )
    parser.add_argument("--json", type=Path, help="write the results to this file")
    parser.add_argument("--check", action="store_true", help="exit 1 on a missed target or error")
    parser.add_argument(
        "--tls",
        action="store_true",
        help="the mTLS pairs instead: GetMember under a 50-entry caller policy / allow-all, "
        "and / the echo over mTLS",
    )
    parser.add_argument(
        "--metrics",
        action="store_true",
        help="the metrics pair instead: GetMember with the Prometheus endpoint on (and "
        "scraped) / GetMember without it",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="the servers and raw argon2 on the first half of the CPUs, the load driver on "
        "the rest (the client's work off the measured cores; password threads sized to it)",
    )
    args = parser.parse_args(argv)
    if args.tls and args.metrics:
        parser.error("--tls and --metrics are separate runs")
    if args.pin and (args.tls or args.metrics):
        parser.error("--pin is for the default pairs")
    args.pinning = Pinning.halves() if args.pin else None
    args.only = args.only or [r.service for r in RATIOS]
    measured: list[tuple[dict[str, Stats], list[Paired]]] = []

    def work() -> None:
        with tempfile.TemporaryDirectory(prefix="privacy-vault-bench-") as tmp:
            if args.tls:
                from tls_bench import measure_tls

                measured.append(measure_tls(args, Path(tmp)))
            elif args.metrics:
                from metrics_bench import measure_metrics

                measured.append(measure_metrics(args, Path(tmp)))
            else:
                measured.append(measure(args, Path(tmp)))

    failed = run_guarded(work)
    if failed is not None:
        return failed
    ((results, paired),) = measured
    ok = report(results, paired)
    if args.json:
        document = {
            "config": {
                k: v for k, v in vars(args).items() if k not in ("json", "database_url", "pinning")
            }
            | {"database": "postgresql" if args.database_url else "sqlite", "cpus": os.cpu_count()}
            | {
                "pinning": None
                if args.pinning is None
                else {"server": sorted(args.pinning.server), "client": sorted(args.pinning.client)}
            },
            "scenarios": {name: stats.summary() for name, stats in results.items()},
            "ratios": [p.row() for p in paired],
            "ok": ok,
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    return 1 if args.check and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
