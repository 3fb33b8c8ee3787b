"""The lifecycle sidecar: runs :mod:`vault.lifecycle`'s steps on a timer.

Only the holder of the ``lifecycle`` lease acts, so any number of sidecars (one per
replica, or one in each embedded server) can run against one database. The lease
is renewed before every step and outlives a few intervals, so a crashed holder is
replaced within that time. Logs carry counts only, never personal data.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import socket
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import TextIO

import structlog

from service.config import Settings
from service.mailer import OutboxRelay, build_relay
from vault import Clock, SystemClock, Vault
from vault.bootstrap import default_database_url, retention_database_url
from vault.errors import StorageUnavailable
from vault.keyadmin import KeyAdmin
from vault.lifecycle import Lifecycle, LifecyclePolicy, RoundReport
from vault.store import database_backend, open_retention_store, open_store
from vault.store.base import Store

log = structlog.get_logger("service.sidecar")

LEASE_NAME = "lifecycle"
# The lease outlives this many intervals: a slow round keeps it, a dead holder loses it.
_LEASE_INTERVALS = 3
_MIN_LEASE = timedelta(seconds=30)


def make_holder() -> str:
    """hostname:pid:random, unique per process even across container restarts."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def lifecycle_policy(settings: Settings) -> LifecyclePolicy:
    return LifecyclePolicy(
        inactivity=timedelta(days=settings.inactivity_days),
        notice_lead=timedelta(days=settings.inactivity_notice_days),
        access_log_retention=timedelta(days=settings.access_log_retention_days),
    )


class Sidecar:
    def __init__(
        self,
        lifecycle: Lifecycle,
        store: Store,
        clock: Clock,
        *,
        interval: float,
        holder: str | None = None,
        relay: OutboxRelay | None = None,
        keys: KeyAdmin | None = None,
        rotate_after: timedelta | None = None,
    ) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        self._lifecycle = lifecycle
        self._store = store
        self._clock = clock
        self._interval = interval
        self._ttl = max(timedelta(seconds=interval * _LEASE_INTERVALS), _MIN_LEASE)
        self.holder = holder or make_holder()
        self._relay = relay
        if (keys is None) != (rotate_after is None):
            raise ValueError("key maintenance needs both keys and rotate_after")
        self._keys = keys
        self._rotate_after = rotate_after

    @classmethod
    def for_vault(
        cls, vault: Vault, settings: Settings, *, interval: float | None = None
    ) -> Sidecar:
        lifecycle = Lifecycle(
            vault.store,
            vault.shred,
            vault.clock,
            lifecycle_policy(settings),
            retained=vault.retention.store,
        )
        return cls(
            lifecycle,
            vault.store,
            vault.clock,
            interval=settings.sidecar_interval_seconds if interval is None else interval,
            relay=build_relay(settings, vault.store, vault, vault.clock),
            keys=vault.keys if settings.sidecar_key_maintenance else None,
            rotate_after=(
                timedelta(days=settings.kek_rotation_days)
                if settings.sidecar_key_maintenance
                else None
            ),
        )

    async def _hold(self) -> bool:
        return await self._store.acquire_lease(
            LEASE_NAME, self.holder, self._clock.now(), self._ttl
        )

    async def run_round(self, *, dry_run: bool = False) -> RoundReport | None:
        """One round of every step; None if another sidecar holds the lease.

        A dry run takes no lease (it writes nothing) and only counts.
        """
        if dry_run:
            return await self._lifecycle.run_round(dry_run=True)
        if not await self._hold():
            log.debug("lifecycle_lease_held_elsewhere")
            return None
        report = RoundReport()
        lifecycle = self._lifecycle
        report.shredded = await lifecycle.expire_inactive()
        # Renewed before each step: a holder that lost the lease (paused past its
        # expiry) stops rather than work beside the new holder.
        if await self._hold():
            report.notices = await lifecycle.send_inactivity_notices()
        if await self._hold():
            report.retained_destroyed = await lifecycle.destroy_retained()
        if await self._hold():
            report.access_log_purged = await lifecycle.purge_access_logs()
        # The shredding horizon's bound (README): old KEK versions go on schedule.
        if self._keys is not None and self._rotate_after is not None and await self._hold():
            done = await self._keys.maintain("sidecar", rotate_after=self._rotate_after)
            report.kek_rotated, report.kek_versions_destroyed = done["rotated"], done["destroyed"]
        # Last, so the notices enqueued above go out in the same round. Only the
        # lease holder sends: two relays would deliver each message twice.
        if self._relay is not None and await self._hold():
            await self._relay.relay_once()
        # Idle rounds (the usual case) only at debug: one line a minute is noise.
        busy = any(v for k, v in report.as_dict().items() if k != "dry_run")
        (log.info if busy else log.debug)("lifecycle_round", **report.as_dict())
        return report

    async def release(self) -> None:
        with contextlib.suppress(Exception):
            await self._store.release_lease(LEASE_NAME, self.holder)

    async def run(self, stop: asyncio.Event) -> None:
        """Rounds every interval until ``stop`` is set (or the task is cancelled);
        then the lease is released so another sidecar takes over at once."""
        log.info("sidecar_started", interval_seconds=self._interval)
        try:
            while not stop.is_set():
                try:
                    await self.run_round()
                except StorageUnavailable:
                    log.warning("lifecycle_round_failed", error="StorageUnavailable")
                except Exception as exc:  # noqa: BLE001 - the loop outlives a bad round
                    # The type only, no traceback: its text is not vetted for personal data.
                    log.error("lifecycle_round_failed", error=type(exc).__name__)  # noqa: TRY400
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self._interval)
        finally:
            await self.release()
            log.info("sidecar_stopped")


def _print_report(report: RoundReport | None, out: TextIO) -> None:
    """One JSON line per step (for scripts and log shippers) unless on a terminal."""
    if report is None:
        line = {"type": "lease", "held_elsewhere": True}
        out.write(json.dumps(line) if not out.isatty() else "another sidecar holds the lease")
        out.write("\n")
        return
    verb = "would be " if report.dry_run else ""
    for step, count in (
        ("shredded", report.shredded),
        ("inactivity_notices", report.notices),
        ("retained_destroyed", report.retained_destroyed),
        ("access_log_purged", report.access_log_purged),
    ):
        if out.isatty():
            out.write(f"{step.replace('_', ' ')}: {count} {verb}".rstrip() + "\n")
        else:
            line = {"type": "step", "step": step, "count": count, "dry_run": report.dry_run}
            out.write(json.dumps(line) + "\n")
    out.flush()


def _exists(url: str) -> bool:
    """False for a SQLite file that is not there: opening it would create it, and a
    dry run changes nothing."""
    backend, target = database_backend(url)
    return backend != "sqlite" or Path(target).exists()


async def _dry_run(settings: Settings, out: TextIO) -> int:
    """Counts from the store alone: no key file, no migration, no lease, no write."""
    url = settings.database_url.get_secret_value() if settings.database_url else None
    if url is None:
        url = default_database_url(settings.data_dir)
        if not _exists(url):
            # Opening would create it: a dry run changes nothing.
            print("no database in the data directory; nothing to do", file=sys.stderr)
            return 1
    store = await open_store(url, pool_size=1)
    retained = None
    try:
        retained_url = retention_database_url(settings.data_dir, url, settings.retention_url)
        if retained_url is not None and _exists(retained_url):
            retained = await open_retention_store(retained_url, pool_size=1)
        lifecycle = Lifecycle(
            store, _no_shred, SystemClock(), lifecycle_policy(settings), retained=retained
        )
        report = await lifecycle.run_round(dry_run=True)
    finally:
        if retained is not None:
            await retained.close()
        await store.close()
    _print_report(report, out)
    return 0


async def _no_shred(
    member_id: str, reason: str, *, last_seen_before: datetime | None = None
) -> None:
    raise AssertionError("a dry run never shreds")


async def run_cli(
    settings: Settings, *, once: bool, dry_run: bool, interval: float | None, out: TextIO
) -> int:
    """``privacy-vault sidecar``: the exit code."""
    from service.server import open_configured_vault  # the server imports this module

    if dry_run:
        return await _dry_run(settings, out)
    async with open_configured_vault(settings) as vault:
        sidecar = Sidecar.for_vault(vault, settings, interval=interval)
        if once:
            try:
                report = await sidecar.run_round()
            finally:
                await sidecar.release()
            _print_report(report, out)
            return 0
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await sidecar.run(stop)
    return 0
