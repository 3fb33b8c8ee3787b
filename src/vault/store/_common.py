"""What both backends share: the column whitelists and the checks on arguments.

Column names in SQL are only ever taken from the constant maps here, never from
a caller's string. Checks raise ``ValueError`` (a caller mistake) and never
echo the offending value.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from datetime import datetime
from typing import get_args

from vault import ids
from vault.clock import from_micros, to_micros
from vault.errors import PreconditionFailed
from vault.store.rows import (
    CORRECTABLE_FIELDS,
    ENCRYPTED_FIELDS,
    INDEXED_FIELDS,
    RETAINED_FIELDS,
    CorrectionRow,
    KekState,
    KekVersionRow,
    MemberKeyRow,
    MemberRow,
    OutboxMessage,
    RetainedMember,
    RetentionCheck,
)

# Field name -> column; the only source of column names built into SQL.
CT_COLUMNS: Mapping[str, str] = {f: f"{f}_ct" for f in ENCRYPTED_FIELDS}
HMAC_COLUMNS: Mapping[str, str] = {"login_id": "login_hmac", "email": "email_hmac"}
assert tuple(HMAC_COLUMNS) == INDEXED_FIELDS

KEK_STATES: tuple[str, ...] = get_args(KekState)


def canonical_member_id(member_id: str) -> str:
    """The canonical lowercase form, so both backends match ids the same way."""
    canonical = ids.canonical_member_id(member_id)
    if canonical is None:
        raise ValueError("member_id must be a UUID")
    return canonical


def require_aware(value: datetime) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("datetimes must be timezone-aware")
    return value


def check_kek_version(row: KekVersionRow) -> None:
    if row.state not in KEK_STATES:
        raise ValueError("unknown KEK version state")
    require_aware(row.created_at)
    if row.destroyed_at is not None:
        require_aware(row.destroyed_at)


def check_unused(version: int, member_keys: int, index_keys: int) -> None:
    """The destroy guard: no key may still be wrapped under the version."""
    if member_keys or index_keys:
        raise PreconditionFailed(
            "kek_version",
            f"KEK version {version} still wraps {member_keys} member keys and {index_keys} "
            "index keys; re-wrap them to the active version first",
            "IN_USE",
        )


def check_new_member(member: MemberRow) -> str:
    """Validate a member to insert; return its canonical id."""
    member_id = canonical_member_id(member.member_id)
    if canonical_member_id(member.key.member_id) != member_id:
        raise ValueError("the member key belongs to another member")
    if set(member.ciphertexts) != set(ENCRYPTED_FIELDS):
        raise ValueError("a new member needs exactly one ciphertext per encrypted field")
    if set(member.blind_indexes) != set(INDEXED_FIELDS):
        raise ValueError("a new member needs exactly one blind index per indexed field")
    require_aware(member.created_at)
    require_aware(member.last_seen_at)
    purposes = [c.purpose for c in member.consents]
    if len(set(purposes)) != len(purposes):
        raise ValueError("consents name a purpose more than once")
    for consent in member.consents:
        require_aware(consent.recorded_at)
    return member_id


def update_assignments(
    ciphertexts: Mapping[str, bytes], blind_indexes: Mapping[str, bytes] | None
) -> list[tuple[str, bytes]]:
    """(column, value) pairs for an update, columns from the whitelist only."""
    indexes = blind_indexes or {}
    if not set(ciphertexts) <= set(ENCRYPTED_FIELDS):
        raise ValueError("unknown encrypted field name")
    if not set(indexes) <= set(INDEXED_FIELDS):
        raise ValueError("unknown indexed field name")
    pairs = [(CT_COLUMNS[f], bytes(ciphertexts[f])) for f in ENCRYPTED_FIELDS if f in ciphertexts]
    pairs += [(HMAC_COLUMNS[f], bytes(indexes[f])) for f in INDEXED_FIELDS if f in indexes]
    return pairs


def hmac_column(index: str) -> str:
    column = HMAC_COLUMNS.get(index)
    if column is None:
        raise ValueError("unknown indexed field name")
    return column


def check_limit(limit: int) -> int:
    if limit < 0:
        raise ValueError("limit must not be negative")
    return limit


TOKEN_HASH_BYTES = 32  # SHA-256


def check_token_hash(token_hash: bytes) -> bytes:
    """A password reset token's hash as stored: exactly 32 bytes (never the token)."""
    value = bytes(token_hash)
    if len(value) != TOKEN_HASH_BYTES:
        raise ValueError("a token hash is the 32-byte SHA-256 of the token")
    return value


def check_key_replacement(
    member_id: str,
    new_key: MemberKeyRow,
    ciphertexts: Mapping[str, bytes],
    old_ciphertexts: Mapping[str, bytes],
) -> tuple[str, list[bytes]]:
    """The checks of replace_member_key; returns the canonical member id and the old
    ciphertexts in column order (what the row must still hold)."""
    canonical = canonical_member_id(member_id)
    if canonical_member_id(new_key.member_id) != canonical:
        raise ValueError("the new key belongs to another member")
    if set(ciphertexts) != set(ENCRYPTED_FIELDS) or set(old_ciphertexts) != set(ENCRYPTED_FIELDS):
        raise ValueError("a key rotation re-encrypts every field")
    return canonical, [bytes(old_ciphertexts[f]) for f in ENCRYPTED_FIELDS]


#: The ciphertext columns in ENCRYPTED_FIELDS order, for reading a whole row's fields.
# A member row with its key, as both backends' member reads select it (the order
# is the positions the readers index).
MEMBER_COLUMNS = ", ".join(
    [
        "m.member_id",
        "m.created_at",
        "m.last_seen_at",
        *(f"m.{column}" for column in HMAC_COLUMNS.values()),
        *(f"m.{column}" for column in CT_COLUMNS.values()),
        "k.dek_id",
        "k.kek_version",
        "k.wrapped_dek",
    ]
)

CT_SELECT = ", ".join(CT_COLUMNS[f] for f in ENCRYPTED_FIELDS)


def outbox_params_json(message: OutboxMessage) -> str:
    """An outbox message's template parameters as stored: a JSON object of strings."""
    return json.dumps({str(k): str(v) for k, v in message.params.items()}, sort_keys=True)


def check_retention(check: RetentionCheck) -> list[bytes]:
    """The checks on a RetentionCheck; returns the ciphertexts in column order (what
    the member row must still hold for the copy to be current)."""
    if set(check.ciphertexts) != set(ENCRYPTED_FIELDS):
        raise ValueError("a retention check names every encrypted field")
    require_aware(check.retained_until)
    return [bytes(check.ciphertexts[f]) for f in ENCRYPTED_FIELDS]


#: What a shred deleted, table by table, as the destruction record names it.
_SHRED_ITEMS: Mapping[str, str] = {
    "members": "member",
    "member_keys": "member_keys",
    "consents": "consents",
    "consent_events": "consent_history",
    "disclosures": "disclosure_ledger",
    "access_log": "access_log",
    "outbox": "outbox",
    "password_resets": "password_resets",
    "corrections": "corrections",
}
SHRED_TABLES: tuple[str, ...] = (
    "outbox",
    "password_resets",
    "access_log",
    "disclosures",
    "consent_events",
    "correction_fields",
    "corrections",
    "consents",
    "member_keys",
    "members",
)  # children first, so each count is exact (not cascaded)


def shred_items(counts: Mapping[str, int]) -> dict[str, int]:
    """A destruction record's items from a shred's per-table delete counts."""
    return {item: int(counts[table]) for table, item in _SHRED_ITEMS.items()}


def check_retained(member: RetainedMember) -> str:
    """Validate a copy for the retention store; return its canonical member id."""
    member_id = canonical_member_id(member.member_id)
    if canonical_member_id(member.key.member_id) != member_id:
        raise ValueError("the retained key belongs to another member")
    if set(member.ciphertexts) != set(RETAINED_FIELDS):
        raise ValueError("a retained member needs exactly one ciphertext per retained field")
    require_aware(member.retained_at)
    require_aware(member.destroy_after)
    for entry in member.access_log:
        require_aware(entry.at)
    return member_id


#: Retained field -> column, the only source of those column names in SQL.
RETAINED_COLUMNS: Mapping[str, str] = {f: CT_COLUMNS[f] for f in RETAINED_FIELDS}


def _b64(value: bytes | None) -> str | None:
    return None if value is None else base64.b64encode(value).decode()


def _unb64(value: str | None) -> bytes | None:
    return None if value is None else base64.b64decode(value, validate=True)


def corrections_json(corrections: tuple[CorrectionRow, ...]) -> str:
    """A retained copy's corrections as stored: JSON, times in microseconds, the
    sealed note and reason in base64 (still under the member's DEK)."""
    return json.dumps(
        [
            {
                "correction_id": c.correction_id,
                "requested_at": to_micros(require_aware(c.requested_at)),
                "requested_by": c.requested_by,
                "fields": dict(c.fields),
                "state": c.state,
                "note_ct": _b64(c.note_ct),
                "resolved_at": None if c.resolved_at is None else to_micros(c.resolved_at),
                "resolved_by": c.resolved_by,
                "reason_ct": _b64(c.reason_ct),
            }
            for c in corrections
        ]
    )


def corrections_from_json(member_id: str, text: str) -> tuple[CorrectionRow, ...]:
    return tuple(
        CorrectionRow(
            correction_id=c["correction_id"],
            member_id=member_id,
            requested_at=from_micros(int(c["requested_at"])),
            requested_by=c["requested_by"],
            fields={f: c["fields"][f] for f in CORRECTABLE_FIELDS if f in c["fields"]},
            state=c["state"],
            note_ct=_unb64(c["note_ct"]),
            resolved_at=None if c["resolved_at"] is None else from_micros(int(c["resolved_at"])),
            resolved_by=c["resolved_by"],
            reason_ct=_unb64(c["reason_ct"]),
        )
        for c in json.loads(text)
    )
