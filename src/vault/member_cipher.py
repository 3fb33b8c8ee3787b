"""The member cipher recipe: seal, open and re-encrypt one member's fields.

Every ciphertext of a member is sealed under that member's DEK and bound to the
member id and the field's name (an access-log entry's fields also to its time,
see :mod:`vault.bindings`), so a ciphertext moved to another member, row or
column does not open. The facade, key rotation and retention all seal and open
through these functions; none of them calls the AEAD of :mod:`vault._hazmat`
for member data itself. Plain functions, not an object per member: the read
path (GetMember) allocates nothing for them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime

from vault import _hazmat
from vault.bindings import access_field, correction_field
from vault.calls import current_caller
from vault.store.base import AccessEntryRow, CorrectionRow, MemberRow, NewAccessEntry
from vault.store.rows import ResealedAccess, ResealedCorrection

SecretKey = _hazmat.SecretKey


def seal(dek: SecretKey, member_id: str, field_name: str, value: str) -> bytes:
    return _hazmat.seal_field(dek, member_id, field_name, value.encode())


def open_text(dek: SecretKey, member_id: str, field_name: str, blob: bytes) -> str:
    """The field's text; DecryptionError for any blob that is not exactly that."""
    return _hazmat.open_field(dek, member_id, field_name, blob).decode()


def open_row_field(dek: SecretKey, row: MemberRow, field_name: str) -> str:
    """One of the member row's fields in clear (GetMember's hot path: one call deep)."""
    return _hazmat.open_field(dek, row.member_id, field_name, row.ciphertexts[field_name]).decode()


def seal_access(
    dek: SecretKey, member_id: str, at: datetime, action: str, ip: str, caller: str | None = None
) -> NewAccessEntry:
    """A new entry, recording ``caller`` (default: the current call's caller) with it:
    sealed like the action, since it ties a service to the member's activity."""
    who = current_caller() if caller is None else caller
    return NewAccessEntry(
        at=at,
        action_ct=seal(dek, member_id, access_field("action", at), action),
        ip_ct=seal(dek, member_id, access_field("ip", at), ip),
        caller_ct=seal(dek, member_id, access_field("caller", at), who),
    )


def open_access(dek: SecretKey, member_id: str, row: AccessEntryRow) -> tuple[str, str]:
    """An access-log entry's (action, ip)."""
    action = open_text(dek, member_id, access_field("action", row.at), row.action_ct)
    ip = open_text(dek, member_id, access_field("ip", row.at), row.ip_ct)
    return action, ip


def open_caller(dek: SecretKey, member_id: str, row: AccessEntryRow) -> str:
    """Who recorded the entry; "" for an entry older than callers (migration 0011)."""
    if row.caller_ct is None:
        return ""
    return open_text(dek, member_id, access_field("caller", row.at), row.caller_ct)


def reseal(old: SecretKey, new: SecretKey, member_id: str, field_name: str, blob: bytes) -> bytes:
    """One ciphertext opened under ``old`` and sealed again under ``new``."""
    plain = _hazmat.open_field(old, member_id, field_name, blob)
    return _hazmat.seal_field(new, member_id, field_name, plain)


def reseal_fields(
    old: SecretKey, new: SecretKey, member_id: str, ciphertexts: Mapping[str, bytes]
) -> dict[str, bytes]:
    return {f: reseal(old, new, member_id, f, blob) for f, blob in ciphertexts.items()}


def reseal_access_log(
    old: SecretKey, new: SecretKey, member_id: str, entries: Iterable[AccessEntryRow]
) -> dict[int, ResealedAccess]:
    """Each entry's (action, ip, caller) ciphertexts under ``new``, by entry id."""
    return {
        e.entry_id: (
            reseal(old, new, member_id, access_field("action", e.at), e.action_ct),
            reseal(old, new, member_id, access_field("ip", e.at), e.ip_ct),
            None
            if e.caller_ct is None
            else reseal(old, new, member_id, access_field("caller", e.at), e.caller_ct),
        )
        for e in entries
    }


def seal_correction_text(dek: SecretKey, member_id: str, kind: str, cid: str, text: str) -> bytes:
    """A correction's note or closing reason ("note", "reason"), bound to its id."""
    return seal(dek, member_id, correction_field(kind, cid), text)


def open_correction_text(
    dek: SecretKey, member_id: str, kind: str, cid: str, blob: bytes | None
) -> str:
    """The note or reason in clear; "" when there is none."""
    if blob is None:
        return ""
    return open_text(dek, member_id, correction_field(kind, cid), blob)


def reseal_corrections(
    old: SecretKey, new: SecretKey, member_id: str, corrections: Iterable[CorrectionRow]
) -> tuple[dict[str, ResealedCorrection], dict[str, ResealedCorrection]]:
    """(as read, re-sealed under ``new``) for each correction with a sealed text."""
    before: dict[str, ResealedCorrection] = {}
    after: dict[str, ResealedCorrection] = {}
    for c in corrections:
        if c.note_ct is None and c.reason_ct is None:
            continue
        cid = c.correction_id
        before[cid] = (c.note_ct, c.reason_ct)
        after[cid] = (
            None
            if c.note_ct is None
            else reseal(old, new, member_id, correction_field("note", cid), c.note_ct),
            None
            if c.reason_ct is None
            else reseal(old, new, member_id, correction_field("reason", cid), c.reason_ct),
        )
    return before, after
