"""The InactivityStore contract: inactivity notices and expiry. Every test that uses the
``store`` or ``store_url`` fixture runs once on SQLite and once on PostgreSQL."""

from __future__ import annotations

from store_support import (
    DAY,
    T0,
    entry,
    member_seen_at,
    message,
)

from vault.store import (
    Store,
)


async def test_members_due_for_notice_oldest_first_and_limited(vault: Store) -> None:
    old = await member_seen_at(vault, T0)
    older = await member_seen_at(vault, T0 - DAY)
    await member_seen_at(vault, T0 + 10 * DAY)  # not inactive long enough

    due = await vault.members_due_for_notice(T0 + DAY, 10)
    assert due == [(older.member_id, older.last_seen_at), (old.member_id, old.last_seen_at)]
    assert await vault.members_due_for_notice(T0 + DAY, 1) == due[:1]
    # Strictly before the cutoff.
    assert await vault.members_due_for_notice(T0 - DAY, 10) == []


async def test_record_inactivity_notice_marks_and_enqueues_once(vault: Store) -> None:
    member = await member_seen_at(vault, T0)
    at = T0 + 335 * DAY
    first = message(member.member_id, at)
    assert await vault.record_inactivity_notice(member.member_id, T0, first) is True
    # A second notice (another sidecar, a rerun) is refused: one pending notice only.
    assert (
        await vault.record_inactivity_notice(member.member_id, T0, message(member.member_id, at))
        is False
    )

    assert await vault.members_due_for_notice(at, 10) == []
    queued = await vault.due_outbox(at, 10)
    assert [m.message_id for m in queued] == [first.message_id]
    assert queued[0].params == first.params
    assert queued[0].next_attempt_at == at
    assert queued[0].attempts == 0


async def test_notice_is_refused_after_a_login(vault: Store) -> None:
    member = await member_seen_at(vault, T0)
    assert await vault.record_login(member.member_id, entry(T0 + DAY), dek_id=1)
    msg = message(member.member_id, T0 + 335 * DAY)
    # The caller read last_seen_at before the login: stale, so nothing is written.
    assert await vault.record_inactivity_notice(member.member_id, T0, msg) is False
    assert await vault.due_outbox(T0 + 400 * DAY, 10) == []


async def test_login_clears_the_notice_and_expiry(vault: Store) -> None:
    member = await member_seen_at(vault, T0)
    noticed = T0 + 335 * DAY
    assert await vault.record_inactivity_notice(
        member.member_id, T0, message(member.member_id, noticed)
    )
    later = T0 + 400 * DAY
    assert await vault.members_due_for_expiry(later, later, 10) == [member.member_id]

    assert await vault.record_login(member.member_id, entry(T0 + 340 * DAY), dek_id=1)
    assert await vault.members_due_for_expiry(later, later, 10) == []
    # Inactivity starts over from the login: due for a new notice later.
    assert await vault.members_due_for_notice(later + 400 * DAY, 10) == [
        (member.member_id, T0 + 340 * DAY)
    ]


async def test_members_due_for_expiry_needs_both_conditions(vault: Store) -> None:
    a = await member_seen_at(vault, T0)
    b = await member_seen_at(vault, T0 + DAY)
    c = await member_seen_at(vault, T0 - DAY)  # no notice: never expires
    assert await vault.record_inactivity_notice(
        a.member_id, T0, message(a.member_id, T0 + 10 * DAY)
    )
    assert await vault.record_inactivity_notice(
        b.member_id, T0 + DAY, message(b.member_id, T0 + 20 * DAY)
    )
    far = T0 + 1000 * DAY
    assert await vault.members_due_for_expiry(far, far, 10) == [a.member_id, b.member_id]
    assert await vault.members_due_for_expiry(far, far, 1) == [a.member_id]
    # Noticed too recently.
    assert await vault.members_due_for_expiry(far, T0 + 15 * DAY, 10) == [a.member_id]
    # Seen too recently.
    assert await vault.members_due_for_expiry(T0 + DAY, far, 10) == [a.member_id]
    assert c.member_id not in await vault.members_due_for_expiry(far, far, 10)
