"""Contract tests for CorrectionStore and StatisticsStore, on both backends."""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import date

import pytest
from store_support import T0, entry, new_member, ts

from vault.errors import KeyChanged
from vault.store import ConsentRow, Store
from vault.store.base import CorrectionRow, MemberKeyRow, PolicyVersionRow, RetentionCheck


def correction(
    member_id: str, *fields: str, at: int = 1, note: bytes | None = b"n"
) -> CorrectionRow:
    return CorrectionRow(
        correction_id=str(uuid.uuid4()),
        member_id=member_id,
        requested_at=ts(at),
        requested_by="member",
        fields=dict.fromkeys(fields, "pending"),
        note_ct=note,
    )


async def test_a_pending_correction_freezes_its_fields_in_the_member_read(vault: Store) -> None:
    member = new_member()
    await vault.insert_member(member)
    assert (await vault.get_member(member.member_id)) == member  # nothing frozen
    first = correction(member.member_id, "email", "name")
    second = correction(member.member_id, "email", at=2, note=None)
    assert await vault.insert_correction(first, dek_id=1)
    assert await vault.insert_correction(second, dek_id=1)

    read = await vault.get_member(member.member_id)
    assert read is not None
    assert read.frozen == {"email", "name"}
    found = await vault.find_member("login_id", member.blind_indexes["login_id"])
    assert found is not None
    assert found.frozen == {"email", "name"}
    assert await vault.list_corrections(member.member_id) == [first, second]

    # An update of the e-mail releases it in both corrections; name stays frozen.
    assert await vault.update_member(
        member.member_id, {"email": b"new"}, dek_id=1, corrected_at=ts(5), corrected_by="member"
    )
    read = await vault.get_member(member.member_id)
    assert read is not None
    assert read.frozen == {"name"}
    listed = await vault.list_corrections(member.member_id)
    assert listed[0].state == "pending"
    assert dict(listed[0].fields) == {"name": "pending", "email": "corrected"}
    assert listed[1].state == "applied"
    assert listed[1].resolved_at == ts(5)
    assert listed[1].resolved_by == "member"


async def test_pages_follow_the_listing_order_without_gaps_or_repeats(vault: Store) -> None:
    member = new_member()
    other = new_member()
    await vault.insert_member(member)
    await vault.insert_member(other)
    # Inserted out of order; three share an instant (ordered by id among them).
    requested: list[tuple[int, list[str]]] = [
        (5, ["name"]),
        (1, ["email"]),
        (3, ["name", "email"]),
        (3, ["mobile_phone"]),
        (3, ["name"]),
        (2, ["email", "mobile_phone"]),
    ]
    made = [correction(member.member_id, *fields, at=at) for at, fields in requested]
    for c in made:
        assert await vault.insert_correction(c, dek_id=1)
    assert await vault.insert_correction(correction(other.member_id, "name", at=1), dek_id=1)
    # A released field and a closed one come with their page.
    assert await vault.update_member(
        member.member_id, {"email": b"x"}, dek_id=1, corrected_at=ts(6), corrected_by="member"
    )
    assert await vault.close_correction(
        member.member_id, made[3].correction_id, ts(7), "member", b"why", dek_id=1
    )
    whole = await vault.list_corrections(member.member_id)
    assert [(c.requested_at, c.correction_id) for c in whole] == sorted(
        (c.requested_at, c.correction_id) for c in made
    )
    for limit in (1, 2, 4, 6, 100):
        paged: list[CorrectionRow] = []
        after = None
        while True:
            page = await vault.list_corrections_page(member.member_id, limit, after)
            assert len(page) <= limit
            paged += page
            if len(page) < limit:
                break
            after = (page[-1].requested_at, page[-1].correction_id)
        assert paged == whole, limit
    last = whole[-1]
    assert (
        await vault.list_corrections_page(
            member.member_id, 10, (last.requested_at, last.correction_id)
        )
        == []
    )
    assert await vault.list_corrections_page(member.member_id, 0) == []
    assert await vault.list_corrections_page(str(uuid.uuid4()), 10) == []
    with pytest.raises(ValueError):
        await vault.list_corrections_page(member.member_id, -1)


async def test_an_update_that_is_no_correction_releases_nothing(vault: Store) -> None:
    member = new_member()
    await vault.insert_member(member)
    assert await vault.insert_correction(correction(member.member_id, "name"), dek_id=1)
    assert await vault.update_member(member.member_id, {"name": b"x"}, dek_id=1)
    read = await vault.get_member(member.member_id)
    assert read is not None
    assert read.frozen == {"name"}


async def test_closing_releases_the_pending_fields_with_a_reason(vault: Store) -> None:
    member = new_member()
    await vault.insert_member(member)
    pending = correction(member.member_id, "name", "mobile_phone")
    assert await vault.insert_correction(pending, dek_id=1)
    assert await vault.update_member(
        member.member_id, {"name": b"x"}, dek_id=1, corrected_at=ts(2), corrected_by="member"
    )
    result = await vault.close_correction(
        member.member_id, pending.correction_id, ts(3), "spiffe://x/y", b"why", dek_id=1
    )
    assert result is not None
    closed, now_closed = result
    assert now_closed
    assert closed.state == "closed"
    assert dict(closed.fields) == {"name": "corrected", "mobile_phone": "closed"}
    assert (closed.resolved_at, closed.resolved_by, closed.reason_ct) == (
        ts(3),
        "spiffe://x/y",
        b"why",
    )
    read = await vault.get_member(member.member_id)
    assert read is not None
    assert read.frozen == frozenset()
    # Closing again changes nothing; an unknown id or another member's is None.
    again = await vault.close_correction(
        member.member_id, pending.correction_id, ts(4), "member", b"other", dek_id=1
    )
    assert again == (closed, False)
    assert (
        await vault.close_correction(
            member.member_id, str(uuid.uuid4()), ts(4), "member", b"r", dek_id=1
        )
        is None
    )
    other = new_member()
    await vault.insert_member(other)
    assert (
        await vault.close_correction(
            other.member_id, pending.correction_id, ts(4), "member", b"r", dek_id=1
        )
        is None
    )


async def test_a_rotated_key_refuses_sealed_writes(vault: Store) -> None:
    member = new_member()
    await vault.insert_member(member)
    with pytest.raises(KeyChanged):
        await vault.insert_correction(correction(member.member_id, "name"), dek_id=2)
    pending = correction(member.member_id, "name")
    assert await vault.insert_correction(pending, dek_id=1)
    with pytest.raises(KeyChanged):
        await vault.close_correction(
            member.member_id, pending.correction_id, ts(2), "member", b"r", dek_id=2
        )
    assert await vault.insert_correction(correction(str(uuid.uuid4()), "name"), dek_id=1) is False


async def test_a_key_rotation_reseals_the_texts_it_was_given(vault: Store) -> None:
    member = new_member()
    await vault.insert_member(member)
    pending = correction(member.member_id, "email", note=b"old-note")
    assert await vault.insert_correction(pending, dek_id=1)
    new_key = MemberKeyRow(member.member_id, 2, 1, b"wrapped-2")
    cts = dict(member.ciphertexts)
    cid = pending.correction_id
    # Not told of the note: refused, nothing changed.
    assert not await vault.replace_member_key(
        member.member_id, 1, new_key, cts, {}, old_ciphertexts=member.ciphertexts
    )
    assert await vault.replace_member_key(
        member.member_id,
        1,
        new_key,
        cts,
        {},
        old_ciphertexts=member.ciphertexts,
        corrections={cid: (b"new-note", None)},
        old_corrections={cid: (b"old-note", None)},
    )
    (listed,) = await vault.list_corrections(member.member_id)
    assert listed.note_ct == b"new-note"


async def test_a_shred_destroys_the_corrections(vault: Store) -> None:
    member = new_member()
    await vault.insert_member(member)
    assert await vault.insert_correction(correction(member.member_id, "name"), dek_id=1)
    record = await vault.shred_member(member.member_id, ts(9), "withdrawal")
    assert record is not None
    assert record.items["corrections"] == 1
    assert await vault.list_corrections(member.member_id) == []


def consents(statistics: bool, inquiry: bool = False) -> tuple[ConsentRow, ...]:
    return tuple(
        ConsentRow(p, g, "1", T0)
        for p, g in sorted(
            {
                "IDENTIFICATION": True,
                "ACCOUNT_RECOVERY": True,
                "INQUIRY": inquiry,
                "STATISTICS": statistics,
            }.items()
        )
    )


async def test_statistics_count_only_consenting_members(vault: Store) -> None:
    day = T0.date()
    counted = [replace(new_member(), consents=consents(True, inquiry=i < 2)) for i in range(3)]
    others = [replace(new_member(), consents=consents(False)) for _ in range(2)]
    for m in [*counted, *others]:
        await vault.insert_member(m)
    await vault.record_login(counted[0].member_id, entry(ts(3600)), dek_id=1)

    stats = await vault.statistics(ts(3600), ts(60), day, day)
    assert (stats.members, stats.active_members) == (3, 1)
    assert dict(stats.consents) == {
        "ACCOUNT_RECOVERY": 3,
        "IDENTIFICATION": 3,
        "INQUIRY": 2,
        "STATISTICS": 3,
    }
    assert stats.days == ((day.isoformat(), 3, 0),)

    # A withdrawal counts by the consent at that moment; a shred for another
    # reason, or of a member who does not consent, is no withdrawal.
    assert await vault.shred_member(counted[0].member_id, ts(86_400), "withdrawal", withdrawal=True)
    assert await vault.shred_member(counted[1].member_id, ts(86_400), "inactivity")
    assert await vault.shred_member(others[0].member_id, ts(86_400), "withdrawal", withdrawal=True)
    next_day = date.fromordinal(day.toordinal() + 1)
    stats = await vault.statistics(ts(86_400), ts(60), day, next_day)
    assert stats.members == 1
    assert stats.days == ((day.isoformat(), 3, 0), (next_day.isoformat(), 0, 1))
    # The range bounds the days.
    assert (await vault.statistics(ts(86_400), ts(60), next_day, next_day)).days == (
        (next_day.isoformat(), 0, 1),
    )


async def test_statistics_count_only_grants_in_force(vault: Store) -> None:
    """A grant a policy version in force has made outdated is no consent: neither to
    statistics (the member is not counted) nor to a purpose (not in its rate)."""
    day = T0.date()
    members = [replace(new_member(), consents=consents(True, inquiry=True)) for _ in range(2)]
    for m in members:
        await vault.insert_member(m)
    await vault.publish_policy_version(
        PolicyVersionRow("2", ts(100), ts(200), "ab" * 32, ("INQUIRY",), "officer", "local")
    )
    # Published, not yet in force: everything counts.
    before = await vault.statistics(ts(150), ts(0), day, day)
    assert (before.members, before.consents["INQUIRY"]) == (2, 2)
    after = await vault.statistics(ts(250), ts(0), day, day)
    assert after.members == 2
    assert "INQUIRY" not in after.consents
    await vault.publish_policy_version(
        PolicyVersionRow("3", ts(300), ts(300), "ab" * 32, ("STATISTICS",), "officer", "local")
    )
    assert (await vault.statistics(ts(300), ts(0), day, day)).members == 0
    # An outdated member's withdrawal is not a consenting member's withdrawal.
    assert await vault.shred_member(members[0].member_id, ts(400), "withdrawal", withdrawal=True)
    assert (await vault.statistics(ts(400), ts(0), day, day)).days == ((day.isoformat(), 2, 0),)


async def test_a_withdrawal_copy_is_stale_once_a_correction_changed(vault: Store) -> None:
    member = new_member()
    await vault.insert_member(member)
    pending = correction(member.member_id, "name")
    assert await vault.insert_correction(pending, dek_id=1)
    check = RetentionCheck(
        dek_id=1,
        ciphertexts=member.ciphertexts,
        access_entry_ids=frozenset(),
        kek_version=1,
        retained_until=ts(86_400),
        corrections=tuple(await vault.list_corrections(member.member_id)),
    )
    # A correction closed after the copy was read: the shred refuses, nothing changes.
    assert await vault.close_correction(
        member.member_id, pending.correction_id, ts(2), "member", b"r", dek_id=1
    )
    with pytest.raises(KeyChanged):
        await vault.shred_member(member.member_id, ts(3), "withdrawal", retention=check)
    assert await vault.get_member(member.member_id) is not None
    # Read again, the copy matches and the shred goes through.
    fresh = replace(check, corrections=tuple(await vault.list_corrections(member.member_id)))
    record = await vault.shred_member(member.member_id, ts(3), "withdrawal", retention=fresh)
    assert record is not None
    assert record.retained_until == ts(86_400)
