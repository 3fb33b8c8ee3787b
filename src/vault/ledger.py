"""The disclosure ledger's entries: sealing an entry's details, opening entries, and
how the export and a retained copy show them (see :mod:`vault.disclosures`).

Kept apart from :mod:`vault.disclosures` so the export and retention, which the
member modules import, can open a ledger without importing the rest.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime

from vault import _hazmat, member_cipher
from vault.bindings import disclosure_field
from vault.calls import current_caller
from vault.store.base import (
    DisclosureRow,
    DisclosureStore,
    NewDisclosure,
    whole_disclosure_ledger,
)
from vault.store.rows import DisclosureBasis

CONSENT: DisclosureBasis = "consent"
LEGAL: DisclosureBasis = "legal"
CORRECTION: DisclosureBasis = "correction"


@dataclass(frozen=True, slots=True)
class LegalBasis:
    """A disclosure the law requires: the statute or request reference, and who
    approved it (both recorded, sealed, in the ledger)."""

    reference: str
    approved_by: str


@dataclass(frozen=True, slots=True)
class DisclosureEntry:
    """A ledger entry opened: who received what, when, on which basis, by whom."""

    disclosure_id: int
    recipient_id: str
    legal_entity: str
    purpose: str
    fields: tuple[str, ...]
    basis: DisclosureBasis
    at: datetime
    caller: str
    legal_reference: str = ""
    approved_by: str = ""


def new_entry(
    dek: _hazmat.SecretKey,
    member_id: str,
    recipient_id: str,
    purpose: str,
    fields: tuple[str, ...],
    basis: DisclosureBasis,
    at: datetime,
    legal: LegalBasis | None = None,
) -> NewDisclosure:
    """A ledger entry to append, with a fresh random id (made before the insert, so
    its sealed details, the caller and a legal basis's reference and approver, are
    bound to it and to ``at``)."""
    entry_id = str(uuid.uuid4())
    details = {"caller": current_caller()}
    if legal is not None:
        details |= {"reference": legal.reference, "approved_by": legal.approved_by}
    sealed = member_cipher.seal(dek, member_id, disclosure_field(entry_id, at), json.dumps(details))
    return NewDisclosure(recipient_id, purpose, fields, basis, at, sealed, entry_id)


def open_entry(
    dek: _hazmat.SecretKey, member_id: str, row: DisclosureRow, entities: dict[str, str]
) -> DisclosureEntry:
    details = json.loads(
        member_cipher.open_text(
            dek, member_id, disclosure_field(row.entry_id, row.at), row.details_ct
        )
    )
    return DisclosureEntry(
        row.disclosure_id,
        row.recipient_id,
        entities.get(row.recipient_id, ""),
        row.purpose,
        row.fields,
        row.basis,
        row.at,
        str(details.get("caller", "")),
        str(details.get("reference", "")),
        str(details.get("approved_by", "")),
    )


def entry_json(e: DisclosureEntry) -> dict[str, object]:
    """An entry as the export and the retained copy's disclosure show it."""
    return {
        "recipient_id": e.recipient_id,
        "legal_entity": e.legal_entity,
        "purpose": e.purpose,
        "fields": list(e.fields),
        "basis": e.basis,
        "legal_reference": e.legal_reference or None,
        "approved_by": e.approved_by or None,
        "disclosed_at": e.at.isoformat(),
        "caller": e.caller,
    }


async def legal_entities(store: DisclosureStore) -> dict[str, str]:
    """Recipient id -> legal entity, for showing ledger entries."""
    return {r.recipient_id: r.legal_entity for r in await store.list_recipients()}


async def opened_ledger(
    store: DisclosureStore, member_id: str, dek: _hazmat.SecretKey
) -> list[DisclosureEntry]:
    """Every ledger entry of the member, oldest first, opened (the export)."""
    entities = await legal_entities(store)
    rows = await whole_disclosure_ledger(store, member_id)
    return [open_entry(dek, member_id, x, entities) for x in rows]
