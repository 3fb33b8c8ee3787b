"""Corrections that freeze use (privacy policy section 7).

"If the user requests the correction of incorrect personal data, the company
should not use or provide the personal data in question until correction is
complete. In addition, if the wrong personal data has been already provided to a
third party, the correction processing result will be notified to the third party
immediately so that correction can be made."

A correction names fields (those UpdateMember can correct: name, e-mail, mobile
phone) and is requested by the member (their session) or by a calling service on
their behalf. While a field of it is pending, every read of that field for a
purpose other than the member's own (MEMBER_REQUEST) is refused
(:class:`~vault.errors.CorrectionPending`): the member read's own statement
returns the frozen fields (``MemberRow.frozen``), so the check costs no query.
Each field is released on its own: UpdateMember correcting it releases it in the
update's transaction, and a correction whose fields are all corrected is
*applied*; or the whole correction is *closed* with a recorded reason (by the
member, or by a calling service the caller policy allows CloseCorrection).

The note and the closing reason are free text that may hold personal data: sealed
under the member's DEK, bound to the correction's id. Who requested and who
resolved are recorded in clear: a calling service's identity or "member".

For the disclosure step (:mod:`vault.disclosures`): a disclosure refuses frozen
fields with :func:`refuse_frozen`; and the transaction in which UpdateMember applies
a correction of a member with ledger entries marks it as owing the recipients of
the old values notices, which the sidecar queues (``queue_correction_notices`` of
``Disclosures``), so a crash after the update loses none.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Protocol

import structlog

from vault import _hazmat, ids, member_cipher, policy
from vault.calls import current_caller
from vault.clock import Clock
from vault.errors import (
    CorrectionNotFound,
    CorrectionPending,
    CorrectionResolved,
)
from vault.member_keys import MemberKeys
from vault.member_rows import load_member
from vault.page_tokens import checked_page, decode_correction_token, encode_correction_token
from vault.policy import Violations
from vault.store.base import (
    CORRECTABLE_FIELDS,
    CorrectionRow,
    CorrectionStore,
    MemberRow,
    MemberStore,
)

log = structlog.get_logger("vault.corrections")

#: Who a correction was requested or resolved by when the member did it (their session).
BY_MEMBER = "member"
NOTE_MAX = 1000
REASON_MAX = 500
#: "urn:uuid:" and a UUID, as member ids.
CORRECTION_ID_MAX = 45


def refuse_frozen(row: MemberRow, fields: frozenset[str]) -> None:
    """CorrectionPending if a pending correction freezes any of ``fields``: the one
    check every use of a member's data but the member's own goes through (GetMember
    for a purpose; the disclosure step's Disclose, with the fields it would
    provide). ``row`` is the member as read, ``frozen`` included: no extra query."""
    if row.frozen and (held := row.frozen & fields):
        raise CorrectionPending(held)


class CorrectionStores(MemberStore, CorrectionStore, Protocol):
    """The vault-database slice corrections use: the member (its key), and theirs."""


@dataclass(frozen=True, slots=True)
class Correction:
    """A correction as the member (and the export) sees it: the texts opened."""

    correction_id: str
    requested_at: datetime
    requested_by: str
    #: Field name -> "pending", "corrected" or "closed".
    fields: Mapping[str, str]
    state: str
    note: str = ""
    resolved_at: datetime | None = None
    resolved_by: str = ""
    reason: str = ""

    def __repr__(self) -> str:
        return f"<Correction {self.correction_id} {self.state}>"


@dataclass(frozen=True, slots=True)
class CorrectionPage:
    corrections: tuple[Correction, ...]
    next_page_token: str = ""


@dataclass(frozen=True, slots=True)
class AppliedCorrection:
    """A correction UpdateMember completed: the fields corrected, when, by whom
    (what its notices to the recipients of the old values are made from)."""

    member_id: str
    correction_id: str
    fields: tuple[str, ...]
    applied_at: datetime
    applied_by: str


def _checked_text(value: str, limit: int, field: str, v: Violations, *, required: bool) -> str:
    text = value.strip()
    # Free text: line breaks and tabs are fine, other control characters are not.
    bare = text.replace("\n", "").replace("\r", "").replace("\t", "")
    if len(value) > limit or (required and not text) or policy.has_control(bare):
        v.add(field, f"must be {'1' if required else '0'}-{limit} printable characters")
    return text


def _checked_fields(names: Iterable[str], v: Violations) -> tuple[str, ...]:
    given = list(names)
    # Never the caller's text in a description: only what is allowed.
    if not given or len(set(given)) != len(given) or not set(given) <= set(CORRECTABLE_FIELDS):
        v.add("fields", "must name each of name, email, mobile_phone at most once, at least one")
        return ()
    return tuple(f for f in CORRECTABLE_FIELDS if f in given)


def _checked_correction_id(value: str, v: Violations) -> str:
    if len(value) > CORRECTION_ID_MAX or ids.canonical_member_id(value) is None:
        v.add("correction_id", "must be a correction ID as RequestCorrection returned it")
        return ""
    return ids.canonical_member_id(value) or ""


class Corrections:
    """Reached as ``vault.corrections``. Holds no gRPC and no SQL."""

    def __init__(
        self,
        store: CorrectionStores,
        keys: MemberKeys,
        clock: Clock,
        page_token_key: _hazmat.MacKey,
    ) -> None:
        self._store = store
        self._keys = keys
        self._clock = clock
        self._page_token_key = page_token_key

    def __repr__(self) -> str:
        return "<Corrections>"

    async def request(
        self, member_id: str, fields: Iterable[str], note: str, *, by_member: bool
    ) -> Correction:
        """Record a pending correction of ``fields``; from now on they are frozen
        for every read but the member's own. ``by_member``: the member asked (their
        session); else the calling service on their behalf."""
        v = Violations()
        mid = policy.check_member_id(member_id, v)
        names = _checked_fields(fields, v)
        text = _checked_text(note, NOTE_MAX, "note", v, required=False)
        v.raise_if_any()
        assert mid
        cid = str(uuid.uuid4())
        by = BY_MEMBER if by_member else current_caller()
        at = self._clock.now()

        async def write(row: MemberRow, key: _hazmat.SecretKey) -> bool:
            sealed = (
                member_cipher.seal_correction_text(key, mid, "note", cid, text) if text else None
            )
            new = CorrectionRow(
                cid, mid, at, by, dict.fromkeys(names, "pending"), "pending", sealed
            )
            return await self._store.insert_correction(new, dek_id=row.key.dek_id)

        await self._keys.under_current_key(mid, write)
        log.info("correction_requested", member_id=mid, fields=list(names), by=by)
        return Correction(cid, at, by, dict.fromkeys(names, "pending"), "pending", text)

    async def close(
        self, member_id: str, correction_id: str, reason: str, *, by_member: bool
    ) -> Correction:
        """Close a pending correction with a recorded reason: its pending fields are
        released. CorrectionNotFound for none of the member's; CorrectionResolved if
        it was applied or closed already."""
        v = Violations()
        mid = policy.check_member_id(member_id, v)
        cid = _checked_correction_id(correction_id, v)
        text = _checked_text(reason, REASON_MAX, "reason", v, required=True)
        v.raise_if_any()
        assert mid
        by = BY_MEMBER if by_member else current_caller()
        at = self._clock.now()
        result: list[tuple[CorrectionRow, bool] | None] = [None]

        async def write(row: MemberRow, key: _hazmat.SecretKey) -> bool:
            sealed = member_cipher.seal_correction_text(key, mid, "reason", cid, text)
            result[0] = await self._store.close_correction(
                mid, cid, at, by, sealed, dek_id=row.key.dek_id
            )
            return True

        await self._keys.under_current_key(mid, write)
        if result[0] is None:
            raise CorrectionNotFound
        closed, now_closed = result[0]
        if not now_closed:
            raise CorrectionResolved(closed.state)
        log.info("correction_closed", member_id=mid, by=by)
        return (await self._opened(mid, [closed]))[0]

    async def member_corrections(
        self, member_id: str, page_size: int, page_token: str
    ) -> CorrectionPage:
        """The member's corrections, oldest first, a page at a time, texts opened.
        Paged by (requested_at, correction_id), which never changes: no correction
        is on two pages, and none there was at the first page is skipped, whatever
        is requested or closed meanwhile."""
        v = Violations()
        mid = policy.check_member_id(member_id, v)
        opener = (
            None if mid is None else partial(decode_correction_token, self._page_token_key, mid)
        )
        size, cursor = checked_page(page_size, page_token, opener, "ListCorrections", v)
        v.raise_if_any()
        assert mid

        async def read(r: MemberRow, dek: _hazmat.SecretKey) -> CorrectionPage:
            # One extra row tells whether another page exists.
            rows = await self._store.list_corrections_page(mid, size + 1, cursor)
            token = ""
            if len(rows) > size:
                last = rows[size - 1]
                token = encode_correction_token(
                    self._page_token_key, mid, last.requested_at, last.correction_id
                )
            return CorrectionPage(tuple(opened_corrections(dek, mid, rows[:size])), token)

        return await self._keys.read_under_key(await load_member(self._store, mid), read)

    async def _opened(self, member_id: str, rows: list[CorrectionRow]) -> list[Correction]:
        if not rows:
            return []
        row = await load_member(self._store, member_id)

        async def read(r: MemberRow, dek: _hazmat.SecretKey) -> list[Correction]:
            return opened_corrections(dek, r.member_id, rows)

        return await self._keys.read_under_key(row, read)


def opened_corrections(
    dek: _hazmat.SecretKey, member_id: str, rows: Iterable[CorrectionRow]
) -> list[Correction]:
    """Corrections with their note and reason opened under the member's DEK."""
    return [
        Correction(
            correction_id=c.correction_id,
            requested_at=c.requested_at,
            requested_by=c.requested_by,
            fields=dict(c.fields),
            state=c.state,
            note=member_cipher.open_correction_text(
                dek, member_id, "note", c.correction_id, c.note_ct
            ),
            resolved_at=c.resolved_at,
            resolved_by=c.resolved_by or "",
            reason=member_cipher.open_correction_text(
                dek, member_id, "reason", c.correction_id, c.reason_ct
            ),
        )
        for c in rows
    ]


def correction_json(c: Correction) -> dict[str, object]:
    """One correction as the export and a retained member's disclosure show it."""
    return {
        "correction_id": c.correction_id,
        "requested_at": c.requested_at.isoformat(),
        "requested_by": c.requested_by,
        "fields": dict(c.fields),
        "state": c.state,
        "note": c.note or None,
        "resolved_at": None if c.resolved_at is None else c.resolved_at.isoformat(),
        "resolved_by": c.resolved_by or None,
        "reason": c.reason or None,
    }
