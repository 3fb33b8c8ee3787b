"""The SessionStore contract: member sessions by token hash, bounded per member, purged
when expired. Every test runs once on SQLite and once on PostgreSQL."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import uuid
from datetime import timedelta

import pytest
from store_support import T0, assert_utc, entry, new_member, ts

from vault.errors import KeyChanged
from vault.store import Store
from vault.store.base import NewSession, SessionRow

IDLE = timedelta(minutes=15)
LIFETIME = timedelta(hours=12)


def _hash() -> bytes:
    return hashlib.sha256(secrets.token_bytes(32)).digest()


def session(member_id: str, at: float = 0, token_hash: bytes | None = None) -> SessionRow:
    created = ts(at)
    return SessionRow(token_hash or _hash(), member_id, created, created + IDLE, created + LIFETIME)


async def _member(vault: Store) -> str:
    member = new_member()
    await vault.insert_member(member)
    return member.member_id


async def test_a_session_is_found_until_it_idles_out(vault: Store) -> None:
    mid = await _member(vault)
    new = session(mid)
    assert await vault.create_session(new, keep=20, purge_limit=100)
    found = await vault.find_session(new.token_hash, ts(1))
    assert found == new
    assert found is not None
    assert_utc(found.idle_expires_at)
    assert await vault.find_session(new.token_hash, T0 + IDLE - timedelta(microseconds=1))
    assert await vault.find_session(new.token_hash, T0 + IDLE) is None
    assert await vault.find_session(_hash(), ts(1)) is None


async def test_refresh_moves_the_idle_end_but_never_past_the_absolute_end(vault: Store) -> None:
    mid = await _member(vault)
    new = session(mid)
    assert await vault.create_session(new, keep=20, purge_limit=100)
    now = T0 + timedelta(minutes=10)
    assert await vault.refresh_session(new.token_hash, now, now + IDLE)
    found = await vault.find_session(new.token_hash, T0 + IDLE + timedelta(minutes=1))
    assert found is not None
    assert found.idle_expires_at == now + IDLE
    # Past the absolute end the refresh is capped there.
    late = T0 + LIFETIME - timedelta(minutes=1)
    refreshed = T0 + IDLE
    for _ in range(60):  # keep it alive, every 12 minutes, up to the end
        if refreshed >= late:
            break
        assert await vault.refresh_session(new.token_hash, refreshed, refreshed + IDLE)
        refreshed += timedelta(minutes=12)
    assert await vault.refresh_session(new.token_hash, late, late + IDLE)
    found = await vault.find_session(new.token_hash, late)
    assert found is not None
    assert found.idle_expires_at == T0 + LIFETIME
    assert await vault.find_session(new.token_hash, T0 + LIFETIME) is None
    # An expired session is not revived.
    end = T0 + LIFETIME
    assert not await vault.refresh_session(new.token_hash, end, end + IDLE)
    assert not await vault.refresh_session(_hash(), ts(1), ts(1) + IDLE)


async def test_end_session_only_for_its_member(vault: Store) -> None:
    mid, other = await _member(vault), await _member(vault)
    new = session(mid)
    assert await vault.create_session(new, keep=20, purge_limit=100)
    assert not await vault.end_session(new.token_hash, other)
    assert await vault.find_session(new.token_hash, ts(1)) is not None
    assert await vault.end_session(new.token_hash, mid)
    assert await vault.find_session(new.token_hash, ts(1)) is None
    assert not await vault.end_session(new.token_hash, mid)


async def test_end_member_sessions_ends_all_and_only_that_members(vault: Store) -> None:
    mid, other = await _member(vault), await _member(vault)
    mine = [session(mid, n) for n in range(3)]
    theirs = session(other)
    for s in [*mine, theirs]:
        assert await vault.create_session(s, keep=20, purge_limit=100)
    assert await vault.end_member_sessions(mid) == 3
    assert all([await vault.find_session(s.token_hash, ts(5)) is None for s in mine])
    assert await vault.find_session(theirs.token_hash, ts(5)) is not None
    assert await vault.end_member_sessions(mid) == 0


async def test_the_oldest_sessions_past_the_bound_are_ended(vault: Store) -> None:
    mid = await _member(vault)
    made = [session(mid, n) for n in range(5)]
    for s in made:
        assert await vault.create_session(s, keep=3, purge_limit=100)
    live = [await vault.find_session(s.token_hash, ts(10)) for s in made]
    assert [s is not None for s in live] == [False, False, True, True, True]


async def test_expired_sessions_are_pruned_and_purged(vault: Store) -> None:
    mid, other = await _member(vault), await _member(vault)
    old = [session(other, n) for n in range(4)]
    for s in old:
        assert await vault.create_session(s, keep=20, purge_limit=0)
    later = IDLE.total_seconds() + 60
    # A login long after: up to purge_limit expired sessions of anyone go with it.
    assert await vault.create_session(session(mid, later), keep=20, purge_limit=3)
    left = await vault.purge_sessions(ts(later), 100)
    assert left == 1
    assert await vault.purge_sessions(ts(later), 100) == 0


async def test_purge_takes_only_expired_sessions(vault: Store) -> None:
    mid, other = await _member(vault), await _member(vault)
    live, old = session(mid, 1000), session(other, 0)
    assert await vault.create_session(old, keep=20, purge_limit=0)
    assert await vault.create_session(live, keep=20, purge_limit=0)
    assert await vault.purge_sessions(ts(1000), 10) == 1
    assert await vault.find_session(live.token_hash, ts(1001)) is not None


async def test_no_session_for_a_missing_member(vault: Store) -> None:
    assert not await vault.create_session(session(str(uuid.uuid4())), keep=20, purge_limit=10)


async def test_a_shred_deletes_the_members_sessions(vault: Store) -> None:
    mid = await _member(vault)
    new = session(mid)
    assert await vault.create_session(new, keep=20, purge_limit=10)
    assert await vault.shred_member(mid, ts(5), "withdrawal") is not None
    assert await vault.find_session(new.token_hash, ts(6)) is None
    assert await vault.end_member_sessions(mid) == 0


async def test_concurrent_logins_keep_the_bound(vault: Store) -> None:
    mid = await _member(vault)
    made = [session(mid, n / 1000) for n in range(12)]
    results = await asyncio.gather(*(vault.create_session(s, keep=5, purge_limit=10) for s in made))
    assert all(results)
    live = [await vault.find_session(s.token_hash, ts(1)) for s in made]
    assert sum(s is not None for s in live) == 5


async def test_bad_rows_are_refused(vault: Store) -> None:
    mid = await _member(vault)
    with pytest.raises(ValueError):
        await vault.create_session(
            SessionRow(b"short", mid, T0, T0 + IDLE, T0 + LIFETIME), keep=1, purge_limit=1
        )
    with pytest.raises(ValueError):  # the idle end past the absolute end
        await vault.create_session(
            SessionRow(_hash(), mid, T0, T0 + LIFETIME, T0 + IDLE), keep=1, purge_limit=1
        )
    with pytest.raises(ValueError):
        await vault.create_session(session(mid), keep=0, purge_limit=1)


# A login stores its session in its own transaction (MemberStore.record_login).


async def test_a_login_with_a_session_writes_both(vault: Store) -> None:
    mid, other = await _member(vault), await _member(vault)
    old = [session(other, n) for n in range(2)]  # expired by the login below
    mine = [session(mid, 1000 + n) for n in range(3)]
    for s in [*old, *mine]:
        assert await vault.create_session(s, keep=20, purge_limit=0)
    at = 1000 + IDLE.total_seconds() / 2
    new = session(mid, at)
    assert await vault.record_login(
        mid, entry(ts(at), 1), dek_id=1, session=NewSession(new, keep=3, purge_limit=1)
    )
    assert await vault.find_session(new.token_hash, ts(at + 1)) == new
    got = await vault.get_member(mid)
    assert got is not None
    assert got.last_seen_at == ts(at)
    assert len(await vault.list_access(mid, 10)) == 1
    # Pruned to the 3 newest (the oldest of mine went), one expired one purged.
    live = [await vault.find_session(s.token_hash, ts(at + 1)) is not None for s in mine]
    assert live == [False, True, True]
    assert await vault.purge_sessions(ts(at), 100) == 1


async def test_a_login_that_writes_nothing_stores_no_session(vault: Store) -> None:
    mid = await _member(vault)
    stranger = str(uuid.uuid4())
    lost = session(stranger, 1)
    gone = NewSession(lost, keep=5, purge_limit=10)
    assert await vault.record_login(stranger, entry(ts(1)), dek_id=1, session=gone) is False
    assert await vault.find_session(lost.token_hash, ts(2)) is None
    # A rotated key (KeyChanged) rolls the session back with the login.
    stale = session(mid, 1)
    with pytest.raises(KeyChanged):
        await vault.record_login(
            mid, entry(ts(1)), b"ct", dek_id=7, session=NewSession(stale, keep=5, purge_limit=10)
        )
    assert await vault.find_session(stale.token_hash, ts(2)) is None
    assert await vault.list_access(mid, 10) == []
    # A shredded member: no login, no session.
    assert await vault.shred_member(mid, ts(3), "withdrawal") is not None
    late = session(mid, 4)
    shredded = NewSession(late, keep=5, purge_limit=10)
    assert await vault.record_login(mid, entry(ts(4)), dek_id=1, session=shredded) is False
    assert await vault.find_session(late.token_hash, ts(5)) is None


async def test_a_login_refuses_another_members_or_a_bad_session(vault: Store) -> None:
    mid, other = await _member(vault), await _member(vault)
    bad = [
        NewSession(session(other, 1), keep=5, purge_limit=10),
        NewSession(session(mid, 1), keep=0, purge_limit=10),
        NewSession(SessionRow(b"short", mid, T0, T0 + IDLE, T0 + LIFETIME), 5, 10),
    ]
    for new in bad:
        with pytest.raises(ValueError):
            await vault.record_login(mid, entry(ts(1)), dek_id=1, session=new)
    assert await vault.list_access(mid, 10) == []
    assert await vault.find_session(bad[0].row.token_hash, ts(2)) is None


async def test_concurrent_logins_with_sessions_keep_the_bound(vault: Store) -> None:
    mid = await _member(vault)
    made = [session(mid, n / 1000) for n in range(12)]
    results = await asyncio.gather(
        *(
            vault.record_login(
                mid, entry(s.created_at), dek_id=1, session=NewSession(s, keep=5, purge_limit=10)
            )
            for s in made
        )
    )
    assert all(results)
    live = [await vault.find_session(s.token_hash, ts(1)) for s in made]
    assert sum(s is not None for s in live) == 5
