"""The OutboxStore contract: the mail outbox. Every test that uses the ``store`` or
``store_url`` fixture runs once on SQLite and once on PostgreSQL."""

from __future__ import annotations

import uuid
from dataclasses import replace

from store_support import (
    T0,
    member_seen_at,
    message,
    ts,
)

from vault.store import (
    Store,
)


async def test_outbox_due_retry_and_sent(vault: Store) -> None:
    member = await member_seen_at(vault, T0)
    first = message(member.member_id, ts(1), "password_changed")
    second = message(member.member_id, ts(2))
    assert await vault.enqueue_outbox(second)
    assert await vault.enqueue_outbox(first)
    # Enqueueing the same message again is harmless.
    assert await vault.enqueue_outbox(first)

    assert await vault.due_outbox(ts(0), 10) == []
    assert await vault.outbox_depth(ts(0)) == (2, 0)
    assert await vault.outbox_depth(ts(1)) == (2, 1)
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
    assert await vault.outbox_depth(ts(10)) == (1, 0)
    await vault.outbox_sent(first.message_id)
    assert await vault.outbox_depth(ts(1000)) == (0, 0)


async def test_enqueue_for_a_missing_member_is_false(vault: Store) -> None:
    assert await vault.enqueue_outbox(message(str(uuid.uuid4()))) is False
    member = await member_seen_at(vault, T0)
    await vault.shred_member(member.member_id, ts(1), "withdrawal")
    assert await vault.enqueue_outbox(message(member.member_id)) is False
    assert await vault.due_outbox(ts(1000), 10) == []
