"""The lifecycle sidecar: runs :mod:`vault.lifecycle`'s steps on a timer.

A round walks :attr:`~vault.lifecycle.Lifecycle.steps` in the lifecycle's order,
then the sidecar's own steps (key maintenance when on, the mail relay). Its parts
come in as small Protocols; :func:`service.wiring.build_sidecar` picks them.

Only the holder of the ``lifecycle`` lease acts, so any number of sidecars (one per
replica, or one in each embedded server) can run against one database. The lease
is renewed before every step and outlives a few intervals, so a crashed holder is
replaced within that time. Logs carry counts only, never personal data.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from functools import partial
from typing import Protocol

import structlog

from vault import Clock
from vault.errors import StorageUnavailable
from vault.lifecycle import Lifecycle, LifecycleStep, RoundReport

log = structlog.get_logger("service.sidecar")

LEASE_NAME = "lifecycle"
# The lease outlives this many intervals: a slow round keeps it, a dead holder loses it.
_LEASE_INTERVALS = 3
_MIN_LEASE = timedelta(seconds=30)


def make_holder() -> str:
    """hostname:pid:random, unique per process even across container restarts."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


class LeaseStore(Protocol):
    """The slice of the store the sidecar itself uses: the lease."""

    async def acquire_lease(
        self, name: str, holder: str, now: datetime, ttl: timedelta
    ) -> bool: ...
    async def release_lease(self, name: str, holder: str) -> None: ...


class KeyMaintenance(Protocol):
    """The horizon job (:meth:`vault.keyadmin.KeyAdmin.maintain`)."""

    async def maintain(self, actor: str, *, rotate_after: timedelta) -> dict[str, int]: ...


class RelayCounts(Protocol):
    """What one pass of the relay did (:class:`service.mailer.RelayResult`)."""

    @property
    def sent(self) -> int: ...
    @property
    def dropped(self) -> int: ...
    @property
    def retried(self) -> int: ...
    @property
    def failed(self) -> int: ...


class MailRelay(Protocol):
    """The outbox relay (:class:`service.mailer.OutboxRelay`): one pass over due mail."""

    async def relay_once(self) -> RelayCounts: ...


#: Told after each round: its outcome ("done", "lease_held_elsewhere", "failed"), how
#: long it took in seconds, and its report (None unless done). The metrics use it.
RoundHook = Callable[[str, float, RoundReport | None], None]


#: A step of the sidecar's round: does its work and writes its counts in the report.
SidecarStep = Callable[[RoundReport], Awaitable[None]]


class Sidecar:
    def __init__(
        self,
        lifecycle: Lifecycle,
        leases: LeaseStore,
        clock: Clock,
        *,
        interval: float,
        holder: str | None = None,
        relay: MailRelay | None = None,
        keys: KeyMaintenance | None = None,
        rotate_after: timedelta | None = None,
        on_round: RoundHook | None = None,
    ) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        self._lifecycle = lifecycle
        self._leases = leases
        self._clock = clock
        self._interval = interval
        self._ttl = max(timedelta(seconds=interval * _LEASE_INTERVALS), _MIN_LEASE)
        self.holder = holder or make_holder()
        self._on_round = on_round
        if (keys is None) != (rotate_after is None):
            raise ValueError("key maintenance needs both keys and rotate_after")
        # The lifecycle's steps in its order, then the sidecar's own.
        steps: list[tuple[str, SidecarStep]] = [
            (step.name, partial(_lifecycle_step, step)) for step in lifecycle.steps
        ]
        if keys is not None and rotate_after is not None:
            steps.append(("key_maintenance", partial(_maintain_keys, keys, rotate_after)))
        if relay is not None:
            # Last, so the notices enqueued above go out in the same round. Only the
            # lease holder sends: two relays would deliver each message twice.
            steps.append(("mail_relay", partial(_relay_mail, relay)))
        self._steps = tuple(steps)

    @property
    def lifecycle(self) -> Lifecycle:
        return self._lifecycle

    async def _hold(self) -> bool:
        return await self._leases.acquire_lease(
            LEASE_NAME, self.holder, self._clock.now(), self._ttl
        )

    async def run_round(self, *, dry_run: bool = False) -> RoundReport | None:
        """One round of every step; None if another sidecar holds the lease.

        A dry run takes no lease (it writes nothing) and only counts.
        """
        if dry_run:
            return await self._lifecycle.run_round(dry_run=True)
        report = RoundReport()
        for n, (name, step) in enumerate(self._steps):
            # Renewed before each step: a holder that lost the lease (paused past its
            # expiry) stops rather than work beside the new holder.
            if not await self._hold():
                if n == 0:
                    log.debug("lifecycle_lease_held_elsewhere")
                    return None
                log.info("lifecycle_lease_lost", before_step=name)
                break
            await step(report)
        # Idle rounds (the usual case) only at debug: one line a minute is noise.
        busy = any(v for k, v in report.as_dict().items() if k != "dry_run")
        (log.info if busy else log.debug)("lifecycle_round", **report.as_dict())
        return report

    async def release(self) -> None:
        with contextlib.suppress(Exception):
            await self._leases.release_lease(LEASE_NAME, self.holder)

    async def run(self, stop: asyncio.Event) -> None:
        """Rounds every interval until ``stop`` is set (or the task is cancelled);
        then the lease is released so another sidecar takes over at once."""
        log.info("sidecar_started", interval_seconds=self._interval)
        try:
            while not stop.is_set():
                started = time.perf_counter()
                report, outcome = None, "failed"
                try:
                    report = await self.run_round()
                    outcome = "done" if report is not None else "lease_held_elsewhere"
                except StorageUnavailable:
                    log.warning("lifecycle_round_failed", error="StorageUnavailable")
                except Exception as exc:  # noqa: BLE001 - the loop outlives a bad round
                    # The type only, no traceback: its text is not vetted for personal data.
                    log.error("lifecycle_round_failed", error=type(exc).__name__)  # noqa: TRY400
                if self._on_round is not None:
                    self._on_round(outcome, time.perf_counter() - started, report)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self._interval)
        finally:
            await self.release()
            log.info("sidecar_stopped")


async def _lifecycle_step(step: LifecycleStep, report: RoundReport) -> None:
    report.record(step, await step.run())


async def _maintain_keys(
    keys: KeyMaintenance, rotate_after: timedelta, report: RoundReport
) -> None:
    # The shredding horizon's bound (README): old KEK versions go on schedule.
    done = await keys.maintain("sidecar", rotate_after=rotate_after)
    report.kek_rotated, report.kek_versions_destroyed = done["rotated"], done["destroyed"]


async def _relay_mail(relay: MailRelay, report: RoundReport) -> None:
    done = await relay.relay_once()
    report.mail_sent, report.mail_dropped = done.sent, done.dropped
    report.mail_retried, report.mail_failed = done.retried, done.failed
