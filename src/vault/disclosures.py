"""Third-party provision (policy section 4): the recipients registry, Disclose and
the member's disclosure ledger.

"[The company] will not [...] disclose the user's personal data to the outside,
in principle", except with the member's agreement to provision to the third party,
or where the law requires it. So a disclosure needs one of:

- the member's consent to provision to *that recipient*: each registered recipient
  is an opt-in purpose of the catalogue, ``PROVIDE_TO_<RECIPIENT ID>``
  (:func:`vault.purposes.provision_spec`), which the member grants and withdraws
  with UpdateConsents, sees in GetConsents and their consent history, and is asked
  again about when a policy version materially changes it, like any opt-in purpose
  (a grant so outdated refuses: ConsentOutdated). One consent per recipient: it
  covers the purposes and fields the recipient is registered for, which is why a
  registration is never changed (register a new recipient instead);
- a recorded legal basis: the statute or request reference and who approved it.

A field under a pending correction is never provided (policy section 7:
CorrectionPending, through :func:`vault.corrections.refuse_frozen` on the member as
read, and again in the ledger write's transaction). When a correction is applied,
every recipient whose ledger entries (up to then) include a corrected field gets
one correction notice: through the outbox, to the recipient's contact address,
naming only the disclosure references it received and the corrected values of the
fields it received, sealed under the member's DEK until the relay sends it (a
member shredded before then takes the notice along). UpdateMember's transaction
that applies the correction also records that it owes notices; the sidecar's step
(:meth:`Disclosures.queue_correction_notices`) makes them under the member's
current key and settles each correction in one transaction: every notice's outbox
row and its own ledger entry (basis ``correction``), and the mark cleared. So a
crash after the update loses no notice, and a rerun or a second sidecar repeats
none: one per correction and recipient.

Either way only the recipient's registered fields go out, for one of its registered
purposes, and every provision is appended to the member's ledger in the same
transaction that re-checks the consent (a withdrawal committed before is seen).
The ledger names the recipient, purpose and fields in clear (none of them is
personal); the caller and a legal basis's reference and approver are sealed under
the member's DEK, so a shred destroys them with the rest of the member.
"""

from __future__ import annotations

import base64
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Protocol

from vault import _hazmat, member_cipher, policy
from vault.clock import Clock
from vault.corrections import AppliedCorrection, refuse_frozen
from vault.errors import NoConsentToProvide, NotFound, PurposeNotAllowed
from vault.ledger import (
    CONSENT,
    CORRECTION,
    LEGAL,
    DisclosureEntry,
    LegalBasis,
    legal_entities,
    new_entry,
    open_entry,
)
from vault.mail import CORRECTED_VALUE_PREFIX, CORRECTION_NOTICE, SEALED_PREFIX, SEALED_RECIPIENT
from vault.member_keys import MemberKeys
from vault.member_rows import load_member
from vault.members import VaultSettings, log
from vault.page_tokens import DISCLOSURE_LISTING, checked_page, decode_page_token, encode_cursor
from vault.policy import PII_FIELDS, Violations
from vault.purposes import NO_CONSENT, provision_spec
from vault.recovery import sealed_field
from vault.store.base import (
    CORRECTABLE_FIELDS,
    CorrectionStore,
    DisclosureRow,
    DisclosureStore,
    MemberRow,
    MemberStore,
    NewDisclosure,
    OutboxMessage,
    RecipientRow,
    whole_disclosure_ledger,
)

__all__ = [
    "DisclosedData",
    "DisclosureEntry",
    "DisclosurePage",
    "Disclosures",
    "LegalBasis",
    "RecipientRow",
]

RECIPIENT_ID = re.compile(r"[a-z][a-z0-9_]{1,47}")
RECIPIENT_ID_MAX = 48
TEXT_MAX = 200
BASIS_MAX = 500
EMAIL_MAX = 254
MAX_RECIPIENT_PURPOSES = 32
# Correction notice ids: one per (correction, recipient), so none is queued twice.
_NOTICE_NAMESPACE = uuid.UUID("5d0c7a52-3f0e-4d8e-9d61-2b7f1c4e8a90")


@dataclass(frozen=True, slots=True)
class DisclosedData:
    """What Disclose answers: the fields asked for (the recipient's), and the entry."""

    disclosure_id: int
    disclosed_at: datetime
    values: dict[str, str]


@dataclass(frozen=True, slots=True)
class DisclosurePage:
    entries: tuple[DisclosureEntry, ...]
    next_page_token: str = ""


class DisclosureStores(MemberStore, DisclosureStore, CorrectionStore, Protocol):
    """The vault-database slice disclosures use: the member read, the registry,
    the ledger, and the corrections that owe notices."""


def _text(value: str, field: str, v: Violations, limit: int = TEXT_MAX) -> str:
    """One line of printable text: these values go into mail headers (a recipient's
    name in To), notice bodies and what members are shown."""
    value = value.strip()
    if not value or len(value) > limit:
        v.add(field, f"must be 1-{limit} characters")
    elif policy.has_control(value) or any(c in "\u2028\u2029" for c in value):
        v.add(field, "must be one line of printable characters")
    return value


class Disclosures:
    """Reached as ``Vault.disclosures``."""

    def __init__(
        self,
        store: DisclosureStores,
        member_keys: MemberKeys,
        clock: Clock,
        settings: VaultSettings,
        page_token_key: _hazmat.MacKey,
    ) -> None:
        self._store = store
        self._keys = member_keys
        self._clock = clock
        self._catalogue = settings.purposes
        self._page_token_key = page_token_key

    def __repr__(self) -> str:
        return "<Disclosures>"

    # --- the privacy officer's registry ---------------------------------------------
    async def register(
        self,
        recipient_id: str,
        legal_entity: str,
        contact_email: str,
        purposes: Sequence[str],
        fields: Sequence[str],
        legal_basis: str,
        contract_reference: str,
        actor: str,
    ) -> RecipientRow:
        """Register a recipient (AlreadyExists("recipient_id") if the id is taken)."""
        v = Violations()
        if len(recipient_id) > RECIPIENT_ID_MAX or not RECIPIENT_ID.fullmatch(recipient_id):
            v.add("recipient_id", "must be 2-48 characters of a-z, 0-9 and '_', starting a-z")
        entity = _text(legal_entity, "legal_entity", v)
        contact = policy.check_email(contact_email, v, "contact_email")
        self._check_purposes(purposes, v)
        if not fields:
            v.add("fields", "must name at least one field")
        for i, name in enumerate(fields):
            if name not in PII_FIELDS or name in fields[:i]:
                v.add(f"fields[{i}]", f"must be one of {', '.join(PII_FIELDS)}, once")
        basis = _text(legal_basis, "legal_basis", v, BASIS_MAX)
        contract = _text(contract_reference, "contract_reference", v)
        v.raise_if_any()
        assert contact
        row = RecipientRow(
            recipient_id,
            entity,
            contact,
            tuple(purposes),
            tuple(sorted(fields)),
            basis,
            contract,
            self._clock.now(),
            actor,
        )
        await self._store.register_recipient(row)
        log.info(
            "recipient_registered",
            recipient_id=recipient_id,
            purposes=list(row.purposes),
            fields=list(row.fields),
            actor=actor,
        )
        return row

    def _check_purposes(self, purposes: Sequence[str], v: Violations) -> None:
        if not purposes or len(purposes) > MAX_RECIPIENT_PURPOSES:
            v.add("purposes", f"must name 1-{MAX_RECIPIENT_PURPOSES} purposes")
        for i, key in enumerate(purposes[:MAX_RECIPIENT_PURPOSES]):
            spec = self._catalogue.get(key)
            if spec is None or spec.consent == NO_CONSENT or key in purposes[:i]:
                v.add(
                    f"purposes[{i}]",
                    "must name a purpose of the catalogue that takes consent, once",
                )

    async def recipients(self) -> list[RecipientRow]:
        return await self._store.list_recipients()

    # --- provision --------------------------------------------------------------------
    async def disclose(
        self,
        member_id: str,
        recipient_id: str,
        purpose: str,
        fields: Sequence[str],
        legal: LegalBasis | None = None,
        *,
        purpose_field: str = "purpose",
    ) -> DisclosedData:
        """The member's ``fields`` for ``recipient_id``, recorded in the ledger (see
        the module docstring); NoConsentToProvide without consent or a legal basis."""
        v = Violations()
        mid = policy.check_member_id(member_id, v)
        if len(recipient_id) > RECIPIENT_ID_MAX or not RECIPIENT_ID.fullmatch(recipient_id):
            v.add("recipient_id", "must be a registered recipient's id")
        if self._catalogue.get(purpose) is None:
            v.add(purpose_field, "must name a purpose")
        if not fields:
            v.add("fields", "must name at least one field")
        if legal is not None:
            legal = LegalBasis(
                _text(legal.reference, "legal_basis.reference", v),
                _text(legal.approved_by, "legal_basis.approved_by", v),
            )
        v.raise_if_any()
        assert mid
        recipient = await self._store.get_recipient(recipient_id)
        if recipient is None:
            raise NotFound("recipient")
        if purpose not in recipient.purposes:
            v.add(purpose_field, "is not a purpose the recipient is registered to receive for")
        for i, name in enumerate(fields):
            if name not in recipient.fields or name in fields[:i]:
                v.add(f"fields[{i}]", "must be a field the recipient may receive, once")
        v.raise_if_any()
        row = await load_member(self._store, mid)
        refuse_frozen(row, frozenset(fields))  # section 7: FAILED_PRECONDITION
        consent_key = None
        if legal is None:
            spec = provision_spec(recipient.recipient_id, recipient.legal_entity, recipient.fields)
            try:  # ConsentOutdated rises as it is: the member must answer again
                self._catalogue.check_read(spec, row.consents, self._clock.now())
            except PurposeNotAllowed:
                raise NoConsentToProvide(recipient_id) from None
            consent_key = spec.key
        return await self._provide(row, recipient, purpose, tuple(fields), legal, consent_key)

    async def _provide(
        self,
        row: MemberRow,
        recipient: RecipientRow,
        purpose: str,
        fields: tuple[str, ...],
        legal: LegalBasis | None,
        consent_key: str | None,
    ) -> DisclosedData:
        mid = row.member_id
        answer: list[DisclosedData] = []

        async def write(current: MemberRow, dek: _hazmat.SecretKey) -> bool:
            refuse_frozen(current, frozenset(fields))  # a row read again on a retry
            at = self._clock.now()
            values = {f: member_cipher.open_row_field(dek, current, f) for f in fields}
            basis = LEGAL if legal is not None else CONSENT
            entry = new_entry(dek, mid, recipient.recipient_id, purpose, fields, basis, at, legal)
            disclosure_id = await self._store.append_disclosure(
                mid, entry, dek_id=current.key.dek_id, consent_purpose=consent_key
            )
            if disclosure_id is not None:
                answer.append(DisclosedData(disclosure_id, at, values))
            return True  # None: gone, or the consent withdrawn meanwhile (below)

        await self._keys.under_current_key(mid, write, first=(row, await self._keys.dek(row.key)))
        if not answer:
            await load_member(self._store, mid)  # NotFound if shredded meanwhile
            raise NoConsentToProvide(recipient.recipient_id)
        log.info(
            "member_disclosed",
            member_id=mid,
            recipient_id=recipient.recipient_id,
            purpose=purpose,
            fields=list(fields),
            basis=LEGAL if legal is not None else CONSENT,
        )
        return answer[0]

    # --- the member's ledger ----------------------------------------------------------
    async def ledger(self, member_id: str, page_size: int, page_token: str) -> DisclosurePage:
        """The member's ledger, newest first, a page at a time (their session was
        checked by the caller)."""
        v = Violations()
        mid = policy.check_member_id(member_id, v)
        opener = (
            None
            if mid is None
            else partial(decode_page_token, self._page_token_key, mid, listing=DISCLOSURE_LISTING)
        )
        size, cursor = checked_page(page_size, page_token, opener, "ListDisclosures", v)
        v.raise_if_any()
        assert mid
        entities = await self._entities()

        async def read(r: MemberRow, dek: _hazmat.SecretKey) -> DisclosurePage:
            rows = await self._store.list_disclosures(
                mid, size + 1, None if cursor is None else cursor[1]
            )
            token = ""
            if len(rows) > size:
                last = rows[size - 1]
                token = encode_cursor(
                    self._page_token_key, mid, last.at, last.disclosure_id, DISCLOSURE_LISTING
                )
            return DisclosurePage(
                tuple(open_entry(dek, mid, x, entities) for x in rows[:size]), token
            )

        return await self._keys.read_under_key(await load_member(self._store, mid), read)

    async def _entities(self) -> dict[str, str]:
        return await legal_entities(self._store)

    # --- section 7: the recipients of a corrected value ---------------------------------
    async def queue_correction_notices(self, limit: int, *, dry_run: bool = False) -> NoticePage:
        """One page of the sidecar's step: up to ``limit`` applied corrections that
        owe notices (marked in UpdateMember's transaction), each settled in one
        transaction of its own, under the member's current key (see the module
        docstring). A dry run writes nothing and counts the notices owed."""
        if dry_run:
            return await count_owed_notices(self._store, limit)
        owing = await self._store.corrections_owing_notices(limit)
        settled = queued = 0
        for member_id, correction_id in owing:
            done = await self._settle(member_id, correction_id)
            if done is not None:
                settled, queued = settled + 1, queued + done
        return NoticePage(len(owing), settled, queued)

    async def _settle(self, mid: str, correction_id: str) -> int | None:
        """The notices one correction owes, queued; None if it was settled by
        someone else, or the member is gone (a shred takes the debt along)."""
        applied = await _applied(self._store, mid, correction_id)
        if applied is None:
            return None
        owed = await _owed(self._store, applied)
        registry = {r.recipient_id: r for r in await self._store.list_recipients()}
        result: list[int] = []

        async def write(row: MemberRow, dek: _hazmat.SecretKey) -> bool:
            at = self._clock.now()
            notices = [
                self._notice(dek, row, applied, registry[rid], fields, entries, at)
                for rid, fields, entries in owed
            ]
            if await self._store.queue_correction_notices(
                mid, correction_id, notices, dek_id=row.key.dek_id
            ):
                result.append(len(notices))
            return True

        try:
            await self._keys.under_current_key(mid, write)
        except NotFound:
            return None
        if not result:
            return None
        log.info("correction_notices_queued", member_id=mid, notices=result[0])
        return result[0]

    def _notice(
        self,
        dek: _hazmat.SecretKey,
        row: MemberRow,
        applied: AppliedCorrection,
        recipient: RecipientRow,
        fields: tuple[str, ...],
        entries: list[DisclosureRow],
        at: datetime,
    ) -> tuple[NewDisclosure, OutboxMessage]:
        """One recipient's notice (its message id one per correction and recipient)
        and its own ledger entry."""
        mid = applied.member_id
        key = f"{applied.correction_id}\0{recipient.recipient_id}"
        message_id = str(uuid.uuid5(_NOTICE_NAMESPACE, key))

        def sealed(name: str, value: str) -> str:
            blob = member_cipher.seal(dek, mid, sealed_field(message_id, name), value)
            return base64.b64encode(blob).decode()

        params = {
            "recipient_id": recipient.recipient_id,
            "legal_entity": recipient.legal_entity,
            "contract": recipient.contract_reference,
            "references": ", ".join(f"#{e.disclosure_id}" for e in entries),
            "fields": ",".join(fields),
            "correction_id": applied.correction_id,
            "applied_at": applied.applied_at.isoformat(),
            SEALED_PREFIX + SEALED_RECIPIENT: sealed(SEALED_RECIPIENT, recipient.contact_email),
        }
        for name in fields:  # the corrected values, as the member row now holds them
            value = member_cipher.open_row_field(dek, row, name)
            params[SEALED_PREFIX + CORRECTED_VALUE_PREFIX + name] = sealed(
                CORRECTED_VALUE_PREFIX + name, value
            )
        notice = OutboxMessage(message_id, mid, CORRECTION_NOTICE, params, at)
        purpose = entries[-1].purpose
        return new_entry(dek, mid, recipient.recipient_id, purpose, fields, CORRECTION, at), notice


@dataclass(frozen=True, slots=True)
class NoticePage:
    """A page of the correction notices' step: corrections listed, of them settled
    now, and the notices queued (in a dry run: owed)."""

    listed: int
    settled: int
    notices: int


async def _applied(
    store: DisclosureStores, mid: str, correction_id: str
) -> AppliedCorrection | None:
    """The applied correction as it stands (None: gone with its member)."""
    for c in await store.list_corrections(mid):
        if c.correction_id == correction_id and c.state == "applied" and c.resolved_at:
            fields = tuple(f for f, state in c.fields.items() if state == "corrected")
            return AppliedCorrection(mid, correction_id, fields, c.resolved_at, c.resolved_by or "")
    return None


async def _owed(
    store: DisclosureStores, applied: AppliedCorrection
) -> list[tuple[str, tuple[str, ...], list[DisclosureRow]]]:
    """Each recipient whose entries up to the correction include a corrected
    field: the corrected fields it received, and those entries (oldest first)."""
    corrected = set(applied.fields)
    received: dict[str, list[DisclosureRow]] = {}
    for entry in await whole_disclosure_ledger(store, applied.member_id):
        # Up to the update (no entry of a frozen field is written between the request
        # and it; one in its very microsecond is the old value's). A notice received
        # before counts too: it carried a value now corrected.
        if entry.at <= applied.applied_at and corrected & set(entry.fields):
            received.setdefault(entry.recipient_id, []).append(entry)
    owed = []
    for recipient_id, entries in sorted(received.items()):
        got = {f for e in entries for f in e.fields}
        fields = tuple(f for f in CORRECTABLE_FIELDS if f in corrected and f in got)
        owed.append((recipient_id, fields, entries))
    return owed


async def count_owed_notices(store: DisclosureStores, limit: int) -> NoticePage:
    """A dry run's page: the notices up to ``limit`` corrections owe, nothing written
    (the store alone: no key is needed to count)."""
    owing = await store.corrections_owing_notices(limit)
    owed = 0
    for mid, correction_id in owing:
        applied = await _applied(store, mid, correction_id)
        if applied is not None:
            owed += len(await _owed(store, applied))
    return NoticePage(len(owing), 0, owed)
