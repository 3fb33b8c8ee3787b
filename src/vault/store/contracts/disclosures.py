"""Third-party provision: the recipients registry and the members' disclosure ledgers."""

from __future__ import annotations

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

    async def append_correction_notice(
        self, member_id: str, entry: NewDisclosure, notice: OutboxMessage, *, dek_id: int
    ) -> int | None:
        """A correction notice (policy section 7): its ledger entry, recorded with
        ``notice.message_id``, and the notice in the outbox, in one transaction.
        None, with nothing written, when the member is gone or a notice of that id
        was recorded before (a retry sends nothing twice); KeyChanged as above."""
        ...

    async def list_disclosures(
        self, member_id: str, limit: int, before_id: int | None = None
    ) -> list[DisclosureRow]:
        """The member's ledger, newest first, older than the cursor when given."""
        ...
