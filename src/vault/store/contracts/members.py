"""Members: sign-up, reads, updates, logins, consents."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Protocol

from vault.store.contracts.idempotency import IdempotencyKey
from vault.store.contracts.sessions import NewSession
from vault.store.rows import (
    ConsentRow,
    IndexedField,
    MemberRow,
    NewAccessEntry,
    OutboxMessage,
)


class MemberStore(Protocol):
    """Members with their key and consents (ciphertexts and blind indexes only)."""

    async def insert_member(
        self, member: MemberRow, idempotency: IdempotencyKey | None = None, *, caller: str = ""
    ) -> None:
        """Insert the member, its key and its consents in one transaction, the
        consents also as the member's first consent events (recorded by the member,
        through ``caller``, under the newest published policy version, else the
        consents' own) (with ``idempotency``, the key too: see IdempotencyStore); a
        member who consents to STATISTICS counts as a sign-up of its day (UTC) in
        StatisticsStore. PreconditionFailed if the key's KEK version has been
        destroyed meanwhile."""
        ...

    async def get_member(self, member_id: str) -> MemberRow | None:
        """The member with its key, consents and the fields pending corrections
        freeze (``frozen``), in one statement: the hot read path."""
        ...

    async def find_member(self, index: IndexedField, hmac: bytes) -> MemberRow | None:
        """Look a member up by blind index."""
        ...

    async def update_member(
        self,
        member_id: str,
        ciphertexts: Mapping[str, bytes],
        blind_indexes: Mapping[str, bytes] | None = None,
        *,
        dek_id: int,
        notify: OutboxMessage | None = None,
        corrected_at: datetime | None = None,
        corrected_by: str = "",
    ) -> bool:
        """Replace the named ciphertexts (and blind indexes), encrypted under the
        member's DEK ``dek_id``. False if no such member; KeyChanged if the member's
        DEK has been rotated meanwhile (the ciphertexts would be unreadable).

        ``notify`` (for the same member) is enqueued in the same transaction: it
        is written exactly when the update is, never without it.

        With ``corrected_at``, the update is a correction (policy section 7): in
        the same transaction, the pending correction fields among the named fields
        are released ("corrected"), and each correction left with no pending field
        is applied at ``corrected_at`` by ``corrected_by``."""
        ...

    async def record_login(
        self,
        member_id: str,
        entry: NewAccessEntry,
        password_hash_ct: bytes | None = None,
        *,
        dek_id: int,
        session: NewSession | None = None,
    ) -> bool:
        """Set last_seen_at to ``entry.at``, append ``entry`` to the access log and,
        when given, replace the password hash (a rehash) and store ``session`` (the
        same member's; pruned and purged as SessionStore.create_session does). One
        transaction; False if no such member; KeyChanged as for update_member.
        When it writes nothing (False, KeyChanged, an error), no session is
        stored either."""
        ...

    async def list_consents(self, member_id: str) -> list[ConsentRow]:
        """The member's consents, one per purpose, in purpose order."""
        ...
