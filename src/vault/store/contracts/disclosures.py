"""Third-party provision: the recipients registry and the members' disclosure ledgers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from vault.store.rows import DisclosureRow, NewDisclosure, OutboxMessage, RecipientRow


class DisclosureStore(Protocol):
    """Recipients are registered once and never changed (a consent to provision
    names the recipient as registered). A member's ledger is append-only and goes
    only with the member (a shred, or the withdrawal's move into retention)."""

    async def register_recipient(self, recipient: RecipientRow) -> None:
        """AlreadyExists("recipient_id") if the id is taken."""
        ...

    async def get_recipient(self, recipient_id: str) -> RecipientRow | None: ...

    async def list_recipients(self) -> list[RecipientRow]:
        """Every registered recipient, by id."""
        ...

    async def append_disclosure(
        self,
        member_id: str,
        entry: NewDisclosure,
        *,
        dek_id: int,
        consent_purpose: str | None = None,
    ) -> int | None:
        """Append one ledger entry in one transaction and return its id, if the
        member exists, ``entry.details_ct`` was sealed under their current DEK
        (``dek_id``; KeyChanged otherwise), no field of it is under a pending
        correction (CorrectionPending otherwise) and, with ``consent_purpose``, the
        member's current answer to it is a grant (all read in the same transaction,
        under the member's row, so a withdrawal or a correction request committed
        before is seen). None, with nothing written, when the member is gone or the
        answer is not a grant."""
        ...

    async def corrections_owing_notices(self, limit: int) -> list[tuple[str, str]]:
        """Up to ``limit`` applied corrections that owe their recipients notices
        (policy section 7: marked in UpdateMember's transaction), as (member id,
        correction id), oldest applied first."""
        ...

    async def queue_correction_notices(
        self,
        member_id: str,
        correction_id: str,
        notices: Sequence[tuple[NewDisclosure, OutboxMessage]],
        *,
        dek_id: int,
    ) -> bool:
        """Settle what the correction owes, in one transaction: each notice's ledger
        entry (recorded with its message id, unique) and outbox row, and the
        correction's mark cleared. True if this call settled it; False, with nothing
        written, when the member is gone or the correction owes nothing (any more:
        a retry, or another sidecar, sends nothing twice); KeyChanged as above."""
        ...

    async def list_disclosures(
        self, member_id: str, limit: int, before_id: int | None = None
    ) -> list[DisclosureRow]:
        """The member's ledger, newest first, older than the cursor when given."""
        ...
