"""KEK versions, the blind-index key, re-wrapping, member-key rotation, key events."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Protocol

from vault.store.rows import (
    IndexKeyRow,
    KekUsage,
    KekVersionRow,
    KeyEvent,
    MemberKeyRow,
    ResealedAccess,
    ResealedCorrection,
    RewrapUpdate,
)


class KeyStore(Protocol):
    """The key hierarchy's rows: KEK versions, the index key, wrapped DEKs, key events."""

    async def list_kek_versions(self) -> list[KekVersionRow]:
        """Every KEK version, oldest first."""
        ...

    async def insert_kek_version(self, row: KekVersionRow) -> bool:
        """Add a version; False if that version number exists already."""
        ...

    async def get_index_key(self) -> IndexKeyRow | None: ...

    async def insert_index_key(self, row: IndexKeyRow) -> IndexKeyRow:
        """Store the index key unless one exists; return the one that is stored.

        Two processes bootstrapping at once both get the same key back.
        """
        ...

    async def rotate_kek(self, version: int, at: datetime) -> KekVersionRow:
        """In one transaction, demote the active version to decrypt_only and add
        ``version`` as the active one. PreconditionFailed if ``version`` exists."""
        ...

    async def destroy_kek_version(self, version: int, at: datetime) -> KekVersionRow:
        """Mark a version destroyed, guarded in the same transaction: NotFound if it
        does not exist; PreconditionFailed (saying why) if it is active or any member
        DEK or index key is still wrapped under it. Idempotent for a destroyed one."""
        ...

    async def kek_usage(self) -> list[KekUsage]:
        """Per version (every version, oldest first), the keys wrapped under it."""
        ...

    async def member_keys_to_rewrap(
        self, target_version: int, after_member_id: str | None, limit: int
    ) -> list[MemberKeyRow]:
        """Up to ``limit`` member keys not under ``target_version``, by member id,
        strictly after ``after_member_id`` when given (a resumable scan)."""
        ...

    async def apply_rewrap(self, updates: Sequence[RewrapUpdate]) -> int:
        """Store re-wrapped DEKs in one transaction, each only if the row still has
        the same dek_id and from_version (else it is skipped: someone else moved
        it). Returns how many rows were updated."""
        ...

    async def rewrap_index_key(
        self, key_id: int, from_version: int, to_version: int, wrapped_key: bytes
    ) -> bool:
        """Conditional like apply_rewrap; False if the key had already moved."""
        ...

    async def replace_member_key(
        self,
        member_id: str,
        old_dek_id: int,
        new_key: MemberKeyRow,
        ciphertexts: Mapping[str, bytes],
        access_log: Mapping[int, ResealedAccess],
        *,
        old_ciphertexts: Mapping[str, bytes],
        corrections: Mapping[str, ResealedCorrection] | None = None,
        old_corrections: Mapping[str, ResealedCorrection] | None = None,
        disclosures: Mapping[int, bytes] | None = None,
    ) -> bool:
        """Per-member DEK rotation, atomically: the new key row, every field
        ciphertext, and every access-log entry (entry_id -> (action_ct, ip_ct, caller_ct))
        re-encrypted. Only if the member still has ``old_dek_id``, exactly these
        access-log entries, and field ciphertexts equal to ``old_ciphertexts`` (what
        the caller re-encrypted: a field written meanwhile under the old DEK must not
        be overwritten by its stale value); False otherwise (retry with fresh data).
        The member's corrections' sealed texts (correction_id -> (note_ct,
        reason_ct)) are re-sealed too: ``old_corrections`` must be exactly those
        the member holds now (none: the member must have none), ``corrections``
        their replacements. So is every disclosure ledger entry (disclosure_id ->
        details_ct): exactly the member's entries (none when ``disclosures`` is None)."""
        ...

    async def record_key_event(self, event: KeyEvent) -> None: ...

    async def list_key_events(self, limit: int = 100) -> list[KeyEvent]:
        """Newest first."""
        ...
