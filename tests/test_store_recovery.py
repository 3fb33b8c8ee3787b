"""The RecoveryStore contract: reset tokens and the recovery-mail quota. Every test that uses
the ``store`` or ``store_url`` fixture runs once on SQLite and once on PostgreSQL."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import uuid
from typing import Any

import pytest
from store_support import (
    T0,
    new_member,
    reset_mail,
    ts,
)

from vault.mail import LOGIN_ID_REMINDER, PASSWORD_RESET
from vault.store import (
    Store,
)
from vault.store.base import NewPasswordReset, OutboxMessage


def _hash() -> bytes:
    return hashlib.sha256(secrets.token_bytes(32)).digest()


async def test_store_password_reset_is_single_use_and_expires(vault: Store) -> None:
    member = new_member()
    await vault.insert_member(member)
    token, other = _hash(), _hash()
    mail = reset_mail(member.member_id)
    assert await vault.create_password_reset(token, member.member_id, ts(1800), mail)
    assert await vault.create_password_reset(
        other, member.member_id, ts(1800), reset_mail(member.member_id)
    )
    assert mail.message_id in {m.message_id for m in await vault.due_outbox(ts(0), 10)}

    assert await vault.consume_password_reset(_hash(), ts(1)) is None
    assert await vault.consume_password_reset(token, ts(1)) == member.member_id
    assert await vault.consume_password_reset(token, ts(2)) is None  # used
    assert await vault.consume_password_reset(other, ts(1800)) is None  # expired
    with pytest.raises(ValueError):
        await vault.consume_password_reset(b"not a sha-256", ts(1))


async def test_store_concurrent_consumers_get_the_member_once(vault: Store) -> None:
    member = new_member()
    await vault.insert_member(member)
    token = _hash()
    assert await vault.create_password_reset(
        token, member.member_id, ts(1800), reset_mail(member.member_id)
    )
    got = await asyncio.gather(*(vault.consume_password_reset(token, ts(1)) for _ in range(5)))
    assert [g for g in got if g is not None] == [member.member_id]


async def test_store_password_reset_for_a_missing_member_writes_nothing(vault: Store) -> None:
    stranger = str(uuid.uuid4())
    token = _hash()
    assert (
        await vault.create_password_reset(token, stranger, ts(1800), reset_mail(stranger)) is False
    )
    assert await vault.due_outbox(ts(10_000), 10) == []
    assert await vault.consume_password_reset(token, ts(1)) is None
    member = new_member()
    await vault.insert_member(member)
    with pytest.raises(ValueError):  # the mail must be for the same member
        await vault.create_password_reset(token, member.member_id, ts(1800), reset_mail(stranger))


async def test_store_shred_deletes_and_counts_reset_tokens(vault: Store) -> None:
    member, bystander = new_member(), new_member()
    await vault.insert_member(member)
    await vault.insert_member(bystander)
    token, kept = _hash(), _hash()
    assert await vault.create_password_reset(
        token, member.member_id, ts(1800), reset_mail(member.member_id)
    )
    assert await vault.create_password_reset(
        kept, bystander.member_id, ts(1800), reset_mail(bystander.member_id)
    )
    record = await vault.shred_member(member.member_id, ts(5), "withdrawal")
    assert record is not None
    assert record.items["password_resets"] == 1
    assert record.items["outbox"] == 1
    assert await vault.consume_password_reset(token, ts(6)) is None
    assert await vault.consume_password_reset(kept, ts(6)) == bystander.member_id


def _reminder_mail(
    member_id: str, at_seconds: float = 0, kind: str = LOGIN_ID_REMINDER
) -> OutboxMessage:
    return OutboxMessage(
        message_id=str(uuid.uuid4()),
        member_id=member_id,
        kind=kind,
        params={},
        created_at=ts(at_seconds),
    )


async def test_store_recovery_mail_limit_is_atomic_and_slides(vault: Store) -> None:
    member, bystander = new_member(), new_member()
    await vault.insert_member(member)
    await vault.insert_member(bystander)
    mid = member.member_id

    async def queue(at: float, who: str = mid, **extra: Any) -> str:
        return await vault.queue_recovery_mail(
            _reminder_mail(who, at), limit=3, since=ts(at - 3600), **extra
        )

    # Concurrent calls never queue more than the limit.
    outcomes = await asyncio.gather(*(queue(10) for _ in range(12)))
    assert sorted(outcomes) == ["limited"] * 9 + ["queued"] * 3
    assert await queue(20, bystander.member_id) == "queued"  # per member
    assert await queue(3609) == "limited"  # the first three are still within the hour
    assert await queue(3611) == "queued"  # they are not any more
    assert await queue(3612) == "queued"
    assert await queue(3613) == "queued"
    assert await queue(3614) == "limited"
    queued = [m for m in await vault.due_outbox(ts(10_000), 100) if m.member_id == mid]
    assert len(queued) == 6

    # Nothing at all is written past the limit: no reset row either.
    token = _hash()
    reset = NewPasswordReset(token, ts(5000))
    assert await queue(3615, reset=reset) == "limited"
    assert await vault.find_password_reset(token, ts(3616)) is None
    # Nor for a member that does not exist.
    stranger = str(uuid.uuid4())
    assert await queue(3615, stranger, reset=NewPasswordReset(token, ts(5000))) == "no_member"
    with pytest.raises(ValueError):
        await vault.queue_recovery_mail(_reminder_mail(mid), limit=0, since=T0)


async def test_store_find_password_reset_does_not_spend_the_token(vault: Store) -> None:
    member = new_member()
    await vault.insert_member(member)
    token = _hash()
    reset = NewPasswordReset(token, ts(1800))
    mail = _reminder_mail(member.member_id, kind=PASSWORD_RESET)
    assert await vault.queue_recovery_mail(mail, limit=5, since=ts(-3600), reset=reset) == "queued"

    assert await vault.find_password_reset(_hash(), ts(1)) is None
    for _ in range(3):
        assert await vault.find_password_reset(token, ts(1)) == member.member_id
    assert await vault.find_password_reset(token, ts(1800)) is None  # expired then
    assert await vault.consume_password_reset(token, ts(2)) == member.member_id
    assert await vault.find_password_reset(token, ts(3)) is None  # used
    with pytest.raises(ValueError):
        await vault.find_password_reset(b"not a sha-256", ts(1))


async def test_store_shred_takes_the_recovery_count_with_the_member(vault: Store) -> None:
    member = new_member()
    await vault.insert_member(member)
    mid = member.member_id
    for at in (1, 2):
        assert await vault.queue_recovery_mail(
            _reminder_mail(mid, at), limit=2, since=ts(-3600)
        ) == ("queued")
    assert await vault.shred_member(mid, ts(3), "withdrawal") is not None
    assert await vault.queue_recovery_mail(_reminder_mail(mid, 4), limit=2, since=ts(-3600)) == (
        "no_member"
    )
