"""``privacy-vault sidecar``: the lifecycle sidecar as a process (or one round of it).

``--once`` runs one round and reports each lifecycle step's count; ``--dry-run``
only counts, from the stores alone. The report is built from the lifecycle's own
step names (:attr:`vault.lifecycle.Lifecycle.steps`): JSON lines off a terminal,
one per step, else one line of text per step.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Sequence
from typing import TextIO

from service.cli_common import Output
from service.config import Settings
from service.wiring import (
    build_sidecar,
    open_configured_vault,
    open_dry_run_lifecycle,
    serving_metrics,
)
from vault.lifecycle import LifecycleStep, RoundReport


def print_report(steps: Sequence[LifecycleStep], report: RoundReport | None, out: TextIO) -> None:
    """One JSON line per step (for scripts and log shippers) unless on a terminal."""
    output = Output(out)
    if report is None:
        if output.tty:
            out.write("another sidecar holds the lease\n")
        else:
            output.line("lease", held_elsewhere=True)
        return
    verb = "would be " if report.dry_run else ""
    for step in steps:
        count = report.count(step)
        if output.tty:
            out.write(f"{step.label.replace('_', ' ')}: {count} {verb}".rstrip() + "\n")
        else:
            output.line("step", step=step.label, count=count, dry_run=report.dry_run)
    out.flush()


async def _dry_run(settings: Settings, out: TextIO) -> int:
    """Counts from the stores alone: no key file, no migration, no lease, no write."""
    async with open_dry_run_lifecycle(settings) as lifecycle:
        if lifecycle is None:
            # Opening would create it: a dry run changes nothing.
            print("no database in the data directory; nothing to do", file=sys.stderr)
            return 1
        report = await lifecycle.run_round(dry_run=True)
    print_report(lifecycle.steps, report, out)
    return 0


async def run_cli(
    settings: Settings, *, once: bool, dry_run: bool, interval: float | None, out: TextIO
) -> int:
    """``privacy-vault sidecar``: the exit code."""
    if dry_run:
        return await _dry_run(settings, out)
    async with open_configured_vault(settings) as vault:
        if once:
            sidecar = build_sidecar(vault, settings, interval=interval)
            try:
                report = await sidecar.run_round()
            finally:
                await sidecar.release()
            print_report(sidecar.lifecycle.steps, report, out)
            return 0
        # A process that stays up serves its own metrics (one round has nothing to scrape).
        async with serving_metrics(settings, vault) as metrics:
            sidecar = build_sidecar(vault, settings, interval=interval, metrics=metrics)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            await sidecar.run(stop)
    return 0
