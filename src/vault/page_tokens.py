"""The list RPCs' paging (AIP-158): page sizes, and page tokens opaque to callers
and authenticated by us."""

from __future__ import annotations

import base64
import binascii
import re
import struct
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TypeVar

from vault import _hazmat
from vault.clock import from_micros, to_micros
from vault.policy import Violations
from vault.store.base import AccessEntryRow

#: Every list's page size: 0 asks for the default, and more than the most is cut
#: to it (AIP-158), so one call reads a bounded number of rows.
DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 20, 100

Cursor = TypeVar("Cursor")

# Page tokens (every list's). Opaque to callers and authenticated by us:
#   token = base64url(version 0x02 | at (int64 µs) | entry_id (int64) | tag (16))
#   tag   = HMAC(page-token key, "pv.page-token" | version | len|member_id
#                | len|listing | at | entry_id)[:16]
# so a token opens only for the member and the listing it was issued for (the
# page size is not bound: it may change between pages). Anything else -- the
# old unauthenticated "v1:" text tokens included -- is refused before SQL.
# ListCorrections' rows have UUIDs, not integers: its cursor is
#   version 0x02 | at (int64 µs) | correction_id (the UUID's 16 bytes)
# tagged the same way (55 characters).
_PAGE_TOKEN_VERSION = 2
_PAGE_CURSOR = struct.Struct(">Bqq")
_UUID_CURSOR = struct.Struct(">Bq16s")
_TOKEN_ALPHABET = re.compile(r"[A-Za-z0-9_-]*")
_ACCESS_LISTING = b"access_history"
#: ListConsentHistory's tokens: the same form, bound to another listing.
CONSENT_LISTING = b"consent_history"
#: ListDisclosures' tokens.
DISCLOSURE_LISTING = b"disclosures"
_CORRECTION_LISTING = b"corrections"
_MIN_MICROS, _MAX_MICROS = (
    to_micros(datetime.min.replace(tzinfo=UTC)),
    to_micros(datetime.max.replace(tzinfo=UTC)),
)
_MAX_ENTRY_ID = 2**63 - 1


def page_token_data(member_id: str, cursor: bytes, listing: bytes = _ACCESS_LISTING) -> bytes:
    return (
        b"pv.page-token"
        + struct.pack(">H", len(member_id))
        + member_id.encode()
        + struct.pack(">H", len(listing))
        + listing
        + cursor
    )


def encode_page_token(key: _hazmat.MacKey, member_id: str, row: AccessEntryRow) -> str:
    return encode_cursor(key, member_id, row.at, row.entry_id)


def encode_cursor(
    key: _hazmat.MacKey,
    member_id: str,
    at: datetime,
    row_id: int,
    listing: bytes = _ACCESS_LISTING,
) -> str:
    """A token for the page after the row (``at``, ``row_id``) of ``listing``."""
    cursor = _PAGE_CURSOR.pack(_PAGE_TOKEN_VERSION, to_micros(at), row_id)
    return _tagged(key, member_id, cursor, listing)


def encode_correction_token(
    key: _hazmat.MacKey, member_id: str, at: datetime, correction_id: str
) -> str:
    """A ListCorrections token for the page after the correction (``at``, its id)."""
    cursor = _UUID_CURSOR.pack(_PAGE_TOKEN_VERSION, to_micros(at), uuid.UUID(correction_id).bytes)
    return _tagged(key, member_id, cursor, _CORRECTION_LISTING)


def _tagged(key: _hazmat.MacKey, member_id: str, cursor: bytes, listing: bytes) -> str:
    tag = _hazmat.token_tag(key, page_token_data(member_id, cursor, listing))
    return base64.urlsafe_b64encode(cursor + tag).decode().rstrip("=")


def _opened(
    key: _hazmat.MacKey, member_id: str, token: str, listing: bytes, cursor_size: int
) -> bytes | None:
    """The cursor bytes of a token issued for ``member_id``'s ``listing``, or None.
    The length and alphabet are checked before decoding, then that the text is the
    one encoding of its bytes (no altered padding bits), and the tag (in constant
    time) before the cursor is returned."""
    size = cursor_size + _hazmat.TOKEN_TAG_SIZE
    if len(token) != -(-size * 4 // 3) or not _TOKEN_ALPHABET.fullmatch(token):
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (ValueError, binascii.Error):
        return None
    if len(raw) != size or base64.urlsafe_b64encode(raw).decode().rstrip("=") != token:
        return None
    cursor, tag = raw[:cursor_size], raw[cursor_size:]
    if not _hazmat.token_tag_matches(key, page_token_data(member_id, cursor, listing), tag):
        return None
    return cursor


def decode_page_token(
    key: _hazmat.MacKey, member_id: str, token: str, listing: bytes = _ACCESS_LISTING
) -> tuple[datetime, int] | None:
    """The (at, entry_id) cursor of a token issued for ``member_id``'s history, or
    None for anything else; the cursor's values are range-checked after the tag."""
    cursor = _opened(key, member_id, token, listing, _PAGE_CURSOR.size)
    if cursor is None:
        return None
    version, micros, entry_id = _PAGE_CURSOR.unpack(cursor)
    if version != _PAGE_TOKEN_VERSION or not 0 < entry_id <= _MAX_ENTRY_ID:
        return None
    if not _MIN_MICROS <= micros <= _MAX_MICROS:
        return None
    return from_micros(micros), entry_id


def decode_correction_token(
    key: _hazmat.MacKey, member_id: str, token: str
) -> tuple[datetime, str] | None:
    """The (requested_at, correction_id) cursor of a ListCorrections token issued
    for ``member_id``, or None for anything else."""
    cursor = _opened(key, member_id, token, _CORRECTION_LISTING, _UUID_CURSOR.size)
    if cursor is None:
        return None
    version, micros, correction_id = _UUID_CURSOR.unpack(cursor)
    if version != _PAGE_TOKEN_VERSION or not _MIN_MICROS <= micros <= _MAX_MICROS:
        return None
    return from_micros(micros), str(uuid.UUID(bytes=correction_id))


def checked_page(
    page_size: int,
    page_token: str,
    open_token: Callable[[str], Cursor | None] | None,
    rpc: str,
    v: Violations,
) -> tuple[int, Cursor | None]:
    """A list request's page: the number of rows to answer (0 means
    DEFAULT_PAGE_SIZE, more than MAX_PAGE_SIZE is cut to it) and the cursor
    ``page_token`` opens to (None for the first page).

    ``open_token`` opens a token of this listing issued for the member, or answers
    None; it is None itself when the member id was not valid (then no token is).
    A negative size and a token that does not open are field violations in ``v``,
    which the caller raises before the size or cursor is used."""
    if page_size < 0:
        v.add("page_size", "must not be negative")
    cursor = None
    if page_token:
        # Checked before anything reaches the database: only a token this vault
        # issued for this member's listing opens to a cursor.
        cursor = None if open_token is None else open_token(page_token)
        if cursor is None:
            v.add("page_token", f"is not a token {rpc} returned for this member")
    return min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE), cursor
