"""DisclosureStore contract tests, on both backends: the recipients registry, the
ledger's appends (under the member's key and current consent), its pages, and
its end with the member."""

from __future__ import annotations

import uuid
from dataclasses import replace

import pytest
from store_support import CONSENTS, T0, message, new_member, ts

from vault.errors import AlreadyExists, CorrectionPending, KeyChanged
from vault.store.base import (
    ENCRYPTED_FIELDS,
    CorrectionRow,
    NewConsent,
    NewDisclosure,
    RecipientRow,
    RetentionCheck,
    Store,
)

ACME = RecipientRow(
    "acme",
    "ACME Delivery Ltd",
    "privacy@acme.example",
    ("INQUIRY",),
    ("mobile_phone", "name"),
    "the member's consent (section 4)",
    "contract 2026-01",
    T0,
    "officer",
)


def disclosure(n: int = 0, basis: str = "consent") -> NewDisclosure:
    sealed = f"sealed-{n}".encode()
    return NewDisclosure("acme", "INQUIRY", ("name",), basis, ts(n), sealed, str(uuid.uuid4()))  # type: ignore[arg-type]


async def test_a_recipient_is_registered_once(vault: Store) -> None:
    assert await vault.get_recipient("acme") is None
    await vault.register_recipient(ACME)
    assert await vault.get_recipient("acme") == ACME
    with pytest.raises(AlreadyExists) as taken:
        await vault.register_recipient(replace(ACME, legal_entity="Other"))
    assert taken.value.field == "recipient_id"
    other = replace(ACME, recipient_id="beta", purposes=("INQUIRY", "STATISTICS"))
    await vault.register_recipient(other)
    assert await vault.list_recipients() == [ACME, other]


async def test_the_ledger_appends_and_pages_newest_first(vault: Store) -> None:
    await vault.register_recipient(ACME)
    member = new_member()
    await vault.insert_member(member)
    ids = [
        await vault.append_disclosure(member.member_id, disclosure(i), dek_id=1) for i in range(3)
    ]
    assert all(i is not None for i in ids)
    rows = await vault.list_disclosures(member.member_id, 10)
    assert [r.disclosure_id for r in rows] == ids[::-1]
    newest = rows[0]
    assert (newest.recipient_id, newest.purpose, newest.fields, newest.basis) == (
        "acme",
        "INQUIRY",
        ("name",),
        "consent",
    )
    assert newest.at == ts(2)
    assert newest.details_ct == b"sealed-2"
    assert [r.disclosure_id for r in await vault.list_disclosures(member.member_id, 2, ids[2])] == [
        ids[1],
        ids[0],
    ]


async def test_an_append_needs_the_member_their_key_and_their_consent(vault: Store) -> None:
    await vault.register_recipient(ACME)
    member = new_member()
    await vault.insert_member(member)
    mid = member.member_id
    with pytest.raises(KeyChanged):  # sealed under a DEK that is not the member's now
        await vault.append_disclosure(mid, disclosure(), dek_id=2)
    # No answer recorded, then a refusal: nothing written; then a grant: written.
    assert await vault.append_disclosure(mid, disclosure(), dek_id=1, consent_purpose="P") is None
    await vault.record_consents(
        mid, [NewConsent("P", False)], ts(1), recorded_by="member", caller="", default_version="1"
    )
    assert await vault.append_disclosure(mid, disclosure(), dek_id=1, consent_purpose="P") is None
    await vault.record_consents(
        mid, [NewConsent("P", True)], ts(2), recorded_by="member", caller="", default_version="1"
    )
    assert await vault.append_disclosure(mid, disclosure(), dek_id=1, consent_purpose="P")
    assert len(await vault.list_disclosures(mid, 10)) == 1
    gone = new_member().member_id
    assert await vault.append_disclosure(gone, disclosure(), dek_id=1) is None


async def test_a_shred_destroys_the_ledger_and_counts_it(vault: Store) -> None:
    await vault.register_recipient(ACME)
    member, other = replace(new_member(), consents=tuple(CONSENTS)), new_member()
    for m in (member, other):
        await vault.insert_member(m)
        await vault.append_disclosure(m.member_id, disclosure(), dek_id=1)
    record = await vault.shred_member(member.member_id, ts(100), "withdrawal")
    assert record is not None
    assert record.items["disclosure_ledger"] == 1
    assert await vault.list_disclosures(member.member_id, 10) == []
    assert len(await vault.list_disclosures(other.member_id, 10)) == 1  # only theirs
    assert await vault.get_recipient("acme") == ACME  # the registry holds no member


async def test_a_withdrawal_shred_refuses_a_ledger_changed_since_the_copy(vault: Store) -> None:
    await vault.register_recipient(ACME)
    member = new_member()
    await vault.insert_member(member)
    first = await vault.append_disclosure(member.member_id, disclosure(), dek_id=1)
    assert first is not None
    check = RetentionCheck(
        dek_id=1,
        ciphertexts={f: member.ciphertexts[f] for f in ENCRYPTED_FIELDS},
        access_entry_ids=frozenset(),
        kek_version=1,
        retained_until=ts(1000),
        disclosure_ids=frozenset({first}),
    )
    # A disclosure after the copy was read: the copy is stale, nothing is shredded.
    await vault.append_disclosure(member.member_id, disclosure(1), dek_id=1)
    with pytest.raises(KeyChanged):
        await vault.shred_member(member.member_id, ts(5), "withdrawal", retention=check)
    assert len(await vault.list_disclosures(member.member_id, 10)) == 2
    rows = await vault.list_disclosures(member.member_id, 10)
    fresh = replace(check, disclosure_ids=frozenset(r.disclosure_id for r in rows))
    assert await vault.shred_member(member.member_id, ts(5), "withdrawal", retention=fresh)
    assert await vault.list_disclosures(member.member_id, 10) == []


async def test_an_applied_correction_owes_notices_until_one_transaction_settles_it(
    vault: Store,
) -> None:
    await vault.register_recipient(ACME)
    member, quiet = new_member(), new_member()
    for m in (member, quiet):
        await vault.insert_member(m)
        pending = CorrectionRow(
            f"c-{m.member_id}", m.member_id, ts(1), "member", {"name": "pending"}
        )
        assert await vault.insert_correction(pending, dek_id=1)
    mid = member.member_id
    await vault.append_disclosure(mid, replace(disclosure(0), fields=("mobile_phone",)), dek_id=1)
    assert await vault.corrections_owing_notices(10) == []  # nothing applied yet
    for m in (member, quiet):
        # The update's own transaction applies the correction and, for a member with
        # ledger entries, records that its notices are owed.
        assert await vault.update_member(
            m.member_id, {"name": b"x"}, dek_id=1, corrected_at=ts(2), corrected_by="member"
        )
    cid = f"c-{mid}"
    # Only the member whose ledger has entries owes notices.
    assert await vault.corrections_owing_notices(10) == [(mid, cid)]
    notice = message(mid, ts(3), kind="correction_notice")
    entry = disclosure(3, basis="correction")
    with pytest.raises(KeyChanged):  # sealed under a DEK that is not the member's now
        await vault.queue_correction_notices(mid, cid, [(entry, notice)], dek_id=2)
    assert await vault.queue_correction_notices(mid, cid, [(entry, notice)], dek_id=1)
    assert (mid, cid) not in await vault.corrections_owing_notices(10)
    # A retry (or a second sidecar) finds it settled: nothing written, nothing queued.
    again = message(mid, ts(4), kind="correction_notice")
    assert not await vault.queue_correction_notices(
        mid, cid, [(disclosure(4, basis="correction"), again)], dek_id=1
    )
    rows = await vault.list_disclosures(mid, 10)
    assert [r.basis for r in rows] == ["correction", "consent"]
    queued = await vault.due_outbox(ts(10), 10)
    assert [m.message_id for m in queued] == [notice.message_id]
    gone = new_member().member_id
    assert not await vault.queue_correction_notices(gone, cid, [], dek_id=1)


async def test_a_shred_takes_the_notices_owed_along(vault: Store) -> None:
    await vault.register_recipient(ACME)
    member = new_member()
    await vault.insert_member(member)
    mid = member.member_id
    await vault.append_disclosure(mid, disclosure(0), dek_id=1)
    await vault.insert_correction(
        CorrectionRow("c-1", mid, ts(1), "member", {"mobile_phone": "pending"}), dek_id=1
    )
    await vault.update_member(
        mid, {"mobile_phone": b"x"}, dek_id=1, corrected_at=ts(2), corrected_by="member"
    )
    assert await vault.corrections_owing_notices(10) == [(mid, "c-1")]
    assert await vault.shred_member(mid, ts(3), "withdrawal")
    assert await vault.corrections_owing_notices(10) == []


async def test_an_append_refuses_fields_under_a_pending_correction(vault: Store) -> None:
    await vault.register_recipient(ACME)
    member = new_member()
    await vault.insert_member(member)
    mid = member.member_id
    pending = CorrectionRow("c-1", mid, ts(1), "member", {"name": "pending"})
    assert await vault.insert_correction(pending, dek_id=1)
    with pytest.raises(CorrectionPending) as frozen:  # seen in the write's own transaction
        await vault.append_disclosure(mid, disclosure(2), dek_id=1)
    assert frozen.value.fields == ("name",)
    other = replace(disclosure(2), fields=("mobile_phone",))
    assert await vault.append_disclosure(mid, other, dek_id=1)
    assert [r.fields for r in await vault.list_disclosures(mid, 10)] == [("mobile_phone",)]
