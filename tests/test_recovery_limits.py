"""Issue 8, item 10: unauthenticated callers cannot buy CPU or mail.

- CompletePasswordReset looks the token up before any argon2 work: a bogus token
  costs no hash (counted by the hasher itself).
- Password work sits behind a bounded queue: past it a call is refused at once
  with RESOURCE_EXHAUSTED and google.rpc.RetryInfo, on every RPC that hashes or
  verifies, and a refusal never spends a reset token.
- The work FindLoginId / StartPasswordReset do after answering is capped, and the
  refusal past the cap is the same for known and unknown accounts.
- Recovery mails per member and hour are limited in the database, shared by
  replicas, with the same OK answer past the limit.

Over real gRPC channels, on both backends, with real SMTP (aiosmtpd) for the
reset tokens. Where work must be held in flight, the test holds a real resource
(the argon2 worker thread, the database's write lock), never a mock.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import sqlite3
import threading
from collections.abc import AsyncIterator, Awaitable, Iterator
from datetime import timedelta
from typing import Any

import asyncpg
import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_support import (
    CLIENT_IP,
    error_info,
    field_violations,
    member_session,
    rich_status,
    sign_up_request,
)
from mail_support import SmtpServer, lf_body, mail_token, outbox, relay_for, smtp_mailer
from structlog.testing import capture_logs

from privacyvault.v1 import member_pb2 as pb
from privacyvault.v1.member_pb2_grpc import MemberServiceStub
from service.config import Settings
from service.server import RunningServer, run_server
from vault import FrozenClock, facade
from vault.mail import LOGIN_ID_REMINDER, PASSWORD_RESET
from vault.store.base import OutboxMessage

Code = grpc.StatusCode
NEW_PASSWORD = "a brand new passphrase 7"
QUEUE_LIMIT = 3  # password jobs admitted at once in these tests
RECOVERY_LIMIT = 3  # after-answer recovery tasks in flight in these tests
MAILS_PER_HOUR = 5  # the default RECOVERY_MAILS_PER_HOUR
CALL_TIMEOUT = 30.0  # seconds: far above anything a refusal may take


@pytest.fixture
def server_settings(server_settings: Settings) -> Settings:
    """One password thread and small queues; no in-process sidecar (the tests drive
    the relay and read the outbox themselves)."""
    return server_settings.model_copy(
        update={
            "sidecar_in_process": False,
            "password_workers": 1,
            "password_queue_limit": QUEUE_LIMIT,
            "recovery_queue_limit": RECOVERY_LIMIT,
        }
    )


async def _code(call: Awaitable[object]) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return Code.OK


async def _error(call: Awaitable[object]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


def _retry_delay(error: grpc.aio.AioRpcError) -> float:
    """The RetryInfo delay, in seconds, of a RESOURCE_EXHAUSTED error."""
    assert error.code() == Code.RESOURCE_EXHAUSTED, error.details()
    for detail in rich_status(error).details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.ToNanoseconds() / 1e9
    raise AssertionError("RESOURCE_EXHAUSTED without RetryInfo")


async def _reset_token(
    members: MemberServiceStub,
    server: RunningServer,
    clock: FrozenClock,
    smtp_server: SmtpServer,
    login_id: str,
) -> str:
    """Ask for a reset, deliver the mail over SMTP, read the token out of it."""
    await members.StartPasswordReset(pb.StartPasswordResetRequest(login_id=login_id))
    await server.vault.settle()  # the work runs after the answer
    assert (await relay_for(server, smtp_mailer(smtp_server.port), clock).relay_once()).sent == 1
    return mail_token(lf_body(smtp_server.handler.received[-1].message))


async def _authenticate(members: MemberServiceStub, login_id: str, password: str) -> Any:
    return await members.Authenticate(
        pb.AuthenticateRequest(login_id=login_id, password=password),
        metadata=CLIENT_IP,
        timeout=CALL_TIMEOUT,
    )


@contextlib.asynccontextmanager
async def _password_thread_held(server: RunningServer) -> AsyncIterator[None]:
    """Occupy the server's one argon2 worker thread with a job that waits: password
    jobs admitted meanwhile stay queued behind it, so "the queue is full" holds for
    as long as the test needs, with no timing involved."""
    pool = server.vault.parts.hasher._pool  # the real thread pool (password_workers=1)
    running, release = threading.Event(), threading.Event()

    def hold() -> None:
        running.set()
        release.wait(60)  # bounded: a failing test cannot hang the suite

    held = pool.submit(hold)
    try:
        assert await asyncio.to_thread(running.wait, 10)
        yield
    finally:
        release.set()
        await asyncio.wrap_future(held)


# --- CompletePasswordReset: the token before the hash ------------------------------------


async def test_bogus_reset_tokens_cost_no_password_hash(
    members: MemberServiceStub, server: RunningServer, clock: FrozenClock, smtp_server: SmtpServer
) -> None:
    """200 calls with tokens that do not exist: each is the token error, and the
    hasher (counting every job it admits) hashed and verified nothing for them.
    Before the fix each one cost a full argon2 hash (200 here)."""
    request = sign_up_request()
    await members.SignUp(request)
    before = server.vault.password_stats

    bogus = [
        pb.CompletePasswordResetRequest(token=secrets.token_urlsafe(32), new_password=NEW_PASSWORD)
        for _ in range(200)
    ]
    for batch in range(0, len(bogus), 50):
        errors = await asyncio.gather(
            *(_error(members.CompletePasswordReset(r)) for r in bogus[batch : batch + 50])
        )
        for error in errors:
            assert error.code() == Code.INVALID_ARGUMENT
            assert field_violations(error) == {"token": "is invalid or expired"}

    after = server.vault.password_stats
    assert (after.hashed, after.verified) == (before.hashed, before.verified)

    # A real token still costs exactly one hash, and works once.
    token = await _reset_token(members, server, clock, smtp_server, request.login_id)
    reset = pb.CompletePasswordResetRequest(token=token, new_password=NEW_PASSWORD)
    await members.CompletePasswordReset(reset)
    assert server.vault.password_stats.hashed == after.hashed + 1
    assert await _code(members.CompletePasswordReset(reset)) == Code.INVALID_ARGUMENT
    assert server.vault.password_stats.hashed == after.hashed + 1
    await _authenticate(members, request.login_id, NEW_PASSWORD)


async def test_a_reset_refused_for_the_login_id_keeps_the_token(
    members: MemberServiceStub, server: RunningServer, clock: FrozenClock, smtp_server: SmtpServer
) -> None:
    """The login-ID rule is checked before the token is spent (and before hashing)."""
    request = sign_up_request(login_id="samename01")
    await members.SignUp(request)
    token = await _reset_token(members, server, clock, smtp_server, request.login_id)
    hashed = server.vault.password_stats.hashed
    same = pb.CompletePasswordResetRequest(token=token, new_password="SAMENAME01")
    error = await _error(members.CompletePasswordReset(same))
    assert field_violations(error) == {"new_password": "must differ from the login ID"}
    assert server.vault.password_stats.hashed == hashed
    await members.CompletePasswordReset(
        pb.CompletePasswordResetRequest(token=token, new_password=NEW_PASSWORD)
    )
    await _authenticate(members, request.login_id, NEW_PASSWORD)


# --- the password queue -------------------------------------------------------------------


async def test_a_burst_past_the_password_queue_is_refused_at_once_with_retry_info(
    members: MemberServiceStub, server: RunningServer, clock: FrozenClock, smtp_server: SmtpServer
) -> None:
    """With the argon2 thread busy, exactly QUEUE_LIMIT of 20 concurrent logins are
    admitted (they wait); the other 17 come back RESOURCE_EXHAUSTED with RetryInfo
    while those still wait, i.e. at once. Every other argon2 use is refused alike,
    a refused reset keeps its token, and once the thread is free every admitted
    login succeeds, and so does a later one. Nothing is DEADLINE_EXCEEDED or
    INTERNAL. Before the fix all 20 queued and nothing was refused."""
    request = sign_up_request()
    member_id = (await members.SignUp(request)).member_id
    token = await _reset_token(members, server, clock, smtp_server, request.login_id)
    session = await member_session(members, request)  # before the thread is held

    async with _password_thread_held(server):
        burst = [
            asyncio.ensure_future(_authenticate(members, request.login_id, request.password))
            for _ in range(20)
        ]
        refusals: list[grpc.aio.AioRpcError] = []
        pending = set(burst)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while len(refusals) < 20 - QUEUE_LIMIT and pending and loop.time() < deadline:
            done, pending = await asyncio.wait(
                pending, timeout=deadline - loop.time(), return_when=asyncio.FIRST_COMPLETED
            )
            for call in done:
                error = call.exception()
                assert isinstance(error, grpc.aio.AioRpcError), "admitted calls must wait"
                refusals.append(error)
        assert len(refusals) == 20 - QUEUE_LIMIT
        assert len(pending) == QUEUE_LIMIT  # admitted, waiting for the thread
        for error in refusals:
            assert 0 < _retry_delay(error) <= 5
            assert error_info(error).reason == "OVERLOADED"
            assert error_info(error).metadata["resource"] == "password_hashing"

        # Every argon2 use is behind the same queue, the decoy of an unknown login too.
        others: list[Awaitable[object]] = [
            _authenticate(members, "nobody0001", "whatever it is"),
            members.SignUp(sign_up_request(), timeout=CALL_TIMEOUT),
            members.ChangePassword(
                pb.ChangePasswordRequest(
                    member_id=member_id,
                    current_password=request.password,
                    new_password=NEW_PASSWORD,
                ),
                timeout=CALL_TIMEOUT,
                metadata=session,
            ),
            members.Withdraw(
                pb.WithdrawRequest(member_id=member_id, password=request.password),
                timeout=CALL_TIMEOUT,
                metadata=session,
            ),
            members.CompletePasswordReset(
                pb.CompletePasswordResetRequest(token=token, new_password=NEW_PASSWORD),
                timeout=CALL_TIMEOUT,
            ),
        ]
        for call in others:
            assert _retry_delay(await _error(call)) > 0
        assert not any(c.done() for c in pending)  # still waiting for the thread

    admitted = await asyncio.gather(*pending)
    assert {r.member_id for r in admitted} == {member_id}
    # Counted by the hasher too (a fresh server: nothing was refused before).
    assert server.vault.password_stats.refused == 20 - QUEUE_LIMIT + len(others)
    assert server.vault.password_stats.in_flight == 0
    # The refused reset did not spend the token; later logins work.
    await members.CompletePasswordReset(
        pb.CompletePasswordResetRequest(token=token, new_password=NEW_PASSWORD)
    )
    assert (await _authenticate(members, request.login_id, NEW_PASSWORD)).member_id == member_id


# --- the work after answering -------------------------------------------------------------


@contextlib.asynccontextmanager
async def _writes_held(server_settings: Settings) -> AsyncIterator[None]:
    """Hold the database so the recovery work (which writes) cannot finish: SQLite's
    write lock from a second connection (the server's writer waits in its busy
    timeout, 5 s; the test releases well before), PostgreSQL's members table in
    EXCLUSIVE mode (plain reads pass, the recovery transaction's FOR SHARE waits)."""
    assert server_settings.database_url is not None
    url = server_settings.database_url.get_secret_value()
    if url.startswith("sqlite:///"):
        conn = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            yield
            conn.execute("ROLLBACK")
        finally:
            conn.close()
        return
    pg = await asyncpg.connect(url)
    try:
        async with pg.transaction():
            await pg.execute("LOCK TABLE members IN EXCLUSIVE MODE")
            yield
    finally:
        await pg.close()


async def test_recovery_work_in_flight_is_capped_alike_for_every_account(
    members: MemberServiceStub,
    server: RunningServer,
    server_settings: Settings,
    clock: FrozenClock,
) -> None:
    """RECOVERY_LIMIT tasks are held in flight; the next FindLoginId and
    StartPasswordReset are refused before any lookup, with one and the same status
    whether the account exists or not. Once the work drains, calls are answered
    again and the held work was done. Before the fix nothing was ever refused."""
    request = sign_up_request()
    member_id = (await members.SignUp(request)).member_id
    unknown = "nobody@example.com"

    async with _writes_held(server_settings):
        for accepted in (
            members.FindLoginId(pb.FindLoginIdRequest(email=request.email)),
            members.FindLoginId(pb.FindLoginIdRequest(email=unknown)),
            members.StartPasswordReset(pb.StartPasswordResetRequest(login_id=request.login_id)),
        ):
            assert await _code(accepted) == Code.OK
        refused = [
            await _error(call)
            for call in (
                members.FindLoginId(pb.FindLoginIdRequest(email=request.email)),
                members.FindLoginId(pb.FindLoginIdRequest(email=unknown)),
                members.StartPasswordReset(pb.StartPasswordResetRequest(login_id=request.login_id)),
                members.StartPasswordReset(pb.StartPasswordResetRequest(login_id="nobody0001")),
                members.StartPasswordReset(pb.StartPasswordResetRequest(email=unknown)),
            )
        ]
    # The same answer for every account: code, message, details (RetryInfo included).
    assert len({(e.code(), e.details(), rich_status(e).SerializeToString()) for e in refused}) == 1
    assert _retry_delay(refused[0]) > 0
    assert error_info(refused[0]).metadata["resource"] == "account_recovery"

    await server.vault.settle()
    queued = await outbox(server.vault.parts.store, clock)
    assert sorted(m.kind for m in queued if m.member_id == member_id) == [
        LOGIN_ID_REMINDER,
        PASSWORD_RESET,
    ]
    assert await _code(members.FindLoginId(pb.FindLoginIdRequest(email=unknown))) == Code.OK
    await server.vault.settle()


# --- recovery mails per member and hour ---------------------------------------------------


@pytest.fixture
def vault_log_events() -> Iterator[list[dict[str, Any]]]:
    """The vault's log events while the test runs. structlog caches a logger on first
    use together with the processor list configured then; the facade's logger is
    made to bind afresh, so the capture sees it whatever ran before (issue 8, 15)."""
    vars(facade.log).pop("bind", None)
    with capture_logs() as events:
        yield events
    vars(facade.log).pop("bind", None)


async def test_recovery_mails_per_member_and_hour_are_limited_across_replicas(
    server_settings: Settings, clock: FrozenClock, vault_log_events: list[dict[str, Any]]
) -> None:
    """35 anonymous calls for one member, concurrently, split over two servers on
    one database: every answer is the same OK, and exactly RECOVERY_MAILS_PER_HOUR
    mails are queued (the count is in the database, so replicas share it). The
    limit is per member and over the last hour. The log says when the limit is hit,
    with no address or login ID. Before the fix 35 mails were queued."""
    settings = server_settings.model_copy(update={"recovery_queue_limit": 64})
    request, bystander = sign_up_request(), sign_up_request()
    async with (
        run_server(settings, clock=clock) as one,
        run_server(settings, clock=clock) as two,
        grpc.aio.insecure_channel(one.target) as ch1,
        grpc.aio.insecure_channel(two.target) as ch2,
    ):
        stubs = (MemberServiceStub(ch1), MemberServiceStub(ch2))
        member_id = (await stubs[0].SignUp(request)).member_id
        other_id = (await stubs[1].SignUp(bystander)).member_id

        def call(i: int) -> Awaitable[object]:
            stub = stubs[i % 2]
            if i % 3 == 0:
                return stub.FindLoginId(pb.FindLoginIdRequest(email=request.email))
            if i % 3 == 1:
                reset = pb.StartPasswordResetRequest(login_id=request.login_id)
            else:
                reset = pb.StartPasswordResetRequest(email=request.email.upper())
            return stub.StartPasswordReset(reset)

        answers = await asyncio.gather(*(call(i) for i in range(35)))
        assert {a.SerializeToString() for a in answers} == {b""}  # all the same empty OK

        async def mails(mid: str) -> list[OutboxMessage]:
            await one.vault.settle()
            await two.vault.settle()
            queued = await outbox(one.vault.parts.store, clock)
            return [m for m in queued if m.member_id == mid]

        first = await mails(member_id)
        assert len(first) == MAILS_PER_HOUR
        assert {m.kind for m in first} <= {LOGIN_ID_REMINDER, PASSWORD_RESET}

        # Per member: the bystander still gets theirs.
        await stubs[0].FindLoginId(pb.FindLoginIdRequest(email=bystander.email))
        assert len(await mails(other_id)) == 1

        # Over the last hour: still full a minute before the first mails age out ...
        clock.advance(timedelta(minutes=59))
        await stubs[1].FindLoginId(pb.FindLoginIdRequest(email=request.email))
        assert len(await mails(member_id)) == MAILS_PER_HOUR
        # ... and one more once they have.
        clock.advance(timedelta(minutes=1, seconds=1))
        for stub in stubs:
            await stub.FindLoginId(pb.FindLoginIdRequest(email=request.email))
        assert len(await mails(member_id)) == MAILS_PER_HOUR + 2

    hits = [e for e in vault_log_events if e["event"] == "recovery_mail_limit_reached"]
    assert len(hits) == 35 - MAILS_PER_HOUR + 1
    logged = repr(vault_log_events)
    for secret in (request.email, request.email.upper(), request.login_id, member_id):
        assert secret not in logged
