"""Key management for the security team: rotate, re-wrap, destroy, rotate a member.

Like Vault Transit's rotate / rewrap / trim, over our hierarchy: KEK versions in a
key provider wrap one DEK per member and the blind-index key. Every operation
writes a key event (who, what, when; never key bytes).

The shredding horizon: shredding deletes a member's wrapped DEK from the live
database at once. Copies made before (backups, PostgreSQL WAL and dead tuples)
still hold it, wrapped under some KEK version; they become undecryptable when
that version is destroyed, which needs a rotation and a re-wrap first. Running
:meth:`KeyAdmin.maintain` on a schedule bounds that horizon.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol

import structlog

from vault import _hazmat, ids, member_cipher
from vault.activity import Activity
from vault.bindings import disclosure_field
from vault.calls import current_caller
from vault.clock import Clock
from vault.errors import Conflict, DecryptionError, KeyChanged, NotFound, PreconditionFailed
from vault.keyring import DestroyPlan as DestroyPlan  # re-exported: the service's types
from vault.keyring import KekVersionStatus as KekVersionStatus
from vault.keyring import Keyring, next_version
from vault.member_keys import MemberKeys
from vault.providers.base import KeyProvider
from vault.store.base import (
    ENCRYPTED_FIELDS,
    AccessLogStore,
    CorrectionStore,
    DisclosureStore,
    KeyStore,
    MemberKeyRow,
    MemberRow,
    MemberStore,
    RetentionStore,
    RewrapUpdate,
    whole_access_log,
    whole_disclosure_ledger,
)
from vault.store.base import KekVersionRow as KekVersionRow  # re-exported: the service's types
from vault.store.base import KeyEvent as KeyEvent

log = structlog.get_logger("vault.keys")

# Measured best at 1M members on PostgreSQL (bench/README.md): each batch holds
# its rows' locks for ~25-45 ms.
DEFAULT_BATCH = 2000
MAX_BATCH = 10_000
_ROTATE_MEMBER_ATTEMPTS = 3
#: Extra passes from the start after a pass that moved keys (see rewrap).
_REWRAP_SWEEPS = 3


@dataclass(frozen=True, slots=True)
class KeyStatus:
    provider: str
    active_version: int
    versions: tuple[KekVersionStatus, ...]


@dataclass(frozen=True, slots=True)
class RewrapProgress:
    target_version: int
    #: Keys (member DEKs and the index key) not under the target when the run began.
    total: int
    rewrapped: int
    #: Keys that moved (re-wrapped, rotated or shredded) by someone else meanwhile.
    skipped: int
    batches: int
    done: bool
    dry_run: bool = False


class _KeySource(Protocol):
    """Where wrapped member DEKs live: the vault's KeyStore, or the RetentionStore."""

    async def member_keys_to_rewrap(
        self, target_version: int, after_member_id: str | None, limit: int
    ) -> list[MemberKeyRow]: ...

    async def apply_rewrap(self, updates: Sequence[RewrapUpdate]) -> int: ...


@dataclass(slots=True)
class _Tally:
    """A re-wrap run's counts, across its passes."""

    total: int
    rewrapped: int
    skipped: int
    seen: int  # keys found to move, stragglers included
    batches: int = 0

    def progress(self, target: int, *, done: bool) -> RewrapProgress:
        return RewrapProgress(
            target, max(self.total, self.seen), self.rewrapped, self.skipped, self.batches, done
        )


class _MemberLocks:
    """One asyncio lock per member, kept only while someone holds or awaits it.

    Per-member key rotations in this process take turns on the member instead of
    racing each other into ABORTED. Only an optimisation: rotations from other
    processes still race, and the store's checks keep those safe."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, member_id: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(member_id, (asyncio.Lock(), 0))
        self._locks[member_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            users = self._locks[member_id][1] - 1
            if users:
                self._locks[member_id] = (lock, users)
            else:
                del self._locks[member_id]


class KeyAdminStores(
    KeyStore, MemberStore, AccessLogStore, CorrectionStore, DisclosureStore, Protocol
):
    """The vault-database slice key management uses: the key hierarchy's rows, and a
    member with their access log, corrections and disclosure ledger (to rotate one
    member's key)."""


class KeyAdmin:
    """Reached as ``vault.keys``; shares the vault's member keys."""

    def __init__(
        self,
        store: KeyAdminStores,
        provider: KeyProvider,
        member_keys: MemberKeys,
        clock: Clock,
        retained: RetentionStore | None = None,
        activity: Activity | None = None,
    ) -> None:
        self._store = store
        self._activity = activity or Activity()
        # Only for KEK versions' life (create, destroy): wrapping goes through member_keys.
        self._provider = provider
        self._member_keys = member_keys
        self._clock = clock
        # The retention store's DEKs are under the same KEK versions: re-wrapped with
        # the vault's, and counted by the destroy guard.
        self._retained = retained
        self._rotating = _MemberLocks()

    def __repr__(self) -> str:
        return f"<KeyAdmin provider={self._provider.name}>"

    async def _event(self, actor: str, operation: str, **fields: object) -> None:
        details = fields.pop("details", {})
        event = KeyEvent(
            at=self._clock.now(),
            actor=actor,
            operation=operation,
            details=details,  # type: ignore[arg-type]
            caller=current_caller(),  # the calling service (the admin API) or "internal"
            **fields,  # type: ignore[arg-type]
        )
        await self._store.record_key_event(event)
        log.info(
            "key_event",
            actor=actor,
            caller=event.caller,
            operation=operation,
            **fields,
            **details,  # type: ignore[arg-type]
        )

    # --- status ------------------------------------------------------------------------
    async def status(self) -> KeyStatus:
        return (await self._keyring_status())[1]

    async def _keyring_status(self) -> tuple[Keyring, KeyStatus]:
        """The keyring (validated) and each version's usage, read together."""
        keyring = Keyring(await self._store.list_kek_versions())
        usage = {u.version: u for u in await self._store.kek_usage()}
        retained = await self._retained_usage()
        return keyring, KeyStatus(
            provider=self._provider.name,
            active_version=keyring.active,
            versions=tuple(
                KekVersionStatus(
                    v.version,
                    v.state,
                    v.created_at,
                    v.destroyed_at,
                    usage[v.version].member_keys if v.version in usage else 0,
                    usage[v.version].index_keys if v.version in usage else 0,
                    retained.get(v.version, 0),
                )
                for v in keyring.versions
            ),
        )

    async def _retained_usage(self) -> dict[int, int]:
        if self._retained is None:
            return {}
        return {u.version: u.retained_keys for u in await self._retained.kek_usage()}

    async def events(self, limit: int = 100) -> list[KeyEvent]:
        return await self._store.list_key_events(limit)

    # --- rotation ----------------------------------------------------------------------
    async def rotate(self, actor: str) -> KekVersionRow:
        """Add a KEK version and make it active; new DEKs wrap under it at once in
        every process (they read the active version from the database)."""
        versions = await self._store.list_kek_versions()
        new_version = next_version(versions)
        # The material exists before the database says the version is active.
        await self._provider.create_version(new_version)
        row = await self._store.rotate_kek(new_version, self._clock.now())
        self._activity.kek_rotations += 1
        previous = [v.version for v in versions if v.state == "active"]
        await self._event(
            actor,
            "rotate_kek",
            kek_version=new_version,
            details={"previous_active": previous[0] if previous else 0},
        )
        return row

    async def rewrap(
        self, actor: str, *, batch_size: int = DEFAULT_BATCH, dry_run: bool = False
    ) -> AsyncIterator[RewrapProgress]:
        """Move every member DEK and the index key to the active KEK version, online.

        Batches commit one by one, each row only if it did not move meanwhile, so
        the run can be killed at any point and run again: it resumes where the keys
        are, and a second run finds nothing to do.
        """
        if not 1 <= batch_size <= MAX_BATCH:
            raise ValueError(f"batch_size must be 1-{MAX_BATCH}")
        status = await self.status()
        target = status.active_version
        total = sum(
            v.member_keys + v.index_keys + v.retained_keys
            for v in status.versions
            if v.version != target
        )
        rewrapped = skipped = 0
        if dry_run or total == 0:
            yield RewrapProgress(target, total, 0, 0, 0, True, dry_run)
            return
        index_key = await self._store.get_index_key()
        if index_key is not None and index_key.kek_version != target:
            material = await self._member_keys.unwrap_index_key(index_key)
            wrapped = await self._member_keys.wrap_index_key(index_key.key_id, material, target)
            moved = await self._store.rewrap_index_key(
                index_key.key_id, index_key.kek_version, target, wrapped
            )
            rewrapped, skipped = rewrapped + moved, skipped + (not moved)
            self._activity.keys_rewrapped += moved
        tally = _Tally(total, rewrapped, skipped, seen=rewrapped + skipped)
        # The vault's DEKs, then the retention store's: the same protocol, one pass each.
        sources: list[_KeySource] = [self._store]
        if self._retained is not None:
            sources.append(self._retained)
        for source in sources:
            async for progress in self._rewrap_pass(source, target, batch_size, tally):
                yield progress
        await self._event(
            actor,
            "rewrap",
            kek_version=target,
            details={
                "rewrapped": tally.rewrapped,
                "skipped": tally.skipped,
                "batches": tally.batches,
            },
        )
        # Stragglers found by a sweep count in the total, so a finished run never
        # reports more keys moved than it set out to move.
        yield tally.progress(target, done=True)

    async def _rewrap_pass(
        self, source: _KeySource, target: int, batch_size: int, tally: _Tally
    ) -> AsyncIterator[RewrapProgress]:
        """Re-wrap every key of ``source`` not under ``target``, batch by batch,
        yielding progress after each committed batch."""
        after: str | None = None
        pending: asyncio.Task[int] | None = None
        pending_size = 0
        # A sign-up (or member key rotation) that read the active version just
        # before the rotation can commit a key under the old version behind the
        # cursor. So a pass that moved keys is followed by another from the start,
        # until one finds nothing to move (normally one cheap query).
        moved_in_pass, sweeps = False, 0
        try:
            while True:
                keys = await source.member_keys_to_rewrap(target, after, batch_size)
                # A key under a newer version (a rotation during this run) stays put:
                # never move a key back to an older KEK.
                movable = [key for key in keys if key.kek_version < target]
                updates = [await self._member_keys.rewrap_update(key, target) for key in movable]
                # The previous batch's commit overlaps this batch's unwrap/wrap.
                if pending is not None:
                    applied = await pending
                    tally.rewrapped += applied
                    self._activity.keys_rewrapped += applied
                    tally.skipped += pending_size - applied
                    tally.batches += 1
                    yield tally.progress(target, done=False)
                    pending = None
                if not keys:
                    if not moved_in_pass or sweeps >= _REWRAP_SWEEPS:
                        return
                    moved_in_pass, sweeps, after = False, sweeps + 1, None
                    continue
                after = keys[-1].member_id
                if updates:
                    moved_in_pass = True
                    tally.seen += len(updates)
                    pending, pending_size = (
                        asyncio.ensure_future(source.apply_rewrap(updates)),
                        len(updates),
                    )
        finally:
            if pending is not None:
                pending.cancel()

    # --- destruction -------------------------------------------------------------------
    async def plan_destroy(self, version: int) -> DestroyPlan:
        keyring, status = await self._keyring_status()
        found = [v for v in status.versions if v.version == version]
        if not found:
            raise NotFound(f"KEK version {version}")
        return keyring.plan_destroy(found[0])

    async def destroy_version(self, version: int, actor: str) -> KekVersionRow:
        """Destroy a KEK version: first in the database (guarded: never the active
        one, never one still wrapping a key), then its material in the provider.
        Irreversible; every copy of a DEK wrapped under it becomes noise."""
        if self._retained is not None:
            # Checked here, the vault's own keys in the vault's transaction below. A
            # withdrawal only ever commits a copy under the version active at that
            # moment, so once this version is seen inactive, no new copy can land
            # under it between this count and the destroy.
            keyring = Keyring(await self._store.list_kek_versions())
            keyring.require_destroyable(version, (await self._retained_usage()).get(version, 0))
        row = await self._store.destroy_kek_version(version, self._clock.now())
        await self._provider.destroy_version(version)
        await self._event(actor, "destroy_kek_version", kek_version=version)
        return row

    # --- per-member rotation -----------------------------------------------------------
    async def rotate_member_key(self, member_id: str, actor: str) -> int:
        """Re-encrypt one member's fields and access log under a fresh DEK, atomically.
        Returns the new DEK id."""
        canonical = ids.canonical_member_id(member_id)
        if canonical is None:
            raise NotFound
        async with self._rotating.hold(canonical):
            for _ in range(_ROTATE_MEMBER_ATTEMPTS):
                row = await self._store.get_member(canonical)
                if row is None:
                    raise NotFound
                new_dek_id = await self._try_rotate_member_key(row)
                if new_dek_id is not None:
                    self._member_keys.evict(canonical)
                    await self._event(
                        actor,
                        "rotate_member_key",
                        member_id=canonical,
                        details={"dek_id": new_dek_id},
                    )
                    return new_dek_id
        raise KeyChanged

    async def _try_rotate_member_key(self, row: MemberRow) -> int | None:
        mid, old = row.member_id, row.key
        old_key = await self._member_keys.unwrap(old)
        new_id = old.dek_id + 1
        material = _hazmat.new_key_material()
        new_key = _hazmat.SecretKey(new_id, material)
        active = (await self.status()).active_version
        new_row = await self._member_keys.wrap(mid, new_id, material, active)
        ciphertexts = member_cipher.reseal_fields(
            old_key, new_key, mid, {f: row.ciphertexts[f] for f in ENCRYPTED_FIELDS}
        )
        # Read after the row, in statements of its own: a rotation that commits in
        # between leaves entries sealed under a newer DEK than ``old_key``.
        log_rows = await whole_access_log(self._store, mid)
        corrections = await self._store.list_corrections(mid)
        ledger_rows = await whole_disclosure_ledger(self._store, mid)
        try:
            entries = member_cipher.reseal_access_log(old_key, new_key, mid, log_rows)
            sealed, resealed = member_cipher.reseal_corrections(old_key, new_key, mid, corrections)
            ledger = {
                e.disclosure_id: member_cipher.reseal(
                    old_key, new_key, mid, disclosure_field(e.entry_id, e.at), e.details_ct
                )
                for e in ledger_rows
            }
        except DecryptionError:
            current = await self._store.get_member(mid)
            if current is not None and current.key.dek_id == old.dek_id:
                raise  # the key did not change: the entry itself does not open
            return None  # rotated (or shredded) since the row was read: again
        try:
            replaced = await self._store.replace_member_key(
                mid,
                old.dek_id,
                new_row,
                ciphertexts,
                entries,
                old_ciphertexts=row.ciphertexts,
                corrections=resealed,
                old_corrections=sealed,
                disclosures=ledger,
            )
        except (PreconditionFailed, Conflict):
            # The version we wrapped under was destroyed meanwhile, or the database
            # rolled the replacement back in a conflict: again.
            return None
        return new_id if replaced else None

    # --- the schedule --------------------------------------------------------------------
    async def maintain(
        self, actor: str, *, rotate_after: timedelta, batch_size: int = DEFAULT_BATCH
    ) -> dict[str, int]:
        """The scheduled horizon job: rotate when the active version is older than
        ``rotate_after``, re-wrap everything to the active version, then destroy
        every old version that no longer wraps a key. Safe to run as often as you
        like (a cron job, a Kubernetes CronJob, the sidecar)."""
        status = await self.status()
        active = next(v for v in status.versions if v.version == status.active_version)
        rotated = 0
        if self._clock.now() - active.created_at >= rotate_after:
            await self.rotate(actor)
            rotated = 1
        rewrapped = 0
        async for progress in self.rewrap(actor, batch_size=batch_size):
            rewrapped = progress.rewrapped
        destroyed = 0
        keyring, status = await self._keyring_status()
        for v in status.versions:
            if v.state != "destroyed" and keyring.plan_destroy(v).allowed:
                await self.destroy_version(v.version, actor)
                destroyed += 1
        return {"rotated": rotated, "rewrapped": rewrapped, "destroyed": destroyed}
