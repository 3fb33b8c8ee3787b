"""One command: each service RPC measured right after its baseline, in one run, on one machine.

    python bench/run.py [--duration 10] [--database-url URL] [--json out.json] [--check]

Pairs, back to back: bare grpc.aio echo server -> GetMember; raw argon2id verify ->
Authenticate; raw argon2id hash -> SignUp. Prints a table and the three ratios against
their targets; --check exits 1 when a target is missed or any call returned a non-OK status.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import grpc
from driver import SOURCE_PATH, Argon2Params, Load, Rpc, Stats, run_argon2, run_load, seed
from grpc_health.v1 import health_pb2, health_pb2_grpc
from guard import run_guarded


@dataclass(frozen=True)
class Ratio:
    service: str
    baseline: str
    target: float


RATIOS = (
    Ratio("GetMember", "echo baseline", 0.6),
    Ratio("Authenticate", "argon2 verify (raw)", 0.9),
    Ratio("SignUp", "argon2 hash (raw)", 0.85),
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
def serve(cmd: list[str], env: dict[str, str], log: Path) -> Iterator[str]:
    """Start a server subprocess, wait until grpc.health.v1 reports SERVING, stop it on exit."""
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
        with grpc.insecure_channel(address) as channel:
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


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def report(results: dict[str, Stats]) -> tuple[list[dict[str, object]], bool]:
    print(f"\n{'scenario':<22} {'RPS':>10} {'p50 ms':>9} {'p99 ms':>9} {'errors':>7}")
    for stats in results.values():
        print(
            f"{stats.name:<22} {_fmt(stats.rps):>10} {_fmt(stats.percentile(0.5), 2):>9} "
            f"{_fmt(stats.percentile(0.99), 2):>9} {sum(stats.errors.values()):>7}"
        )
    for stats in results.values():
        for status, count in stats.errors.most_common():
            print(f"  {stats.name}: {count} x {status}")
    ok = not any(stats.errors for stats in results.values())
    rows: list[dict[str, object]] = []
    print()
    for r in RATIOS:
        baseline = results[r.baseline].rps
        ratio = results[r.service].rps / baseline if baseline else 0.0
        passed = ratio >= r.target
        ok = ok and passed
        rows.append({**asdict(r), "ratio": round(ratio, 3), "pass": passed})
        verdict = "PASS" if passed else "MISS"
        print(
            f"{r.service + ' / ' + r.baseline:<40} {ratio:6.2f}  (target >= {r.target})  {verdict}"
        )
    return rows, ok


def measure(args: argparse.Namespace, tmp: Path) -> dict[str, Stats]:
    params = Argon2Params(args.argon2_time_cost, args.argon2_memory_cost, args.argon2_parallelism)
    env = {**os.environ, **params.env(), "PRIVACY_VAULT_DATA_DIR": str(tmp / "data")}
    if SOURCE_PATH:  # stubs and service not installed: run them from the source tree
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [SOURCE_PATH, env.get("PYTHONPATH")]))
    if args.database_url:
        env["PRIVACY_VAULT_DATABASE_URL"] = args.database_url
    (tmp / "data").mkdir()
    results: dict[str, Stats] = {}

    def record(stats: Stats) -> None:
        results[stats.name] = stats
        print(f"  {stats.name}: {stats.rps:,.1f}/s", file=sys.stderr)

    def drive(name: str, address: str, rpc: Rpc, concurrency: int, **targets: Any) -> None:
        load = Load(address, rpc, concurrency, args.warmup, args.duration, **targets)
        record(run_load(name, load, args.workers))

    def raw(name: str, op: Literal["hash", "verify"]) -> None:
        record(run_argon2(name, op, params, args.warmup, args.duration))

    print(f"running {len(RATIOS) * 2} measurements of {args.duration:g} s...", file=sys.stderr)
    with serve(ECHO_SERVER, env, tmp / "echo.log") as address:
        ids = tuple(str(uuid.uuid4()) for _ in range(args.members))
        drive("echo baseline", address, "GetMember", args.concurrency, member_ids=ids)
    with serve(SERVICE, env, tmp / "service.log") as address:
        tag = f"b{secrets.token_hex(4)}"  # unique per run, also against a reused PostgreSQL
        members = asyncio.run(seed(address, args.members, tag))
        ids, logins = tuple(m for m, _ in members), tuple(login for _, login in members)
        drive("GetMember", address, "GetMember", args.concurrency, member_ids=ids)
        raw("argon2 verify (raw)", "verify")
        drive("Authenticate", address, "Authenticate", args.password_concurrency, login_ids=logins)
        raw("argon2 hash (raw)", "hash")
        drive("SignUp", address, "SignUp", args.password_concurrency, tag=tag)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--duration", type=float, default=10.0, help="seconds measured per scenario"
    )
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring")
    parser.add_argument("--workers", type=int, default=2, help="driver processes")
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
    parser.add_argument("--json", type=Path, help="write the results to this file")
    parser.add_argument("--check", action="store_true", help="exit 1 on a missed target or error")
    args = parser.parse_args(argv)
    measured: list[dict[str, Stats]] = []

    def work() -> None:
        with tempfile.TemporaryDirectory(prefix="privacy-vault-bench-") as tmp:
            measured.append(measure(args, Path(tmp)))

    failed = run_guarded(work)
    if failed is not None:
        return failed
    (results,) = measured
    rows, ok = report(results)
    if args.json:
        document = {
            "config": {k: v for k, v in vars(args).items() if k not in ("json", "database_url")}
            | {"database": "postgresql" if args.database_url else "sqlite", "cpus": os.cpu_count()},
            "scenarios": {name: stats.summary() for name, stats in results.items()},
            "ratios": rows,
            "ok": ok,
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    return 1 if args.check and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
