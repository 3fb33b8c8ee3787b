"""Withdrawal into separated storage, and its timed destruction (policy section 6).

"The information that the user has entered will be moved to a separate DB after
the purpose is obtained and destroyed after retaining for a certain period of
time [...]. The personal data moved to a separate DB will not be used for the
purpose other than retention, unless required by the law."

With a retention rule (a period and its stated reason), a withdrawal copies what
the member entered -- less the password hash, which no retention purpose needs --
with their consents and access log into the retention store, a database of its
own, and then crypto-shreds the member in the vault. The copy stays ciphertext
under the member's own DEK, re-wrapped under the active KEK version. Nothing in
the member API reads it; the privacy officer's tools can list it, disclose it
when the law requires (each disclosure recorded with its stated basis), or
destroy it early; the sidecar destroys it when its date passes.

The two databases cannot share a transaction, so the move is ordered to be safe
at any crash point: (1) write the copy, unconfirmed; (2) shred the member in
the vault, only if they are still exactly what was copied and the copy's KEK
version is still active (one transaction, with a destruction record carrying
``retained_until``); (3) confirm the copy. A crash between (1) and (2) leaves an
unconfirmed copy of a live member, between (2) and (3) an unconfirmed copy of a
withdrawn one; the sidecar tells them apart by the vault's destruction record
once the copy is older than :data:`CONFIRM_GRACE`, deleting the first kind and
confirming the second.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

import structlog

from vault import ids, member_cipher
from vault.activity import Activity
from vault.clock import Clock
from vault.corrections import correction_json, opened_corrections
from vault.errors import (
    Conflict,
    FieldViolation,
    InvalidInput,
    KeyChanged,
    NotFound,
    PreconditionFailed,
)
from vault.ledger import entry_json, legal_entities, open_entry
from vault.member_keys import MemberKeys
from vault.purposes import consent_event_json
from vault.store.base import (
    RETAINED_FIELDS,
    AccessLogStore,
    ConsentStore,
    CorrectionStore,
    DestructionRecord,
    DestructionStore,
    DisclosureStore,
    MemberRow,
    MemberStore,
    RetainedMember,
    RetainedSummary,
    RetentionCheck,
    RetentionEvent,
    RetentionStore,
    whole_access_log,
    whole_consent_history,
    whole_disclosure_ledger,
)

log = structlog.get_logger("vault.retention")

WITHDRAWAL = "withdrawal"
#: Destruction record reasons for a retained copy: its date passed, or the privacy
#: officer destroyed it early.
RETENTION_EXPIRED = "retention_expired"
RETENTION_DESTROYED = "retention_destroyed_early"
#: An unconfirmed copy younger than this may belong to a withdrawal in flight.
CONFIRM_GRACE = timedelta(hours=1)
DISCLOSURE_FORMAT = "privacy-vault-retained/1"
_MOVE_ATTEMPTS = 3
MAX_REASON_LENGTH = 200


@dataclass(frozen=True, slots=True)
class RetentionRule:
    """How long a withdrawn member's data is kept, and the stated reason (its legal
    basis, as the privacy policy and notices cite it). Period 0: destroyed at once."""

    period: timedelta = timedelta(0)
    reason: str = "information security (internal policy)"

    def __post_init__(self) -> None:
        if self.period < timedelta(0):
            raise ValueError("the retention period must not be negative")
        if not self.reason.strip() or len(self.reason) > MAX_REASON_LENGTH:
            raise ValueError(f"the retention reason must be 1-{MAX_REASON_LENGTH} characters")


def _check_basis(basis: str) -> str:
    basis = basis.strip()
    if not basis or len(basis) > MAX_REASON_LENGTH:
        # Every use of retained data states why (policy section 6: "unless required by
        # the law"); the basis is recorded, so keep it a reference, not personal data.
        raise InvalidInput([FieldViolation("basis", f"must be 1-{MAX_REASON_LENGTH} characters")])
    return basis


class RetentionStores(
    MemberStore,
    AccessLogStore,
    ConsentStore,
    CorrectionStore,
    DisclosureStore,
    DestructionStore,
    Protocol,
):
    """The vault-database slice a withdrawal moves out of: the member, their access
    log, consent history, corrections and disclosure ledger, and the shred with its
    destruction record."""


class Retention:
    """Reached as ``vault.retention``. Holds no gRPC and no SQL."""

    def __init__(
        self,
        store: RetentionStores,
        retained: RetentionStore | None,
        member_keys: MemberKeys,
        clock: Clock,
        rule: RetentionRule,
        activity: Activity | None = None,
    ) -> None:
        self._activity = activity or Activity()
        if rule.period > timedelta(0) and retained is None:
            raise ValueError("a retention period needs a retention store")
        self._store = store
        self._retained = retained
        self._member_keys = member_keys
        self._clock = clock
        self._rule = rule

    def __repr__(self) -> str:
        return f"<Retention period={self._rule.period}>"

    @property
    def rule(self) -> RetentionRule:
        return self._rule

    @property
    def enabled(self) -> bool:
        """Whether withdrawals retain (a period above 0)."""
        return self._rule.period > timedelta(0)

    def _require_store(self) -> RetentionStore:
        if self._retained is None:
            raise PreconditionFailed("retention", "no retention database is configured")
        return self._retained

    # --- the move ------------------------------------------------------------------------
    async def withdraw(self, member_id: str) -> datetime:
        """Move the member into retention and shred them in the vault; returns the
        destroy-after time. NotFound if the member is gone; KeyChanged if they kept
        changing under the move (the caller may retry)."""
        retained = self._require_store()
        attempt = str(uuid.uuid4())
        for _ in range(_MOVE_ATTEMPTS):
            row = await self._store.get_member(member_id)
            if row is None:
                raise NotFound
            now = self._clock.now()
            copy = await self._copy(row, now, attempt)
            if not await retained.put_retained(copy, stale_before=now - CONFIRM_GRACE):
                # Another withdrawal of this member is in flight (or done): let it be.
                raise KeyChanged
            check = RetentionCheck(
                dek_id=row.key.dek_id,
                ciphertexts=row.ciphertexts,
                access_entry_ids=frozenset(e.entry_id for e in copy.access_log),
                consent_event_ids=frozenset(e.event_id for e in copy.consent_history),
                disclosure_ids=frozenset(e.disclosure_id for e in copy.disclosures),
                kek_version=copy.key.kek_version,
                retained_until=copy.destroy_after,
                corrections=copy.corrections,
            )
            try:
                record = await self._store.shred_member(
                    row.member_id, now, WITHDRAWAL, retention=check, withdrawal=True
                )
            except (KeyChanged, Conflict):
                # Changed (or the KEK rotated) since we read, or rolled back in a
                # conflict with a concurrent transaction: copy again.
                continue
            self._member_keys.evict(row.member_id)
            if record is None:  # shredded by someone else meanwhile: the copy is moot
                await retained.delete_retained(row.member_id, attempt=attempt)
                raise NotFound
            # If this fails, the sidecar confirms the copy from the record.
            await retained.confirm_retained(row.member_id)
            log.info(
                "member_withdrawn_into_retention",
                member_id=row.member_id,
                items=dict(record.items),
                access_entries=len(copy.access_log),
            )
            return copy.destroy_after
        raise KeyChanged

    async def _copy(self, row: MemberRow, now: datetime, attempt: str) -> RetainedMember:
        mid = row.member_id
        entries = await whole_access_log(self._store, mid)
        history = await whole_consent_history(self._store, mid)
        ledger = await whole_disclosure_ledger(self._store, mid)
        corrections = await self._store.list_corrections(mid)
        active = await self._member_keys.active_version()
        key = row.key
        if key.kek_version != active:
            # Under the active version: the vault's shred checks it is still active,
            # so the destroy guard, which counts retained keys, cannot miss the copy.
            key = await self._member_keys.rewrapped(key, active)
        return RetainedMember(
            member_id=mid,
            retained_at=now,
            destroy_after=now + self._rule.period,
            reason=self._rule.reason,
            key=key,
            ciphertexts={f: row.ciphertexts[f] for f in RETAINED_FIELDS},
            consents=row.consents,
            access_log=tuple(entries),
            consent_history=tuple(history),
            disclosures=tuple(ledger),
            corrections=tuple(corrections),
            attempt=attempt,
        )

    # --- the privacy officer's tools -------------------------------------------------------
    async def list_retained(
        self, limit: int = 100, after_member_id: str | None = None
    ) -> list[RetainedSummary]:
        return await self._require_store().list_retained(limit, after_member_id)

    async def events(self, member_id: str | None = None) -> list[RetentionEvent]:
        return await self._require_store().list_events(member_id)

    async def disclose(self, member_id: str, actor: str, basis: str) -> dict[str, Any]:
        """Decrypt a retained member for a use the law requires. The disclosure is
        recorded (who, when, the stated basis) before anything is decrypted."""
        copy, event = await self._use(member_id, actor, "disclose", basis)
        mid, now, basis = copy.member_id, event.at, event.basis
        dek = await self._member_keys.unwrap(copy.key)
        fields = {
            f: member_cipher.open_text(dek, mid, f, copy.ciphertexts[f]) for f in RETAINED_FIELDS
        }
        log.info("retained_member_disclosed", member_id=mid, actor=actor)
        history = [
            (e.at, *member_cipher.open_access(dek, mid, e), member_cipher.open_caller(dek, mid, e))
            for e in copy.access_log
        ]
        entities = await legal_entities(self._store)
        ledger = [entry_json(open_entry(dek, mid, e, entities)) for e in copy.disclosures]
        return {
            "format": DISCLOSURE_FORMAT,
            "member_id": mid,
            "disclosed_at": now.isoformat(),
            "disclosed_by": actor,
            "basis": basis,
            "retained_at": copy.retained_at.isoformat(),
            "destroy_after": copy.destroy_after.isoformat(),
            "retention_reason": copy.reason,
            "member": {**fields, "mobile_phone": fields["mobile_phone"] or None},
            "consents": [
                {
                    "purpose": c.purpose,
                    "granted": c.granted,
                    "policy_version": c.policy_version,
                    "recorded_at": c.recorded_at.isoformat(),
                }
                for c in copy.consents
            ],
            "consent_history": [consent_event_json(e) for e in copy.consent_history],
            "corrections": [
                correction_json(c) for c in opened_corrections(dek, mid, copy.corrections)
            ],
            "access_history": [
                {"at": at.isoformat(), "action": action, "ip": ip, "caller": caller}
                for at, action, ip, caller in history
            ],
            "disclosures": ledger,
        }

    async def destroy(self, member_id: str, actor: str, basis: str) -> DestructionRecord:
        """Destroy a retained copy before its date (the reason for keeping it ended)."""
        copy, _ = await self._use(member_id, actor, "destroy_early", basis)
        record = await self._destroy_copy(copy.member_id, RETENTION_DESTROYED)
        if record is None:
            raise NotFound  # the sidecar destroyed it meanwhile
        self._activity.shredded(RETENTION_DESTROYED)
        return record

    async def _use(
        self, member_id: str, actor: str, operation: str, basis: str
    ) -> tuple[RetainedMember, RetentionEvent]:
        """A use of a confirmed copy, recorded with its basis before it happens."""
        retained = self._require_store()
        basis = _check_basis(basis)
        mid = _member_id(member_id)
        copy = await retained.get_retained(mid)
        if copy is None or not copy.confirmed:
            raise NotFound
        event = RetentionEvent(self._clock.now(), actor, operation, mid, basis)
        await retained.record_event(event)
        return copy, event

    async def _destroy_copy(self, member_id: str, reason: str) -> DestructionRecord | None:
        retained = self._require_store()
        return await destroy_copy(self._store, retained, member_id, reason, self._clock.now())


async def destroy_copy(
    store: DestructionStore, retained: RetentionStore, member_id: str, reason: str, now: datetime
) -> DestructionRecord | None:
    """Destroy a retained copy: the vault's destruction record first (idempotent), then
    the copy, so a crash in between leaves a copy the next sweep destroys, and never
    a second record. None if there was no copy. Needs no key: deleting the wrapped
    DEK with the ciphertexts is the crypto-shred."""
    copy = await retained.get_retained(member_id)
    if copy is None:
        return None
    record = DestructionRecord(
        member_id=copy.member_id,
        destroyed_at=now,
        reason=reason,
        items={
            "retained_member": 1,
            "member_keys": 1,
            "consents": len(copy.consents),
            "consent_history": len(copy.consent_history),
            "access_log": len(copy.access_log),
            "disclosure_ledger": len(copy.disclosures),
            "corrections": len(copy.corrections),
        },
        kek_versions=(copy.key.kek_version,),
    )
    # One record per copy, whichever path (its date, the officer) ends it.
    await store.record_destruction(record, unless=(RETENTION_EXPIRED, RETENTION_DESTROYED))
    if not await retained.delete_retained(member_id):
        return None
    log.info(
        "retained_member_destroyed",
        member_id=copy.member_id,
        reason=reason,
        items=dict(record.items),
    )
    return record


async def reconcile_copies(
    store: DestructionStore,
    retained: RetentionStore,
    now: datetime,
    batch_size: int,
    *,
    dry_run: bool,
) -> int:
    """Settle copies a crash left unconfirmed (see the module docstring); returns how
    many were (or would be) settled, confirmed or deleted."""
    stale = await retained.unconfirmed_before(now - CONFIRM_GRACE, batch_size)
    if dry_run:
        return len(stale)
    settled = 0
    for member_id in stale:
        records = await store.list_destruction_records(member_id)
        if any(r.reason == WITHDRAWAL and r.retained_until is not None for r in records):
            settled += await retained.confirm_retained(member_id)
            continue
        # The member is alive (the move never committed) or was destroyed for another
        # reason: the copy must not outlive that.
        copy = await retained.get_retained(member_id)
        if copy is not None and not copy.confirmed:
            settled += await retained.delete_retained(member_id, attempt=copy.attempt)
    return settled


def _member_id(member_id: str) -> str:
    canonical = ids.canonical_member_id(member_id)
    if canonical is None:
        raise NotFound
    return canonical


def disclosure_json(document: dict[str, Any]) -> str:
    return json.dumps(document, ensure_ascii=False, indent=2)
