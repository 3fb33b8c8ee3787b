"""The RetentionStore contract: the separated storage's copies, its sweeps' reads,
the destroy guard's count, the 6-month rule and the officer's events. Every test
runs once on SQLite and once on PostgreSQL (a database of its own, as deployed)."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
from store_support import T0, ts

from vault.store import RetentionStore, open_retention_store
from vault.store.base import (
    RETAINED_FIELDS,
    AccessEntryRow,
    CorrectionRow,
    MemberKeyRow,
    RetainedMember,
    RetentionEvent,
)

DAY = 86_400


@pytest.fixture
async def retained(retention_url: str) -> AsyncIterator[RetentionStore]:
    store = await open_retention_store(retention_url)
    try:
        await store.migrate()
        yield store
    finally:
        await store.close()


def copy(
    *, kek_version: int = 1, destroy_after: float = 30 * DAY, entries: int = 0
) -> RetainedMember:
    member_id = str(uuid.uuid4())
    return RetainedMember(
        member_id=member_id,
        retained_at=T0,
        destroy_after=ts(destroy_after),
        reason="tax law: 30 days",
        key=MemberKeyRow(member_id, 1, kek_version, b"wrapped-" + secrets.token_bytes(40)),
        ciphertexts={f: secrets.token_bytes(24) for f in RETAINED_FIELDS},
        access_log=tuple(
            AccessEntryRow(n + 1, ts(n), f"action-{n}".encode(), f"ip-{n}".encode())
            for n in range(entries)
        ),
        attempt="attempt-1",
    )


async def test_a_copy_is_unconfirmed_until_confirmed_then_due_at_its_date(
    retained: RetentionStore,
) -> None:
    member = copy(destroy_after=10 * DAY)
    assert await retained.put_retained(member, stale_before=T0)
    assert await retained.unconfirmed_before(ts(1), 10) == [member.member_id]
    assert await retained.retained_due(ts(20 * DAY), 10) == []  # not confirmed yet
    assert await retained.confirm_retained(member.member_id)
    assert await retained.confirm_retained(str(uuid.uuid4())) is False
    assert await retained.unconfirmed_before(ts(1), 10) == []
    assert await retained.retained_due(ts(10 * DAY - 1), 10) == []
    assert await retained.retained_due(ts(10 * DAY), 10) == [member.member_id]
    got = await retained.get_retained(member.member_id)
    assert got is not None
    assert got.confirmed


async def test_due_copies_come_oldest_first_and_limited(retained: RetentionStore) -> None:
    members = [copy(destroy_after=days * DAY) for days in (3, 1, 2)]
    for member in members:
        assert await retained.put_retained(member, stale_before=T0)
        assert await retained.confirm_retained(member.member_id)
    by_date = [m.member_id for m in sorted(members, key=lambda m: m.destroy_after)]
    assert await retained.retained_due(ts(5 * DAY), 2) == by_date[:2]
    assert await retained.retained_due(ts(5 * DAY), 10) == by_date


async def test_kek_usage_counts_retained_keys_per_version(retained: RetentionStore) -> None:
    for version in (1, 2, 2):
        assert await retained.put_retained(copy(kek_version=version), stale_before=T0)
    usage = {u.version: u.retained_keys for u in await retained.kek_usage()}
    assert usage == {1: 1, 2: 2}


async def test_the_access_log_copies_are_counted_and_purged_by_age(
    retained: RetentionStore,
) -> None:
    assert await retained.put_retained(copy(entries=5), stale_before=T0)
    assert await retained.count_access_log_before(ts(3)) == 3
    assert await retained.purge_access_log(ts(3), 2) == 2
    assert await retained.purge_access_log(ts(3), 2) == 1
    assert await retained.count_access_log_before(ts(3)) == 0
    assert await retained.count_access_log_before(ts(10)) == 2


async def test_events_are_listed_oldest_first_and_per_member(retained: RetentionStore) -> None:
    one, other = str(uuid.uuid4()), str(uuid.uuid4())
    events = [
        RetentionEvent(ts(2), "officer", "disclose", one, "court order 12/34"),
        RetentionEvent(ts(1), "officer", "destroy", other, "request"),
        RetentionEvent(ts(3), "sidecar", "destroy", one, "retention period over"),
    ]
    for event in events:
        await retained.record_event(event)
    assert await retained.list_events() == events  # in the order recorded
    assert await retained.list_events(one.upper()) == [events[0], events[2]]
    assert await retained.list_events(str(uuid.uuid4())) == []


async def test_a_copy_keeps_its_corrections(retained: RetentionStore) -> None:
    member = copy()
    corrections = (
        CorrectionRow(
            correction_id=str(uuid.uuid4()),
            member_id=member.member_id,
            requested_at=ts(1),
            requested_by="spiffe://example.org/ns/support/sa/helpdesk",
            fields={"name": "corrected", "email": "closed"},
            state="closed",
            note_ct=b"sealed-note",
            resolved_at=ts(2),
            resolved_by="member",
            reason_ct=b"sealed-reason",
        ),
        CorrectionRow(str(uuid.uuid4()), member.member_id, ts(3), "member", {"name": "pending"}),
    )
    member = replace(member, corrections=corrections)
    assert await retained.put_retained(member, stale_before=T0)
    found = await retained.get_retained(member.member_id)
    assert found is not None
    assert found.corrections == corrections
