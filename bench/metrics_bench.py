"""The metrics pair (issue 11), run by ``python bench/run.py --metrics`` with run.py's
machinery: GetMember on a server with its Prometheus endpoint on (and scraped, as
Prometheus would) / GetMember on the same server without it (target >= 0.95: what
counting every call costs).

Both services are subprocesses of this run, up the whole time, each on a data directory
of its own (or on the one PostgreSQL database, under different seeded members), with
the same settings but ``PRIVACY_VAULT_METRICS_ADDRESS``. A thread scrapes the endpoint
every ``SCRAPE_SECONDS`` through the whole run, so the cost of a scrape is in the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import socket
import sys
import threading
import urllib.request
from pathlib import Path

from driver import SOURCE_PATH, Argon2Params, Load, seed
from run import SERVICE, Paired, Ratio, Stats, measure_pairs, serve

METRICS_RATIO = Ratio("GetMember, metrics on", "GetMember, metrics off", 0.95)
SCRAPE_SECONDS = 5.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class _Scraper(threading.Thread):
    """Scrapes ``url`` every SCRAPE_SECONDS until stopped; counts scrapes and failures."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.stopped = threading.Event()
        self.scrapes = self.failures = 0

    def run(self) -> None:
        while not self.stopped.wait(SCRAPE_SECONDS):
            try:
                with urllib.request.urlopen(self.url, timeout=10) as reply:
                    reply.read()
                self.scrapes += 1
            except OSError:
                self.failures += 1


def measure_metrics(args: argparse.Namespace, tmp: Path) -> tuple[dict[str, Stats], list[Paired]]:
    params = Argon2Params(args.argon2_time_cost, args.argon2_memory_cost, args.argon2_parallelism)
    base = {**os.environ, **params.env()}
    if SOURCE_PATH:
        base["PYTHONPATH"] = os.pathsep.join(filter(None, [SOURCE_PATH, base.get("PYTHONPATH")]))
    if args.database_url:
        base["PRIVACY_VAULT_DATABASE_URL"] = args.database_url
    metrics_address = f"127.0.0.1:{_free_port()}"
    with_metrics = base | {
        "PRIVACY_VAULT_DATA_DIR": str(tmp / "data-metrics"),
        "PRIVACY_VAULT_METRICS_ADDRESS": metrics_address,
    }
    without = base | {"PRIVACY_VAULT_DATA_DIR": str(tmp / "data-plain")}
    results: dict[str, Stats] = {}
    print("running the metrics pair (GetMember with / without metrics)...", file=sys.stderr)
    with (
        serve(SERVICE, with_metrics, tmp / "service-metrics.log") as measured,
        serve(SERVICE, without, tmp / "service-plain.log") as plain,
    ):
        tag = f"b{secrets.token_hex(4)}"
        measured_ids = tuple(m for m, _ in asyncio.run(seed(measured, args.members, tag)))
        plain_ids = tuple(m for m, _ in asyncio.run(seed(plain, args.members, tag + "p")))
        scraper = _Scraper(f"http://{metrics_address}/metrics")
        scraper.start()
        try:
            paired, stats = measure_pairs(
                args,
                METRICS_RATIO,
                {
                    METRICS_RATIO.service: Load(
                        measured, "GetMember", args.concurrency, member_ids=measured_ids
                    ),
                    METRICS_RATIO.baseline: Load(
                        plain, "GetMember", args.concurrency, member_ids=plain_ids
                    ),
                },
            )
        finally:
            scraper.stopped.set()
            scraper.join()
        print(
            f"  {scraper.scrapes} scrapes of {scraper.url}, {scraper.failures} failed",
            file=sys.stderr,
        )
        if scraper.failures:
            raise RuntimeError(f"{scraper.failures} scrapes of the metrics endpoint failed")
    results.update((s.name, s) for s in stats)
    return results, [paired]
