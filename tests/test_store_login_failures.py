"""The LoginFailureStore contract: failure counters per account (by the login ID's
blind index) and per client IP. Runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import secrets
from datetime import timedelta

from store_support import T0, entry, new_member, ts

from vault.store import Store
from vault.store.contracts.login_failures import FailedLogin, LoginFailureState

WINDOW = timedelta(minutes=15)


def failure(login: bytes, seconds: float, ip: bytes | None = None) -> FailedLogin:
    at = ts(seconds)
    return FailedLogin(login, at, ip, None if ip is None else at - WINDOW)


async def test_parallel_failures_are_all_counted(vault: Store) -> None:
    login, ip = secrets.token_bytes(32), secrets.token_bytes(32)
    counts = await asyncio.gather(
        *(vault.record_login_failure(failure(login, 1, ip)) for _ in range(20))
    )
    # One atomic upsert each: every caller saw a distinct count, none was lost.
    assert sorted(c.failures for c in counts) == list(range(1, 21))
    state = await vault.login_failure_state(login, ip)
    assert (state.failures, state.last_failure_at, state.ip_failures) == (20, ts(1), 20)


async def test_state_of_nothing_is_zero(vault: Store) -> None:
    assert await vault.login_failure_state(secrets.token_bytes(32), None) == LoginFailureState()
    assert (
        await vault.login_failure_state(secrets.token_bytes(32), secrets.token_bytes(32))
        == LoginFailureState()
    )


async def test_ip_window_starts_again_once_ended(vault: Store) -> None:
    ip = secrets.token_bytes(32)
    for n in range(3):
        await vault.record_login_failure(failure(secrets.token_bytes(32), n, ip))
    state = await vault.login_failure_state(b"x" * 32, ip)
    assert (state.ip_failures, state.ip_window_start) == (3, T0)
    # 15 minutes after the window started, a failure opens a new one.
    await vault.record_login_failure(failure(secrets.token_bytes(32), 15 * 60, ip))
    state = await vault.login_failure_state(b"x" * 32, ip)
    assert (state.ip_failures, state.ip_window_start) == (1, ts(15 * 60))


async def test_clear_forgets_the_account_only(vault: Store) -> None:
    login, other, ip = secrets.token_bytes(32), secrets.token_bytes(32), secrets.token_bytes(32)
    await vault.record_login_failure(failure(login, 1, ip))
    await vault.record_login_failure(failure(other, 2))
    await vault.clear_login_failures(login)
    state = await vault.login_failure_state(login, ip)
    assert (state.failures, state.ip_failures) == (0, 1)  # the IP's count stays
    assert (await vault.login_failure_state(other, None)).failures == 1


async def test_a_members_failure_is_logged_under_its_current_key(vault: Store) -> None:
    member = new_member()
    await vault.insert_member(member)
    login = member.blind_indexes["login_id"]
    ok = FailedLogin(login, ts(1), None, None, member.member_id, entry(ts(1)), dek_id=1)
    assert (await vault.record_login_failure(ok)).entry_written
    stale = FailedLogin(login, ts(2), None, None, member.member_id, entry(ts(2)), dek_id=7)
    count = await vault.record_login_failure(stale)
    # A DEK that is no longer the member's: no entry, but the failure counts.
    assert (count.failures, count.entry_written) == (2, False)
    assert [e.at for e in await vault.list_access(member.member_id, 10)] == [ts(1)]


async def test_shred_deletes_the_members_counter(vault: Store) -> None:
    member = new_member()
    await vault.insert_member(member)
    login = member.blind_indexes["login_id"]
    await vault.record_login_failure(failure(login, 1))
    assert await vault.shred_member(member.member_id, ts(2), "withdrawal") is not None
    assert (await vault.login_failure_state(login, None)).failures == 0


async def test_purge_takes_stale_unknown_counters_and_ended_windows(vault: Store) -> None:
    member = new_member()
    await vault.insert_member(member)
    known = member.blind_indexes["login_id"]
    unknown, recent, ip = (secrets.token_bytes(32) for _ in range(3))
    await vault.record_login_failure(failure(known, 0))
    await vault.record_login_failure(failure(unknown, 0, ip))
    await vault.record_login_failure(failure(recent, 100))
    assert await vault.purge_login_failures(ts(50), 100) == 2  # unknown + the IP window
    assert (await vault.login_failure_state(known, None)).failures == 1  # a member's stays
    assert (await vault.login_failure_state(unknown, ip)) == LoginFailureState()
    assert (await vault.login_failure_state(recent, None)).failures == 1
    assert await vault.purge_login_failures(ts(50), 100) == 0
