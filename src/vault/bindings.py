"""What each wrapped key and ciphertext is bound to (its associated data).

One place for these names: a wrapped DEK names its member and DEK id, the index
key its id, an access-log ciphertext its time, a ledger entry's details its id and
time and a correction's texts its id, so
no ciphertext can be moved to another row and still decrypt.
"""

from __future__ import annotations

from datetime import datetime

from vault.clock import to_micros

INDEX_KEY_ID = 1


def index_key_context(key_id: int = INDEX_KEY_ID) -> bytes:
    return f"index-key|{key_id}".encode()


def dek_context(member_id: str, dek_id: int) -> bytes:
    return f"dek|{member_id}|{dek_id}".encode()


def access_field(kind: str, at: datetime) -> str:
    """``kind`` is "action", "ip" or "caller"; the entry's time (to the microsecond) is bound in."""
    return f"access.{kind}@{to_micros(at)}"


def disclosure_field(entry_id: str, at: datetime) -> str:
    """A disclosure ledger entry's sealed details, bound to the entry's own id (a
    UUID made before the insert: two entries of one member in the same microsecond
    cannot trade details) and its time."""
    return f"disclosure.details@{entry_id}@{to_micros(at)}"


def correction_field(kind: str, correction_id: str) -> str:
    """``kind`` is "note" or "reason" (the closing reason) of the correction."""
    return f"correction.{kind}@{correction_id}"
