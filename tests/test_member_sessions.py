"""Member sessions over gRPC, on both backends: Authenticate's session token, the
member's own rights refused without it (MEMBER_SESSION_REQUIRED, one answer for
every case), expiry on the injected clock, EndSession, revocation by a password
change, a reset (both in the password write's own transaction: a crash right
after it leaves no session, and a reset no lock) and a shred, and the e-mail
change that needs the password and tells the old address (the account takeover
chain of issue 10)."""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from grpc_support import (
    SESSION_KEY,
    Metadata,
    error_info,
    field_violations,
    member_session,
    sign_up_request,
    signed_in,
)
from mail_support import SmtpServer, lf_body, mail_token, relay_for, smtp_mailer

from privacyvault.v1 import member_pb2 as pb
from privacyvault.v1.member_pb2_grpc import MemberServiceStub
from service.member_rights import MEMBER_RIGHTS
from service.server import RunningServer
from vault import FrozenClock
from vault.sessions import PURGE_BATCH, PURGE_EVERY
from vault.store.contracts.login_failures import FailedLogin

Code = grpc.StatusCode
NEW_PASSWORD = "a brand new passphrase 7"
UNKNOWN_MEMBER = "00000000-0000-4000-8000-000000000000"


def _calls(member_id: str) -> dict[str, Callable[[MemberServiceStub, Any], Awaitable[Any]]]:
    """One call of each member's-own-right RPC for ``member_id``, given metadata."""

    async def stream(m: MemberServiceStub, md: Any) -> Any:
        return [
            p
            async for p in m.StreamMemberData(
                pb.StreamMemberDataRequest(member_id=member_id), metadata=md
            )
        ]

    mask = FieldMask(paths=["name"])
    return {
        "GetMember": lambda m, md: m.GetMember(
            pb.GetMemberRequest(member_id=member_id, purpose=pb.PURPOSE_MEMBER_REQUEST), metadata=md
        ),
        "UpdateMember": lambda m, md: m.UpdateMember(
            pb.UpdateMemberRequest(member_id=member_id, name="New Name", update_mask=mask),
            metadata=md,
        ),
        "ChangePassword": lambda m, md: m.ChangePassword(
            pb.ChangePasswordRequest(
                member_id=member_id, current_password="wrong but long", new_password=NEW_PASSWORD
            ),
            metadata=md,
        ),
        "Withdraw": lambda m, md: m.Withdraw(
            pb.WithdrawRequest(member_id=member_id, password="wrong but long"), metadata=md
        ),
        "ExportMemberData": lambda m, md: m.ExportMemberData(
            pb.ExportMemberDataRequest(member_id=member_id), metadata=md
        ),
        "StreamMemberData": stream,
        "ListAccessHistory": lambda m, md: m.ListAccessHistory(
            pb.ListAccessHistoryRequest(member_id=member_id), metadata=md
        ),
        "EndSession": lambda m, md: m.EndSession(
            pb.EndSessionRequest(member_id=member_id), metadata=md
        ),
        "ListCorrections": lambda m, md: m.ListCorrections(
            pb.ListCorrectionsRequest(member_id=member_id), metadata=md
        ),
    }


async def _refused(call: Awaitable[Any]) -> tuple[Code, str, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    error = caught.value
    assert error.code() == Code.UNAUTHENTICATED, error.details()
    info = error_info(error)
    return error.code(), error.details() or "", info.reason


async def _needs_session(call: Awaitable[Any]) -> None:
    assert await _refused(call) == (
        Code.UNAUTHENTICATED,
        "this call needs the member's session (x-member-session)",
        "MEMBER_SESSION_REQUIRED",
    )


async def _get(members: MemberServiceStub, member_id: str, session: Metadata) -> pb.Member:
    request = pb.GetMemberRequest(member_id=member_id, purpose=pb.PURPOSE_MEMBER_REQUEST)
    return (await members.GetMember(request, metadata=session)).member


# --- the token ------------------------------------------------------------------------------


async def _stored_sessions(store_url: str) -> list[tuple[Any, ...]]:
    """Every column of every member_sessions row, read from the database itself."""
    if store_url.startswith("sqlite"):
        with sqlite3.connect(store_url.removeprefix("sqlite:///")) as conn:
            return list(conn.execute("SELECT * FROM member_sessions"))
    conn = await asyncpg.connect(store_url)
    try:
        return [tuple(r) for r in await conn.fetch("SELECT * FROM member_sessions")]
    finally:
        await conn.close()


async def test_the_token_is_random_and_stored_only_as_its_hash(
    members: MemberServiceStub, store_url: str
) -> None:
    request = sign_up_request()
    member_id = (await members.SignUp(request)).member_id
    tokens = {dict(await member_session(members, request))[SESSION_KEY] for _ in range(3)}
    assert len(tokens) == 3
    assert all(len(t) == 43 for t in tokens)  # 256 bits, URL-safe base64

    rows = await _stored_sessions(store_url)
    assert {bytes(r[0]) for r in rows} == {hashlib.sha256(t.encode()).digest() for t in tokens}
    assert {str(r[1]) for r in rows} == {member_id}
    stored = repr(rows)
    assert not any(token in stored or token.encode().hex() in stored for token in tokens)
    if store_url.startswith("sqlite"):
        path = Path(store_url.removeprefix("sqlite:///"))
        raw = b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))
        assert not any(token.encode() in raw for token in tokens)


# --- the member's own rights need the member's session -------------------------------------


async def test_every_member_right_is_refused_alike_without_that_members_session(
    members: MemberServiceStub, clock: FrozenClock
) -> None:
    expired_id, expired = await signed_in(members)
    clock.advance(timedelta(minutes=15))
    victim, _ = await signed_in(members)
    other_id, other_session = await signed_in(members)
    ended_id, ended = await signed_in(members)
    await members.EndSession(pb.EndSessionRequest(member_id=ended_id), metadata=ended)
    sessions: dict[str, tuple[str, Any]] = {
        "missing": (victim, ()),
        "empty": (victim, ((SESSION_KEY, ""),)),
        "malformed": (victim, ((SESSION_KEY, "not a token!"),)),
        "unknown": (victim, ((SESSION_KEY, "A" * 43),)),
        "another member's": (victim, other_session),
        "ended": (ended_id, ended),
        "expired": (expired_id, expired),
        "unknown member": (UNKNOWN_MEMBER, other_session),
    }
    assert set(_calls(victim)) == set(MEMBER_RIGHTS)
    for member_id, metadata in sessions.values():
        for call in _calls(member_id).values():
            await _needs_session(call(members, metadata))
    # A malformed member id is a bad request, as everywhere (its form is public).
    for call in _calls("not-a-member-id").values():
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(members, other_session)
        assert caught.value.code() == Code.INVALID_ARGUMENT
        assert set(field_violations(caught.value)) == {"member_id"}
    # The other member's session is live: it was refused for being another's.
    assert (await _get(members, other_id, other_session)).member_id == other_id
    # Other purposes are calling services' reads: no member session.
    read = await members.GetMember(
        pb.GetMemberRequest(member_id=victim, purpose=pb.PURPOSE_IDENTIFICATION)
    )
    assert read.member.member_id == victim


async def test_a_session_opens_the_members_own_rights(members: MemberServiceStub) -> None:
    member_id, session = await signed_in(members, mobile_phone="+15550100")
    member = await _get(members, member_id, session)
    assert member.mobile_phone == "+15550100"
    history = await members.ListAccessHistory(
        pb.ListAccessHistoryRequest(member_id=member_id), metadata=session
    )
    assert [e.action for e in history.entries] == ["authenticate"]
    assert (
        await members.ExportMemberData(
            pb.ExportMemberDataRequest(member_id=member_id), metadata=session
        )
    ).json


# --- lifetimes ----------------------------------------------------------------------------------


async def test_a_session_idles_out_after_15_minutes_without_use(
    members: MemberServiceStub, clock: FrozenClock
) -> None:
    member_id, session = await signed_in(members)
    for _ in range(4):  # each use starts the idle time again
        clock.advance(timedelta(minutes=14))
        await _get(members, member_id, session)
    clock.advance(timedelta(minutes=15))
    await _needs_session(_get(members, member_id, session))


async def test_a_session_ends_12_hours_after_the_login_however_used(
    members: MemberServiceStub, clock: FrozenClock
) -> None:
    member_id, session = await signed_in(members)
    for _ in range(71):  # 11 h 50 min of use every 10 minutes
        clock.advance(timedelta(minutes=10))
        await _get(members, member_id, session)
    clock.advance(timedelta(minutes=10))
    await _needs_session(_get(members, member_id, session))


async def test_end_session_ends_only_that_session(members: MemberServiceStub) -> None:
    request = sign_up_request()
    member_id = (await members.SignUp(request)).member_id
    first, second = await member_session(members, request), await member_session(members, request)
    ended = await members.EndSession(pb.EndSessionRequest(member_id=member_id), metadata=first)
    assert ended == pb.EndSessionResponse()
    await _needs_session(_get(members, member_id, first))
    await _needs_session(
        members.EndSession(pb.EndSessionRequest(member_id=member_id), metadata=first)
    )
    assert (await _get(members, member_id, second)).member_id == member_id


async def test_a_members_21st_session_ends_the_oldest(
    members: MemberServiceStub, clock: FrozenClock, store_url: str
) -> None:
    request = sign_up_request()
    member_id = (await members.SignUp(request)).member_id
    sessions = []
    for _ in range(21):
        sessions.append(await member_session(members, request))
        clock.advance(timedelta(seconds=1))
    await _needs_session(_get(members, member_id, sessions[0]))
    for session in sessions[1:]:
        await _get(members, member_id, session)
    assert len(await _stored_sessions(store_url)) == 20


async def test_every_16th_login_purges_anyones_expired_sessions(
    members: MemberServiceStub, clock: FrozenClock, store_url: str
) -> None:
    """The login transaction deletes expired sessions only every PURGE_EVERY-th time
    (this server's first login is one): the others are a statement shorter."""
    assert (PURGE_BATCH, PURGE_EVERY) == (100, 16)  # six purged per login, one added
    expired_id, _ = await signed_in(members)  # login 0: purges (nothing yet)
    clock.advance(timedelta(minutes=16))  # its session is now idle-expired
    request = sign_up_request()
    await members.SignUp(request)
    for login in range(1, PURGE_EVERY + 1):
        await member_session(members, request)
        stored = {str(row[1]) for row in await _stored_sessions(store_url)}
        assert (expired_id in stored) == (login < PURGE_EVERY), login


# --- revocation ---------------------------------------------------------------------------------


async def test_a_password_change_ends_every_session(members: MemberServiceStub) -> None:
    request = sign_up_request()
    member_id = (await members.SignUp(request)).member_id
    first, second = await member_session(members, request), await member_session(members, request)
    await members.ChangePassword(
        pb.ChangePasswordRequest(
            member_id=member_id, current_password=request.password, new_password=NEW_PASSWORD
        ),
        metadata=first,
    )
    await _needs_session(_get(members, member_id, first))
    await _needs_session(_get(members, member_id, second))
    again = await member_session(members, request, password=NEW_PASSWORD)
    assert (await _get(members, member_id, again)).member_id == member_id


async def test_a_wrong_password_is_wrong_credentials_and_ends_nothing(
    members: MemberServiceStub,
) -> None:
    member_id, session = await signed_in(members)
    call = members.ChangePassword(
        pb.ChangePasswordRequest(
            member_id=member_id, current_password="not the password", new_password=NEW_PASSWORD
        ),
        metadata=session,
    )
    assert (await _refused(call))[2] == "WRONG_CREDENTIALS"
    assert (await _get(members, member_id, session)).member_id == member_id


async def test_a_password_reset_ends_every_session(
    members: MemberServiceStub, server: RunningServer, clock: FrozenClock, smtp_server: SmtpServer
) -> None:
    request = sign_up_request()
    member_id = (await members.SignUp(request)).member_id
    session = await member_session(members, request)
    await members.StartPasswordReset(pb.StartPasswordResetRequest(login_id=request.login_id))
    await server.vault.settle()
    assert await _relay(server, clock, smtp_server) == 1
    token = mail_token(lf_body(smtp_server.handler.received[-1].message))
    await members.CompletePasswordReset(
        pb.CompletePasswordResetRequest(token=token, new_password=NEW_PASSWORD)
    )
    await _needs_session(_get(members, member_id, session))


class _Crash(Exception):
    """The process dying right after the password write returned."""


def _crash_after_the_password_write(server: RunningServer, monkeypatch: Any) -> list[str]:
    """Make the vault fail right after the store's password write commits (as a crash
    would): whatever the vault did after it, in another transaction, is not done.
    The member ids written, in order."""
    store = server.vault.parts.store
    write = store.write_password
    written: list[str] = []

    async def then_crash(member_id: str, *args: Any, **kwargs: Any) -> bool:
        assert await write(member_id, *args, **kwargs)
        written.append(member_id)
        raise _Crash

    monkeypatch.setattr(store, "write_password", then_crash)
    return written


async def _member_sessions(store_url: str, member_id: str) -> int:
    return sum(str(r[1]) == member_id for r in await _stored_sessions(store_url))


async def test_a_crash_after_a_password_change_leaves_no_session(
    members: MemberServiceStub, server: RunningServer, store_url: str, monkeypatch: Any
) -> None:
    """The sessions end in the password write's own transaction, not after it."""
    request = sign_up_request()
    member_id = (await members.SignUp(request)).member_id
    first, second = await member_session(members, request), await member_session(members, request)
    bystander_id, bystander = await signed_in(members)
    written = _crash_after_the_password_write(server, monkeypatch)
    with pytest.raises(grpc.aio.AioRpcError):
        await members.ChangePassword(
            pb.ChangePasswordRequest(
                member_id=member_id, current_password=request.password, new_password=NEW_PASSWORD
            ),
            metadata=first,
        )
    assert written == [member_id]
    assert await _member_sessions(store_url, member_id) == 0
    await _needs_session(_get(members, member_id, first))
    await _needs_session(_get(members, member_id, second))
    assert (await _get(members, bystander_id, bystander)).member_id == bystander_id
    monkeypatch.undo()
    again = await member_session(members, request, password=NEW_PASSWORD)
    assert (await _get(members, member_id, again)).member_id == member_id


async def test_a_crash_after_a_reset_leaves_no_session_and_no_lock(
    members: MemberServiceStub,
    server: RunningServer,
    clock: FrozenClock,
    smtp_server: SmtpServer,
    store_url: str,
    monkeypatch: Any,
) -> None:
    """A reset ends the sessions and lifts even the permanent lock in the new
    password's own transaction."""
    request = sign_up_request()
    member_id = (await members.SignUp(request)).member_id
    session = await member_session(members, request)
    store = server.vault.parts.store
    row = await store.get_member(member_id)
    assert row is not None
    login_hmac = row.blind_indexes["login_id"]
    for _ in range(100):  # the permanent lock, counted directly (no argon2 work)
        await store.record_login_failure(FailedLogin(login_hmac, clock.now(), None))
    clock.advance(timedelta(days=60))
    with pytest.raises(grpc.aio.AioRpcError) as locked:
        await member_session(members, request)
    assert error_info(locked.value).reason == "WRONG_CREDENTIALS"

    await members.StartPasswordReset(pb.StartPasswordResetRequest(login_id=request.login_id))
    assert await _relay(server, clock, smtp_server) == 1
    token = mail_token(lf_body(smtp_server.handler.received[-1].message))
    written = _crash_after_the_password_write(server, monkeypatch)
    with pytest.raises(grpc.aio.AioRpcError):
        await members.CompletePasswordReset(
            pb.CompletePasswordResetRequest(token=token, new_password=NEW_PASSWORD)
        )
    assert written == [member_id]
    assert await _member_sessions(store_url, member_id) == 0
    await _needs_session(_get(members, member_id, session))
    assert (await store.login_failure_state(login_hmac, None)).failures == 0
    monkeypatch.undo()
    again = await member_session(members, request, password=NEW_PASSWORD)
    assert (await _get(members, member_id, again)).member_id == member_id


async def test_a_withdrawal_ends_every_session(members: MemberServiceStub, store_url: str) -> None:
    request = sign_up_request()
    member_id = (await members.SignUp(request)).member_id
    session = await member_session(members, request)
    await member_session(members, request)
    bystander_id, _ = await signed_in(members)
    await members.Withdraw(
        pb.WithdrawRequest(member_id=member_id, password=request.password), metadata=session
    )
    await _needs_session(
        members.EndSession(pb.EndSessionRequest(member_id=member_id), metadata=session)
    )
    left = {str(r[1]) for r in await _stored_sessions(store_url)}
    assert left == {bystander_id}


# --- the e-mail, the account's recovery channel ----------------------------------------------


async def _relay(server: RunningServer, clock: FrozenClock, smtp_server: SmtpServer) -> int:
    await server.vault.settle()
    return (await relay_for(server, smtp_mailer(smtp_server.port), clock).relay_once()).sent


def _email_change(member_id: str, email: str, password: str | None) -> pb.UpdateMemberRequest:
    return pb.UpdateMemberRequest(
        member_id=member_id,
        email=email,
        update_mask=FieldMask(paths=["email"]),
        **({} if password is None else {"current_password": password}),
    )


async def test_the_takeover_chain_fails_at_every_step(
    members: MemberServiceStub, server: RunningServer, clock: FrozenClock, smtp_server: SmtpServer
) -> None:
    """Issue 10: with a member id alone, the e-mail was changed, the reset code went to
    the new address and the password was changed. Now every step fails."""
    victim = sign_up_request()
    member_id = (await members.SignUp(victim)).member_id
    hostile = "attacker@example.net"

    # 1. No session: refused before anything else.
    await _needs_session(members.UpdateMember(_email_change(member_id, hostile, victim.password)))
    # 2. A session (stolen, say) without the password, or with a wrong one: refused.
    session = await member_session(members, victim)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await members.UpdateMember(_email_change(member_id, hostile, None), metadata=session)
    assert caught.value.code() == Code.INVALID_ARGUMENT
    assert set(field_violations(caught.value)) == {"current_password"}
    wrong = members.UpdateMember(
        _email_change(member_id, hostile, "a guessed password"), metadata=session
    )
    assert (await _refused(wrong))[2] == "WRONG_CREDENTIALS"
    assert (await _get(members, member_id, session)).email == victim.email
    # 3. A reset then still goes to the member's own address, and nothing to the attacker.
    await members.StartPasswordReset(pb.StartPasswordResetRequest(login_id=victim.login_id))
    assert await _relay(server, clock, smtp_server) == 1
    assert [m.rcpt_tos for m in smtp_server.handler.received] == [[victim.email]]
    assert smtp_server.handler.received[-1].message["Subject"] == "Reset your password"


async def test_a_legitimate_email_change_is_told_to_the_old_address(
    members: MemberServiceStub, server: RunningServer, clock: FrozenClock, smtp_server: SmtpServer
) -> None:
    request = sign_up_request()
    member_id = (await members.SignUp(request)).member_id
    session = await member_session(members, request)
    new_email = "moved-" + request.email
    changed = await members.UpdateMember(
        _email_change(member_id, new_email, request.password), metadata=session
    )
    assert changed.member.email == new_email
    queued = await server.vault.parts.store.due_outbox(clock.now() + timedelta(days=1), 10)
    assert [m.kind for m in queued] == ["email_changed"]
    # No address in the clear in the outbox: the old one is sealed under the DEK.
    assert request.email not in repr(queued[0].params)
    assert new_email not in repr(queued[0].params)

    assert await _relay(server, clock, smtp_server) == 1
    (got,) = smtp_server.handler.received
    assert got.rcpt_tos == [request.email]
    assert got.message["Subject"] == "The e-mail address of your account was changed"
    text = lf_body(got.message)
    assert "was changed on 15 June 2026 at 12:00 UTC" in text
    assert new_email not in str(got.message)
    # Recovery now goes to the new address.
    await members.StartPasswordReset(pb.StartPasswordResetRequest(login_id=request.login_id))
    assert await _relay(server, clock, smtp_server) == 1
    assert smtp_server.handler.received[-1].rcpt_tos == [new_email]


async def test_an_email_change_notice_is_dropped_with_a_shredded_member(
    members: MemberServiceStub, server: RunningServer, clock: FrozenClock, smtp_server: SmtpServer
) -> None:
    request = sign_up_request()
    member_id = (await members.SignUp(request)).member_id
    session = await member_session(members, request)
    await members.UpdateMember(
        _email_change(member_id, "elsewhere@example.net", request.password), metadata=session
    )
    await members.Withdraw(
        pb.WithdrawRequest(member_id=member_id, password=request.password), metadata=session
    )
    assert await server.vault.parts.store.due_outbox(clock.now() + timedelta(days=1), 10) == []
    assert await _relay(server, clock, smtp_server) == 0
    assert smtp_server.handler.received == []


async def test_update_member_answers_the_member_request_view(members: MemberServiceStub) -> None:
    member_id, session = await signed_in(members, mobile_phone="+15550100")
    reply = await members.UpdateMember(
        pb.UpdateMemberRequest(
            member_id=member_id, name="Renamed Member", update_mask=FieldMask(paths=["name"])
        ),
        metadata=session,
    )
    assert reply.member == await _get(members, member_id, session)
    assert reply.member.mobile_phone == "+15550100"
