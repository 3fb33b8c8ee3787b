"""The recipients registry and the disclosure ledgers (see
:class:`vault.store.contracts.disclosures.DisclosureStore`), once for both backends."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from vault.errors import AlreadyExists, CorrectionPending
from vault.store._common import check_limit, require_aware
from vault.store.rows import DisclosureRow, NewDisclosure, OutboxMessage, RecipientRow
from vault.store.sql import guards
from vault.store.sql.dialect import Dialect, both, each
from vault.store.sql.executor import MemberGone, SqlExecutor, Tx, UniqueViolation

_RECIPIENT_COLUMNS = (
    "recipient_id, legal_entity, contact_email, purposes, fields, legal_basis, "
    "contract_reference, registered_at, registered_by"
)
_INSERT_RECIPIENT = both(
    f"INSERT INTO recipients ({_RECIPIENT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
)
_RECIPIENT = both(f"SELECT {_RECIPIENT_COLUMNS} FROM recipients WHERE recipient_id = $1")
_RECIPIENTS = both(f"SELECT {_RECIPIENT_COLUMNS} FROM recipients ORDER BY recipient_id")
#: A ledger entry's columns, in the order :func:`disclosure_row` reads them.
DISCLOSURE_COLUMNS = (
    "disclosure_id, recipient_id, purpose, fields, basis, disclosed_at, details_ct, entry_id"
)
_INSERT = both(
    "INSERT INTO disclosures (member_id, recipient_id, purpose, fields, basis, disclosed_at, "
    "details_ct, entry_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING disclosure_id"
)
_PAGE = both(
    f"SELECT {DISCLOSURE_COLUMNS} FROM disclosures WHERE member_id = $1 AND disclosure_id < $2 "
    "ORDER BY disclosure_id DESC LIMIT $3"
)
_OWING = each(
    lambda d: (
        "SELECT member_id, correction_id FROM corrections WHERE "
        f"{d.flag('notices_due')} ORDER BY resolved_at, correction_id LIMIT $1"
    )
)
# Under the member's row (FOR SHARE): the correction still owes its notices.
_LOCK_OWING = each(
    lambda d: (
        "SELECT 1 FROM corrections WHERE member_id = $1 AND correction_id = $2 AND "
        f"{d.flag('notices_due')}" + "{update}"
    )
)
_SETTLED = both(
    "UPDATE corrections SET notices_due = $3 WHERE member_id = $1 AND correction_id = $2"
)
_INSERT_NOTICE = both(
    "INSERT INTO disclosures (member_id, recipient_id, purpose, fields, basis, disclosed_at, "
    "details_ct, entry_id, notice_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) "
    "RETURNING disclosure_id"
)
_CURRENT_ANSWER = both("SELECT granted FROM consents WHERE member_id = $1 AND purpose = $2")
_PENDING_FIELDS = both(
    "SELECT field FROM correction_fields WHERE member_id = $1 AND state = 'pending'"
)


def _ledger_params(d: Dialect, key: Any, entry: NewDisclosure) -> tuple[Any, ...]:
    return (
        key,
        entry.recipient_id,
        entry.purpose,
        json.dumps(list(entry.fields)),
        entry.basis,
        d.time(require_aware(entry.at)),
        bytes(entry.details_ct),
        d.member_id(entry.entry_id),  # a UUID, as member ids are
    )


async def _member_held(tx: Tx, d: Dialect, key: Any, dek_id: int) -> bool:
    """Step 1 of the lock order, FOR SHARE: a consent change or a correction request
    (FOR NO KEY UPDATE on the same row) or a shred waits for us, or has committed and
    is seen. Then the DEK the entry was sealed under must still be the member's."""
    if await tx.fetchval(guards.MEMBER_EXISTS[d.name], key) is None:
        return False
    await guards.check_dek(tx, d, key, dek_id)
    return True


def _recipient(d: Dialect, row: Sequence[Any]) -> RecipientRow:
    rid, entity, contact, purposes, fields, basis, contract, at, by = row
    return RecipientRow(
        str(rid),
        str(entity),
        str(contact),
        tuple(str(p) for p in json.loads(purposes)),
        tuple(str(f) for f in json.loads(fields)),
        str(basis),
        str(contract),
        d.from_time(at),
        str(by),
    )


def disclosure_row(d: Dialect, row: Sequence[Any]) -> DisclosureRow:
    """An entry read as :data:`DISCLOSURE_COLUMNS`."""
    did, recipient, purpose, fields, basis, at, details, entry_id = row
    return DisclosureRow(
        int(did),
        str(recipient),
        str(purpose),
        tuple(str(f) for f in json.loads(fields)),
        basis,
        d.from_time(at),
        bytes(details),
        str(entry_id),
    )


class SqlDisclosures(SqlExecutor):
    """Registering and reading recipients; appending to and paging a member's ledger."""

    async def register_recipient(self, recipient: RecipientRow) -> None:
        d = self._dialect
        row = (
            recipient.recipient_id,
            recipient.legal_entity,
            recipient.contact_email,
            json.dumps(list(recipient.purposes)),
            json.dumps(list(recipient.fields)),
            recipient.legal_basis,
            recipient.contract_reference,
            d.time(require_aware(recipient.registered_at)),
            recipient.registered_by,
        )

        async def body(tx: Tx) -> None:
            await tx.run(_INSERT_RECIPIENT[d.name], *row)

        try:
            await self._in_transaction(body)
        except UniqueViolation:
            # The id is the one unique constraint (and not personal data).
            raise AlreadyExists("recipient_id", "a recipient") from None

    async def get_recipient(self, recipient_id: str) -> RecipientRow | None:
        d = self._dialect
        rows = await self._fetch(_RECIPIENT[d.name], recipient_id)
        return _recipient(d, rows[0]) if rows else None

    async def list_recipients(self) -> list[RecipientRow]:
        d = self._dialect
        return [_recipient(d, r) for r in await self._fetch(_RECIPIENTS[d.name])]

    async def append_disclosure(
        self,
        member_id: str,
        entry: NewDisclosure,
        *,
        dek_id: int,
        consent_purpose: str | None = None,
    ) -> int | None:
        d = self._dialect
        key = d.member_id(member_id)
        row = _ledger_params(d, key, entry)

        async def body(tx: Tx) -> int | None:
            if not await _member_held(tx, d, key, dek_id):
                return None
            # Section 7: a field under a pending correction is not provided.
            pending = {str(r[0]) for r in await tx.fetch(_PENDING_FIELDS[d.name], key)}
            if held := pending & set(entry.fields):
                raise CorrectionPending(frozenset(held))
            if consent_purpose is not None:
                granted = await tx.fetchval(_CURRENT_ANSWER[d.name], key, consent_purpose)
                if not granted:
                    return None
            return int(await tx.fetchval(_INSERT[d.name], *row))

        try:
            return await self._in_transaction(body)
        except MemberGone:
            return None

    async def corrections_owing_notices(self, limit: int) -> list[tuple[str, str]]:
        d = self._dialect
        rows = await self._fetch(_OWING[d.name], check_limit(limit))
        return [(str(mid), str(cid)) for mid, cid in rows]

    async def queue_correction_notices(
        self,
        member_id: str,
        correction_id: str,
        notices: Sequence[tuple[NewDisclosure, OutboxMessage]],
        *,
        dek_id: int,
    ) -> bool:
        d = self._dialect
        key = d.member_id(member_id)
        rows = [((*_ledger_params(d, key, e), m.message_id), m) for e, m in notices]

        async def body(tx: Tx) -> bool:
            if not await _member_held(tx, d, key, dek_id):
                return False
            if await tx.fetchval(_LOCK_OWING[d.name], key, correction_id) is None:
                return False  # settled meanwhile (another sidecar), or no such correction
            for entry, message in rows:
                await tx.fetchval(_INSERT_NOTICE[d.name], *entry)
                await tx.run(guards.ENQUEUE_OUTBOX[d.name], *guards.outbox_params(d, message))
            await tx.run(_SETTLED[d.name], key, correction_id, False)
            return True

        try:
            return await self._in_transaction(body)
        except MemberGone:
            return False

    async def list_disclosures(
        self, member_id: str, limit: int, before_id: int | None = None
    ) -> list[DisclosureRow]:
        d = self._dialect
        before = 2**63 - 1 if before_id is None else int(before_id)
        rows = await self._fetch(_PAGE[d.name], d.member_id(member_id), before, check_limit(limit))
        return [disclosure_row(d, r) for r in rows]
