"""The Store contract for the lifecycle sidecar: leases, inactivity notices, expiry,
access-log purge and the e-mail outbox. Runs on both backends (real databases)."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace
from datetime import datetime, timedelta

import pytest
from test_store_contract import T0, entry, new_member, ts, with_active_kek

from vault.store import MemberRow, Store
from vault.store.base import OutboxMessage

DAY = timedelta(days=1)


@pytest.fixture
async def vault(store: Store) -> Store:
    return await with_active_kek(store)


def message(member_id: str, at: datetime = T0, kind: str = "inactivity_notice") -> OutboxMessage:
    return OutboxMessage(
        message_id=f"{uuid.uuid4()}@privacy-vault",
        member_id=member_id,
        kind=kind,
        params={"destroy_at": (at + 30 * DAY).isoformat()},
        created_at=at,
    )


async def member_seen_at(vault: Store, last_seen_at: datetime) -> MemberRow:
    member = replace(new_member(), last_seen_at=last_seen_at)
    await vault.insert_member(member)
    return member


# --- leases ---------------------------------------------------------------------------


async def test_lease_is_exclusive_until_it_expires(vault: Store) -> None:
    ttl = timedelta(seconds=60)
    assert await vault.acquire_lease("lifecycle", "a", T0, ttl) is True
    assert await vault.acquire_lease("lifecycle", "b", ts(30), ttl) is False
    # The holder renews; the lease moves on from the renewal.
    assert await vault.acquire_lease("lifecycle", "a", ts(50), ttl) is True
    assert await vault.acquire_lease("lifecycle", "b", ts(100), ttl) is False
    # Expired: anyone takes it.
    assert await vault.acquire_lease("lifecycle", "b", ts(110), ttl) is True
    assert await vault.acquire_lease("lifecycle", "a", ts(120), ttl) is False
    # Other names are independent.
    assert await vault.acquire_lease("other", "a", ts(120), ttl) is True


async def test_release_frees_only_the_holders_lease(vault: Store) -> None:
    ttl = timedelta(seconds=60)
    assert await vault.acquire_lease("lifecycle", "a", T0, ttl)
    await vault.release_lease("lifecycle", "b")  # not b's: no effect
    assert await vault.acquire_lease("lifecycle", "b", ts(1), ttl) is False
    await vault.release_lease("lifecycle", "a")
    assert await vault.acquire_lease("lifecycle", "b", ts(2), ttl) is True


async def test_exactly_one_of_concurrent_acquirers_wins(vault: Store) -> None:
    for round_ in range(5):
        name = f"race-{round_}"
        results = await asyncio.gather(
            *(vault.acquire_lease(name, f"h{i}", T0, timedelta(seconds=60)) for i in range(8))
        )
        assert sum(results) == 1
    # And of concurrent takers of an expired lease.
    results = await asyncio.gather(
        *(vault.acquire_lease("race-0", f"x{i}", ts(3600), timedelta(seconds=60)) for i in range(8))
    )
    assert sum(results) == 1


# --- inactivity notices and expiry -------------------------------------------------------


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


# --- access-log purge ---------------------------------------------------------------------


async def test_purge_access_log_in_batches_oldest_first(vault: Store) -> None:
    member = await member_seen_at(vault, T0)
    for n in range(7):
        assert await vault.append_access(member.member_id, entry(ts(n), n), dek_id=1)

    assert await vault.count_access_log_before(ts(5)) == 5
    assert await vault.purge_access_log(ts(5), 2) == 2
    assert await vault.count_access_log_before(ts(5)) == 3
    assert await vault.purge_access_log(ts(5), 2) == 2
    assert await vault.purge_access_log(ts(5), 2) == 1
    assert await vault.purge_access_log(ts(5), 2) == 0
    left = await vault.list_access(member.member_id, 10)
    assert sorted(e.at for e in left) == [ts(5), ts(6)]


# --- outbox -------------------------------------------------------------------------------


async def test_outbox_due_retry_and_sent(vault: Store) -> None:
    member = await member_seen_at(vault, T0)
    first = message(member.member_id, ts(1), "password_changed")
    second = message(member.member_id, ts(2))
    assert await vault.enqueue_outbox(second)
    assert await vault.enqueue_outbox(first)
    # Enqueueing the same message again is harmless.
    assert await vault.enqueue_outbox(first)

    assert await vault.due_outbox(ts(0), 10) == []
    due = await vault.due_outbox(ts(10), 10)
    assert due == [
        replace(first, next_attempt_at=ts(1)),
        replace(second, next_attempt_at=ts(2)),
    ]
    assert await vault.due_outbox(ts(10), 1) == due[:1]

    await vault.outbox_retry(first.message_id, 1, ts(100))
    assert [m.message_id for m in await vault.due_outbox(ts(10), 10)] == [second.message_id]
    retried = await vault.due_outbox(ts(100), 10)
    assert retried[1] == replace(first, attempts=1, next_attempt_at=ts(100))

    await vault.outbox_sent(second.message_id)
    await vault.outbox_sent(second.message_id)  # idempotent
    assert [m.message_id for m in await vault.due_outbox(ts(100), 10)] == [first.message_id]


async def test_enqueue_for_a_missing_member_is_false(vault: Store) -> None:
    assert await vault.enqueue_outbox(message(str(uuid.uuid4()))) is False
    member = await member_seen_at(vault, T0)
    await vault.shred_member(member.member_id, ts(1), "withdrawal")
    assert await vault.enqueue_outbox(message(member.member_id)) is False
    assert await vault.due_outbox(ts(1000), 10) == []


async def test_shred_deletes_and_counts_pending_mail(vault: Store) -> None:
    member = await member_seen_at(vault, T0)
    bystander = await member_seen_at(vault, T0)
    assert await vault.record_inactivity_notice(member.member_id, T0, message(member.member_id))
    assert await vault.enqueue_outbox(message(member.member_id, kind="password_changed"))
    kept = message(bystander.member_id)
    assert await vault.enqueue_outbox(kept)

    record = await vault.shred_member(member.member_id, ts(5), "inactivity")
    assert record is not None
    assert record.items["outbox"] == 2
    assert [m.message_id for m in await vault.due_outbox(ts(1000), 10)] == [kept.message_id]
    (stored,) = await vault.list_destruction_records(member.member_id)
    assert stored.items["outbox"] == 2


async def test_an_expiry_shred_spares_a_member_who_connected_since(vault: Store) -> None:
    member = replace(new_member(), last_seen_at=ts(100))
    await vault.insert_member(member)
    # Decided when the member was last seen at ts(100): a login at ts(500) since.
    assert await vault.record_login(member.member_id, entry(ts(500)), dek_id=1)
    assert (
        await vault.shred_member(member.member_id, ts(600), "inactivity", last_seen_before=ts(200))
        is None
    )
    assert await vault.get_member(member.member_id) is not None
    assert not await vault.is_destroyed(member.member_id)
    record = await vault.shred_member(
        member.member_id, ts(700), "inactivity", last_seen_before=ts(501)
    )
    assert record is not None
    assert record.reason == "inactivity"
