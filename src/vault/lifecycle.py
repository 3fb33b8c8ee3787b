"""The lifecycle steps the sidecar runs (privacy policy sections 1, 5 and 6).

- Inactivity notices: at ``inactivity - notice_lead`` without a login, an e-mail
  tells the member when their data will be destroyed (enqueued in the outbox in
  the same transaction that marks the notice sent).
- Expiry: at ``inactivity`` without a login, and no earlier than ``notice_lead``
  after the notice went out (a late notice, e.g. after downtime, postpones the
  destruction rather than cut the member's warning short), the member is
  crypto-shredded with a destruction record.
- Access logs older than the retention period are purged in small batches (in
  the retention store as well).
- Brute-force counters of login IDs no member has and IP windows, once stale
  (a day), and request ids past their 24 hours are purged.
- Correction notices (section 7): each correction UpdateMember applied, marked in
  its transaction as owing notices, gets one per recipient of an old value, queued
  with their ledger entries and the mark cleared in one transaction per correction
  (:meth:`vault.disclosures.Disclosures.queue_correction_notices`).
- Withdrawn members' copies in the separated retention storage are destroyed once
  their destroy-after time passes, and copies a crash left unconfirmed are settled
  (:mod:`vault.retention`).

Every step is idempotent and crash-safe: each write is one conditional
transaction, so a rerun after a crash (or a second sidecar racing this one)
neither repeats nor misses anything. Time comes from the injected clock. Nothing
here sees or logs personal data: only member ids, times and counts.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from vault.activity import Activity
from vault.clock import Clock
from vault.consents import policy_notice
from vault.disclosures import NoticePage
from vault.errors import NotFound
from vault.idempotency import IDEMPOTENCY_TTL
from vault.login_guard import STALE_COUNTERS
from vault.retention import RETENTION_EXPIRED, destroy_copy, reconcile_copies
from vault.store.base import (
    AccessLogStore,
    ConsentStore,
    DestructionStore,
    IdempotencyStore,
    InactivityStore,
    LoginFailureStore,
    OutboxMessage,
    PolicyVersionRow,
    RetentionStore,
)

INACTIVITY_NOTICE = "inactivity_notice"
#: What the notice says will be destroyed: item keys the mail templates spell out
#: (section 6: all personal data, including name and e-mail address).
NOTICE_ITEMS = "login_id,password,name,email,mobile_phone,consents,access_log"
SHRED_REASON = "inactivity"

# The store's cutoffs are strict ("before"); one microsecond makes a member due at
# exactly the boundary (inactive for exactly the period), as the policy reads.
_TICK = timedelta(microseconds=1)


def _notice(version: PolicyVersionRow, now: datetime, member_id: str) -> OutboxMessage:
    return policy_notice(version, member_id, now)


class ShredFunction(Protocol):
    """Vault.shred: crypto-shred a member, only if not connected since ``last_seen_before``."""

    def __call__(
        self, member_id: str, reason: str, *, last_seen_before: datetime | None = None
    ) -> Awaitable[Any]: ...


class NoticeFunction(Protocol):
    """Disclosures.queue_correction_notices: one page of the corrections that owe
    notices, settled (or, in a dry run, counted)."""

    def __call__(self, limit: int, *, dry_run: bool = False) -> Awaitable[NoticePage]: ...


#: Called after each batch with the step name and the batch's count; tests use it
#: to stop a sweep part-way.
BatchHook = Callable[[str, int], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class LifecyclePolicy:
    inactivity: timedelta = timedelta(days=365)
    notice_lead: timedelta = timedelta(days=30)
    access_log_retention: timedelta = timedelta(days=183)  # 6 months
    batch_size: int = 500
    #: A dry run cannot page (it writes nothing to move past), so it counts up to this.
    dry_run_limit: int = 100_000

    def __post_init__(self) -> None:
        if not timedelta(0) < self.notice_lead < self.inactivity:
            raise ValueError("the notice lead must be positive and shorter than the inactivity")
        if self.access_log_retention <= timedelta(0):
            raise ValueError("the access-log retention must be positive")
        if self.batch_size < 1 or self.dry_run_limit < 1:
            raise ValueError("batch sizes must be at least 1")


@dataclass(slots=True)
class RoundReport:
    """What one round did (or, in a dry run, would do): counts only."""

    notices: int = 0
    #: Policy version notices queued (members asked to consent again).
    policy_notices: int = 0
    #: Correction notices queued to recipients of corrected values (section 7).
    correction_notices: int = 0
    shredded: int = 0
    access_log_purged: int = 0
    #: Withdrawn members' retained copies destroyed (their date passed).
    retained_destroyed: int = 0
    #: Stale failure counters, IP windows and expired request ids deleted.
    counters_purged: int = 0
    #: Key maintenance (rotate when due, re-wrap, destroy unused versions), when on.
    kek_rotated: int = 0
    kek_versions_destroyed: int = 0
    #: The mail relay's pass (the sidecar's last step): sent, dropped (the member is
    #: gone), rescheduled, given up.
    mail_sent: int = 0
    mail_dropped: int = 0
    mail_retried: int = 0
    mail_failed: int = 0
    dry_run: bool = False

    def as_dict(self) -> dict[str, int | bool]:
        return {
            "notices": self.notices,
            "policy_notices": self.policy_notices,
            "correction_notices": self.correction_notices,
            "shredded": self.shredded,
            "access_log_purged": self.access_log_purged,
            "retained_destroyed": self.retained_destroyed,
            "counters_purged": self.counters_purged,
            "kek_rotated": self.kek_rotated,
            "kek_versions_destroyed": self.kek_versions_destroyed,
            "mail_sent": self.mail_sent,
            "mail_dropped": self.mail_dropped,
            "mail_retried": self.mail_retried,
            "mail_failed": self.mail_failed,
            "dry_run": self.dry_run,
        }

    def record(self, step: LifecycleStep, count: int) -> None:
        setattr(self, step.name, count)

    def count(self, step: LifecycleStep) -> int:
        count: int = getattr(self, step.name)
        return count


class StepFunction(Protocol):
    """A step's method: run (or, in a dry run, only count); returns the count."""

    def __call__(self, *, dry_run: bool = False) -> Awaitable[int]: ...


@dataclass(frozen=True, slots=True)
class LifecycleStep:
    """One step of a round, by name. ``name`` is its :class:`RoundReport` field and
    the step the batch hook is told; ``label`` is how ``privacy-vault sidecar``
    reports it. Callers walk :attr:`Lifecycle.steps` instead of restating them."""

    name: str
    label: str
    run: StepFunction

    def __post_init__(self) -> None:
        if self.name not in RoundReport.__dataclass_fields__:
            raise ValueError(f"a lifecycle step must name a RoundReport count: {self.name!r}")


class LifecycleStores(
    ConsentStore,
    InactivityStore,
    AccessLogStore,
    DestructionStore,
    LoginFailureStore,
    IdempotencyStore,
    Protocol,
):
    """The vault-database slice the lifecycle sweeps: policy versions' notices,
    inactivity, the access log's
    purge, destruction records (to settle retained copies), and the purges of stale
    failure counters and expired request ids."""


class Lifecycle:
    """Built by :meth:`vault.Vault.lifecycle`, or for a dry run by
    :func:`vault.bootstrap.open_dry_run_lifecycle`."""

    def __init__(
        self,
        store: LifecycleStores,
        shred: ShredFunction,
        clock: Clock,
        policy: LifecyclePolicy | None = None,
        *,
        retained: RetentionStore | None = None,
        on_batch: BatchHook | None = None,
        activity: Activity | None = None,
        notices: NoticeFunction | None = None,
    ) -> None:
        self._store = store
        self._notices = notices
        self._activity = activity or Activity()
        self._shred = shred
        self._clock = clock
        self._policy = policy or LifecyclePolicy()
        self._retained = retained
        self._on_batch = on_batch

    @property
    def policy(self) -> LifecyclePolicy:
        return self._policy

    async def _batch_done(self, step: str, count: int) -> None:
        if self._on_batch is not None:
            await self._on_batch(step, count)

    async def send_inactivity_notices(self, *, dry_run: bool = False) -> int:
        """Enqueue one notice per member due for one; returns how many (would be) sent."""
        policy = self._policy
        now = self._clock.now()
        cutoff = now - (policy.inactivity - policy.notice_lead) + _TICK
        if dry_run:
            return len(await self._store.members_due_for_notice(cutoff, policy.dry_run_limit))
        sent = 0
        while True:
            due = await self._store.members_due_for_notice(cutoff, policy.batch_size)
            recorded = 0
            for member_id, last_seen_at in due:
                # Never sooner than the lead from now: a late notice still gives the
                # member the full notice period, and says so.
                destroy_at = max(last_seen_at + policy.inactivity, now + policy.notice_lead)
                message = OutboxMessage(
                    message_id=str(uuid.uuid4()),
                    member_id=member_id,
                    kind=INACTIVITY_NOTICE,
                    params={"destroy_at": destroy_at.isoformat(), "items": NOTICE_ITEMS},
                    created_at=now,
                )
                # False: the member logged in, or another sidecar noticed them first.
                if await self._store.record_inactivity_notice(member_id, last_seen_at, message):
                    recorded += 1
            sent += recorded
            await self._batch_done("notices", recorded)
            # A short batch was the last; a batch with no progress (every member
            # raced away) would come back unchanged, so the next round retries.
            if len(due) < policy.batch_size or recorded == 0:
                return sent

    async def expire_inactive(self, *, dry_run: bool = False) -> int:
        """Shred members past the inactivity period and the notice lead; returns how many."""
        policy = self._policy
        now = self._clock.now()
        seen_cutoff = now - policy.inactivity + _TICK
        notice_cutoff = now - policy.notice_lead + _TICK
        if dry_run:
            due = await self._store.members_due_for_expiry(
                seen_cutoff, notice_cutoff, policy.dry_run_limit
            )
            return len(due)
        shredded = 0
        while True:
            due = await self._store.members_due_for_expiry(
                seen_cutoff, notice_cutoff, policy.batch_size
            )
            done = 0
            for member_id in due:
                try:
                    # Conditional in the shred's own transaction: a login since the
                    # listing cancels the destruction, with no window in between.
                    await self._shred(member_id, SHRED_REASON, last_seen_before=seen_cutoff)
                except NotFound:
                    continue  # shredded by another sidecar, or connected since
                done += 1
            shredded += done
            await self._batch_done("shredded", done)
            if len(due) < policy.batch_size or done == 0:
                return shredded

    async def purge_access_logs(self, *, dry_run: bool = False) -> int:
        """Delete access-log entries older than the retention, batch by batch."""
        policy = self._policy
        before = self._clock.now() - policy.access_log_retention
        stores: list[AccessLogStore | RetentionStore] = [self._store]
        if self._retained is not None:
            stores.append(self._retained)  # the 6-month rule holds in retention too
        purged = 0
        for store in stores:
            if dry_run:
                purged += await store.count_access_log_before(before)
                continue
            while True:
                # One short transaction per batch: logins are never held up for long.
                count = await store.purge_access_log(before, policy.batch_size)
                purged += count
                await self._batch_done("access_log_purged", count)
                if count < policy.batch_size:
                    break
        return purged

    async def destroy_retained(self, *, dry_run: bool = False) -> int:
        """Destroy withdrawn members' retained copies whose date has passed, after
        settling copies a crash left unconfirmed; returns how many were destroyed."""
        retained = self._retained
        if retained is None:
            return 0
        policy = self._policy
        now = self._clock.now()
        await reconcile_copies(self._store, retained, now, policy.batch_size, dry_run=dry_run)
        if dry_run:
            return len(await retained.retained_due(now, policy.dry_run_limit))
        destroyed = 0
        while True:
            due = await retained.retained_due(now, policy.batch_size)
            done = 0
            for member_id in due:
                if await destroy_copy(self._store, retained, member_id, RETENTION_EXPIRED, now):
                    done += 1
            destroyed += done
            self._activity.shredded(RETENTION_EXPIRED, done)
            await self._batch_done("retained_destroyed", done)
            if len(due) < policy.batch_size or done == 0:
                return destroyed

    async def send_policy_notices(self, *, dry_run: bool = False) -> int:
        """Queue each published version's notices to the members it asks again, a page
        (one short transaction, with the version's cursor) at a time, so every
        affected member gets exactly one per version however many there are. A dry
        run counts nothing (0): the notices are mail, not personal data kept."""
        if dry_run:
            return 0
        now, size = self._clock.now(), self._policy.batch_size
        versions = {v.version: v for v in await self._store.list_policy_versions()}
        queued = 0
        for name in await self._store.versions_with_pending_notices(size):
            version = versions.get(name)
            if version is None:  # published after the list was read: the next round
                continue
            while True:
                count, done = await self._store.queue_policy_notices(
                    name, size, functools.partial(_notice, version, now)
                )
                queued += count
                await self._batch_done("policy_notices", count)
                if done:
                    break
        return queued

    async def send_correction_notices(self, *, dry_run: bool = False) -> int:
        """Queue the notices applied corrections owe, a page of corrections at a time
        (each settled in one transaction: its notices, their ledger entries, the mark
        cleared), so a crash or a second sidecar neither loses nor repeats one. A dry
        run counts the notices up to ``dry_run_limit`` corrections owe."""
        if self._notices is None:
            return 0
        policy = self._policy
        if dry_run:
            return (await self._notices(policy.dry_run_limit, dry_run=True)).notices
        queued = 0
        while True:
            page = await self._notices(policy.batch_size)
            queued += page.notices
            await self._batch_done("correction_notices", page.notices)
            # Settled corrections leave the list; a page with none settled (every
            # one raced away, or keyed anew) is left to the next round.
            if page.listed < policy.batch_size or page.settled == 0:
                return queued

    async def purge_counters(self, *, dry_run: bool = False) -> int:
        """Delete stale failure counters (unknown login IDs only), ended IP windows and
        expired request ids, batch by batch. A dry run counts nothing (0): these
        rows hold no personal data and no one waits for them."""
        if dry_run:
            return 0
        now, size = self._clock.now(), self._policy.batch_size
        purged = 0
        for purge, before in (
            (self._store.purge_login_failures, now - STALE_COUNTERS),
            (self._store.purge_idempotency_keys, now - IDEMPOTENCY_TTL),
        ):
            while True:
                count = await purge(before, size)
                purged += count
                await self._batch_done("counters_purged", count)
                if count < size:
                    break
        return purged

    @property
    def steps(self) -> tuple[LifecycleStep, ...]:
        """The round's steps, in an order where each sees the previous one's effect:
        a member shredded first is sent no notice, and the purge counts what is left."""
        return (
            LifecycleStep("shredded", "shredded", self.expire_inactive),
            LifecycleStep("notices", "inactivity_notices", self.send_inactivity_notices),
            LifecycleStep("policy_notices", "policy_notices", self.send_policy_notices),
            LifecycleStep("correction_notices", "correction_notices", self.send_correction_notices),
            LifecycleStep("retained_destroyed", "retained_destroyed", self.destroy_retained),
            LifecycleStep("access_log_purged", "access_log_purged", self.purge_access_logs),
            LifecycleStep("counters_purged", "counters_purged", self.purge_counters),
        )

    async def run_round(self, *, dry_run: bool = False) -> RoundReport:
        """Every step once, in :attr:`steps` order."""
        report = RoundReport(dry_run=dry_run)
        for step in self.steps:
            report.record(step, await step.run(dry_run=dry_run))
        return report
