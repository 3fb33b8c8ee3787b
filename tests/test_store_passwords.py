"""The PasswordStore contract: a new password hash, the end of the member's sessions,
its notice and (for a reset) the failure counter's deletion are one transaction.
Every test runs once on SQLite and once on PostgreSQL."""

from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta

import pytest
from store_support import T0, message, new_member, ts

from vault.errors import KeyChanged
from vault.mail import PASSWORD_CHANGED
from vault.store import MemberRow, Store
from vault.store.base import SessionRow
from vault.store.contracts.login_failures import FailedLogin

LATER = T0 + timedelta(minutes=5)  # sessions started at T0 are live then


async def _member_with_sessions(vault: Store, sessions: int = 3) -> tuple[MemberRow, list[bytes]]:
    member = new_member()
    await vault.insert_member(member)
    hashes = []
    for n in range(sessions):
        token_hash = hashlib.sha256(secrets.token_bytes(32)).digest()
        created = ts(n)
        row = SessionRow(
            token_hash, member.member_id, created, created + timedelta(minutes=15), ts(3600)
        )
        assert await vault.create_session(row, keep=20, purge_limit=100)
        hashes.append(token_hash)
    return member, hashes


async def _live(vault: Store, hashes: list[bytes]) -> int:
    return len([h for h in hashes if await vault.find_session(h, LATER) is not None])


async def _fail(vault: Store, member: MemberRow, times: int) -> None:
    for n in range(times):
        await vault.record_login_failure(FailedLogin(member.blind_indexes["login_id"], ts(n), None))


async def _failures(vault: Store, member: MemberRow) -> int:
    return (await vault.login_failure_state(member.blind_indexes["login_id"], None)).failures


async def test_the_write_ends_the_members_sessions_and_only_theirs(vault: Store) -> None:
    member, hashes = await _member_with_sessions(vault)
    _, theirs = await _member_with_sessions(vault, 2)
    notice = message(member.member_id, kind=PASSWORD_CHANGED)
    assert await vault.write_password(member.member_id, b"new-hash-ct", dek_id=1, notify=notice)
    row = await vault.get_member(member.member_id)
    assert row is not None
    assert row.ciphertexts["password_hash"] == b"new-hash-ct"
    assert await _live(vault, hashes) == 0
    assert await _live(vault, theirs) == 2
    queued = await vault.due_outbox(T0 + timedelta(days=1), 10)
    assert [(m.message_id, m.kind) for m in queued] == [(notice.message_id, PASSWORD_CHANGED)]


async def test_a_reset_clears_the_counter_in_the_same_write(vault: Store) -> None:
    member, _ = await _member_with_sessions(vault, 1)
    other, _ = await _member_with_sessions(vault, 1)
    await _fail(vault, member, 100)  # permanently locked
    await _fail(vault, other, 4)
    change = message(member.member_id, kind=PASSWORD_CHANGED)
    assert await vault.write_password(member.member_id, b"changed", dek_id=1, notify=change)
    assert await _failures(vault, member) == 100  # a change lifts no lock
    reset = message(member.member_id, kind=PASSWORD_CHANGED)
    assert await vault.write_password(
        member.member_id, b"reset", dek_id=1, notify=reset, clear_failures=True
    )
    assert await _failures(vault, member) == 0
    assert await _failures(vault, other) == 4


async def test_a_write_that_fails_at_its_last_step_leaves_everything(vault: Store) -> None:
    """The notice is the transaction's last statement: a notice that cannot be queued
    (its id is taken) rolls back the hash, the sessions' end and the counter's."""
    member, hashes = await _member_with_sessions(vault)
    await _fail(vault, member, 100)
    first = message(member.member_id, kind=PASSWORD_CHANGED)
    await vault.enqueue_outbox(first)
    with pytest.raises(RuntimeError, match="unique constraint"):
        await vault.write_password(
            member.member_id, b"never-written", dek_id=1, notify=first, clear_failures=True
        )
    row = await vault.get_member(member.member_id)
    assert row is not None
    assert row.ciphertexts["password_hash"] == member.ciphertexts["password_hash"]
    assert await _live(vault, hashes) == 3
    assert await _failures(vault, member) == 100


async def test_a_rotated_key_refuses_the_write_and_ends_nothing(vault: Store) -> None:
    member, hashes = await _member_with_sessions(vault)
    with pytest.raises(KeyChanged):
        await vault.write_password(
            member.member_id, b"stale", dek_id=7, notify=message(member.member_id)
        )
    row = await vault.get_member(member.member_id)
    assert row is not None
    assert row.ciphertexts["password_hash"] == member.ciphertexts["password_hash"]
    assert await _live(vault, hashes) == 3
    assert await vault.due_outbox(T0 + timedelta(days=1), 10) == []


async def test_a_missing_member_writes_nothing(vault: Store) -> None:
    gone = new_member().member_id
    assert not await vault.write_password(gone, b"x", dek_id=1, notify=message(gone))
    assert await vault.due_outbox(T0 + timedelta(days=1), 10) == []
    member = new_member()
    await vault.insert_member(member)
    with pytest.raises(ValueError, match="another member"):
        await vault.write_password(member.member_id, b"x", dek_id=1, notify=message(gone))
