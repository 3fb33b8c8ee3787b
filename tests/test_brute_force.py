"""Brute-force protection over gRPC, on SQLite and PostgreSQL: the failure counter
per account (parallel guesses all counted, growing lockout, permanent at 100 until a
reset, every password check counting), a locked account answering like a wrong
password in code, details and time, the per-IP throttle, failed logins in the
member's history, and the counter shared by two server processes."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2
from grpc_support import (
    CLIENT_IP,
    SESSION_KEY,
    error_info,
    rich_status,
    sign_up_request,
    vault_session,
)
from mail_support import SmtpServer, lf_body, mail_token, relay_for, smtp_mailer
from process_support import ServerProcess, cli_env, free_port

from privacyvault.v1 import member_pb2 as pb
from privacyvault.v1.member_pb2_grpc import MemberServiceStub
from service.config import Settings
from service.server import RunningServer, run_server
from vault import FrozenClock

WRONG = "not the password 1"
Code = grpc.StatusCode


@pytest.fixture
async def guarded(
    server_settings: Settings, clock: FrozenClock
) -> AsyncIterator[tuple[RunningServer, MemberServiceStub]]:
    """A server whose password queue admits 20 parallel guesses at once."""
    settings = server_settings.model_copy(update={"password_queue_limit": 64})
    async with (
        run_server(settings, clock=clock) as running,
        grpc.aio.insecure_channel(running.target) as ch,
    ):
        yield running, MemberServiceStub(ch)


async def _login(
    stub: MemberServiceStub, login_id: str, password: str, ip: str = "203.0.113.7"
) -> grpc.aio.AioRpcError | None:
    try:
        await stub.Authenticate(
            pb.AuthenticateRequest(login_id=login_id, password=password, client_ip=ip)
        )
    except grpc.aio.AioRpcError as exc:
        return exc
    return None


async def _refused(stub: MemberServiceStub, login_id: str, password: str, **kw: Any) -> None:
    error = await _login(stub, login_id, password, **kw)
    assert error is not None, "the login went through"
    assert error.code() == Code.UNAUTHENTICATED
    assert error_info(error).reason == "WRONG_CREDENTIALS"


async def _failures(running: RunningServer, login_id: str) -> int:
    login_hmac = running.vault.parts.indexes.login_id(login_id)
    return (await running.vault.parts.store.login_failure_state(login_hmac, None)).failures


async def test_parallel_wrong_guesses_are_all_counted(
    guarded: tuple[RunningServer, MemberServiceStub],
) -> None:
    running, stub = guarded
    request = sign_up_request()
    await stub.SignUp(request)
    errors = await asyncio.gather(*(_login(stub, request.login_id, WRONG) for _ in range(20)))
    assert all(e is not None and e.code() == Code.UNAUTHENTICATED for e in errors)
    assert await _failures(running, request.login_id) == 20
    # Unknown login IDs are counted the same way, by their blind index.
    await asyncio.gather(*(_login(stub, "nobody.here", WRONG) for _ in range(20)))
    assert await _failures(running, "nobody.here") == 20


async def test_lockout_grows_and_a_success_resets(
    members: MemberServiceStub, server: RunningServer, clock: FrozenClock
) -> None:
    request = sign_up_request()
    await members.SignUp(request)
    login, right = request.login_id, request.password
    almost = timedelta(seconds=1)
    for _ in range(9):
        await _refused(members, login, WRONG)
    assert await _login(members, login, right) is None  # 9 failures: not locked; reset
    assert await _failures(server, login) == 0
    for _ in range(10):
        await _refused(members, login, WRONG)
    await _refused(members, login, right)  # locked for 1 minute: the right password too
    clock.advance(timedelta(minutes=2) - almost)  # that was the 11th: 2 minutes
    await _refused(members, login, right)  # locked again, now 4 minutes (the 12th)
    clock.advance(timedelta(minutes=4) - almost)
    await _refused(members, login, right)  # 13th: 8 minutes
    assert await _failures(server, login) == 13
    clock.advance(timedelta(minutes=8))
    assert await _login(members, login, right) is None
    assert await _failures(server, login) == 0


async def test_permanent_lock_at_100_until_a_password_reset(
    guarded: tuple[RunningServer, MemberServiceStub],
    clock: FrozenClock,
    smtp_server: SmtpServer,
) -> None:
    running, stub = guarded
    request = sign_up_request()
    await stub.SignUp(request)
    for _ in range(10):
        await asyncio.gather(*(_login(stub, request.login_id, WRONG) for _ in range(10)))
    clock.advance(timedelta(days=60))  # far past any growing period
    await _refused(stub, request.login_id, request.password)
    await stub.StartPasswordReset(pb.StartPasswordResetRequest(login_id=request.login_id))
    await running.vault.settle()
    assert (await relay_for(running, smtp_mailer(smtp_server.port), clock).relay_once()).sent == 1
    token = mail_token(lf_body(smtp_server.handler.received[-1].message))
    await stub.CompletePasswordReset(
        pb.CompletePasswordResetRequest(token=token, new_password="a brand new passphrase")
    )
    assert await _login(stub, request.login_id, "a brand new passphrase") is None


async def test_change_password_and_withdraw_count_toward_the_same_lock(
    members: MemberServiceStub, server: RunningServer
) -> None:
    request = sign_up_request()
    member_id = (await members.SignUp(request)).member_id
    # A session from before the guesses: the member's own-rights calls need one, and
    # the password checks behind it still count (the session is no way around them).
    session = await vault_session(server, member_id)
    for _ in range(3):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await members.ChangePassword(
                pb.ChangePasswordRequest(
                    member_id=member_id, current_password=WRONG, new_password="another one 123"
                ),
                metadata=session,
            )
        assert error_info(raised.value).reason == "WRONG_CREDENTIALS"
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await members.Withdraw(
                pb.WithdrawRequest(member_id=member_id, password=WRONG), metadata=session
            )
        assert raised.value.code() == Code.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await members.UpdateMember(
                pb.UpdateMemberRequest(
                    member_id=member_id,
                    email="elsewhere@example.com",
                    current_password=WRONG,
                    update_mask=field_mask_pb2.FieldMask(paths=["email"]),
                ),
                metadata=session,
            )
        assert error_info(raised.value).reason == "WRONG_CREDENTIALS"
    assert await _failures(server, request.login_id) == 9
    with pytest.raises(grpc.aio.AioRpcError):
        await members.Withdraw(
            pb.WithdrawRequest(member_id=member_id, password=WRONG), metadata=session
        )
    assert await _failures(server, request.login_id) == 10
    await _refused(members, request.login_id, request.password)  # locked
    # And a locked account's right password is refused by the other checks too.
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await members.Withdraw(
            pb.WithdrawRequest(member_id=member_id, password=request.password), metadata=session
        )
    assert raised.value.code() == Code.UNAUTHENTICATED
    assert await _failures(server, request.login_id) == 12


async def test_failed_logins_are_in_the_members_history_with_the_ip(
    members: MemberServiceStub,
) -> None:
    request = sign_up_request()
    member_id = (await members.SignUp(request)).member_id
    # The client_ip field wins over the x-client-ip metadata.
    with pytest.raises(grpc.aio.AioRpcError):
        await members.Authenticate(
            pb.AuthenticateRequest(
                login_id=request.login_id, password=WRONG, client_ip="2001:db8::42"
            ),
            metadata=CLIENT_IP,
        )
    auth = await members.Authenticate(
        pb.AuthenticateRequest(login_id=request.login_id, password=request.password),
        metadata=CLIENT_IP,
    )
    history = await members.ListAccessHistory(
        pb.ListAccessHistoryRequest(member_id=member_id),
        metadata=((SESSION_KEY, auth.session_token),),
    )
    assert [(e.action, e.ip) for e in history.entries] == [
        ("authenticate", "203.0.113.7"),
        ("login.failed", "2001:db8::42"),
    ]


async def test_ip_throttle_answers_resource_exhausted_with_retry_info(
    server_settings: Settings, clock: FrozenClock
) -> None:
    settings = server_settings.model_copy(
        update={"login_ip_failure_limit": 5, "login_ip_window_seconds": 600}
    )
    async with (
        run_server(settings, clock=clock) as running,
        grpc.aio.insecure_channel(running.target) as ch,
    ):
        stub = MemberServiceStub(ch)
        request = sign_up_request()
        await stub.SignUp(request)
        # Successes do not count: a busy NAT's logins go through.
        for _ in range(8):
            assert await _login(stub, request.login_id, request.password, ip="192.0.2.1") is None
        for n in range(5):  # across accounts: credential stuffing
            await _refused(stub, f"victim{n:03d}", WRONG, ip="192.0.2.1")
        clock.advance(timedelta(seconds=100))
        error = await _login(stub, request.login_id, request.password, ip="192.0.2.1")
        assert error is not None
        assert error.code() == Code.RESOURCE_EXHAUSTED
        assert error_info(error).reason == "TOO_MANY_ATTEMPTS"
        retry = error_details_pb2.RetryInfo()
        assert any(d.Unpack(retry) for d in rich_status(error).details)
        assert retry.retry_delay.ToTimedelta() == timedelta(seconds=500)
        assert "192.0.2.1" not in (error.details() or "")
        # Another client is not held up, and the window ends.
        assert await _login(stub, request.login_id, request.password, ip="192.0.2.2") is None
        clock.advance(timedelta(seconds=500))
        assert await _login(stub, request.login_id, request.password, ip="192.0.2.1") is None


async def test_locked_answers_like_a_wrong_password_in_code_details_and_time(
    server_settings: Settings, clock: FrozenClock
) -> None:
    """A locked account must not be told apart from a wrong password, not even with
    the right password: that would confirm a guess."""
    costly = server_settings.model_copy(
        update={
            "argon2_memory_cost": 16 * 1024,
            "login_lock_after": 99,
            "password_queue_limit": 64,
        }
    )
    locked, open_ = sign_up_request(), sign_up_request()
    async with (
        run_server(costly, clock=clock) as running,
        grpc.aio.insecure_channel(running.target) as ch,
    ):
        stub = MemberServiceStub(ch)
        await stub.SignUp(locked)
        await stub.SignUp(open_)
        for _ in range(10):
            await asyncio.gather(*(_login(stub, locked.login_id, WRONG) for _ in range(10)))
        wrong_error = await _login(stub, open_.login_id, WRONG)
        locked_error = await _login(stub, locked.login_id, locked.password)
        assert wrong_error is not None
        assert locked_error is not None
        assert locked_error.code() == wrong_error.code()
        assert locked_error.details() == wrong_error.details()
        assert rich_status(locked_error) == rich_status(wrong_error)

        async def attempt(login_id: str, password: str) -> float:
            started = time.perf_counter()
            error = await _login(stub, login_id, password)
            elapsed = time.perf_counter() - started
            assert error is not None
            return elapsed

        ratios = []
        for i in range(40):  # one ratio per pair, the order alternating within pairs
            if i % 2:
                wrong = await attempt(open_.login_id, WRONG)
                refused = await attempt(locked.login_id, locked.password)
            else:
                refused = await attempt(locked.login_id, locked.password)
                wrong = await attempt(open_.login_id, WRONG)
            ratios.append(refused / wrong)
        assert await _failures(running, open_.login_id) < 99  # never locked itself
    ratio = statistics.median(ratios)
    assert 0.9 < ratio < 1.1, ratio


@pytest.mark.postgres
async def test_two_server_processes_share_the_counter(
    tmp_path: Path, make_postgres_database: Any
) -> None:
    url = await make_postgres_database()
    data = tmp_path / "data"
    processes = []
    try:
        for name in ("a", "b"):
            env = cli_env(
                data,
                listen_address=f"127.0.0.1:{free_port()}",
                database_url=url,
                password_queue_limit="64",
            )
            processes.append(ServerProcess(env, tmp_path, tmp_path / f"{name}.log"))
        channels = [p.wait_serving() for p in processes]
        stubs = [MemberServiceStub(grpc.aio.insecure_channel(p.target)) for p in processes]
        request = sign_up_request()
        await stubs[0].SignUp(request)
        errors = await asyncio.gather(
            *(_login(stubs[n % 2], request.login_id, WRONG) for n in range(20))
        )
        assert all(e is not None and e.code() == Code.UNAUTHENTICATED for e in errors)
        conn = await asyncpg.connect(url)
        try:
            assert await conn.fetchval("SELECT failures FROM login_failures") == 20
        finally:
            await conn.close()
        # Locked on both replicas, the right password included.
        for stub in stubs:
            await _refused(stub, request.login_id, request.password)
        for channel in channels:
            channel.close()
    finally:
        for process in processes:
            process.close()
