"""Idempotent SignUp and RecordAccess (AIP-155) over gRPC, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import grpc
import pytest
from grpc_support import error_info, field_violations, sign_up_request, vault_session

from privacyvault.v1 import member_pb2 as pb
from privacyvault.v1.member_pb2_grpc import MemberServiceStub
from service.server import RunningServer
from vault import FrozenClock

REQUEST_ID = "6f1c2f0e-4a51-4f5e-9a55-0c3e1b0f2a77"


async def _history(members: MemberServiceStub, server: RunningServer, member_id: str) -> list[str]:
    # A session from the vault itself: a login would add an entry to the history.
    session = await vault_session(server, member_id)
    page = await members.ListAccessHistory(
        pb.ListAccessHistoryRequest(member_id=member_id), metadata=session
    )
    return [e.action for e in page.entries]


async def test_sign_up_retry_returns_the_first_member(
    members: MemberServiceStub, server: RunningServer
) -> None:
    request = sign_up_request(request_id=REQUEST_ID)
    first = (await members.SignUp(request)).member_id
    assert (await members.SignUp(request)).member_id == first  # not ALREADY_EXISTS
    # Without the id, the same request is a second sign-up: the login ID is taken.
    plain = pb.SignUpRequest()
    plain.CopyFrom(request)
    plain.request_id = ""
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await members.SignUp(plain)
    assert raised.value.code() == grpc.StatusCode.ALREADY_EXISTS


async def test_concurrent_retries_make_one_member(
    members: MemberServiceStub, server: RunningServer
) -> None:
    request = sign_up_request(request_id=REQUEST_ID)
    answers = await asyncio.gather(*(members.SignUp(request) for _ in range(2)))
    assert answers[0].member_id == answers[1].member_id
    row = await server.vault.parts.store.find_member(
        "login_id", server.vault.parts.indexes.login_id(request.login_id)
    )
    assert row is not None
    assert row.member_id == answers[0].member_id


async def test_same_id_with_another_request_is_invalid(members: MemberServiceStub) -> None:
    await members.SignUp(sign_up_request(request_id=REQUEST_ID))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await members.SignUp(sign_up_request(request_id=REQUEST_ID))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(raised.value).reason == "IDEMPOTENCY_KEY_REUSED"
    assert set(field_violations(raised.value)) == {"request_id"}


async def test_malformed_request_id_is_invalid(members: MemberServiceStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await members.SignUp(sign_up_request(request_id="no spaces allowed"))
    assert set(field_violations(raised.value)) == {"request_id"}


async def test_request_ids_expire_after_a_day(
    members: MemberServiceStub, clock: FrozenClock
) -> None:
    await members.SignUp(sign_up_request(request_id=REQUEST_ID))
    clock.advance(timedelta(hours=24, seconds=1))
    # A new request under the old id is a new request now.
    await members.SignUp(sign_up_request(request_id=REQUEST_ID))


async def test_record_access_retries_write_once(
    members: MemberServiceStub, server: RunningServer
) -> None:
    member_id = (await members.SignUp(sign_up_request())).member_id
    request = pb.RecordAccessRequest(
        member_id=member_id, action="order.view", ip="192.0.2.5", request_id=REQUEST_ID
    )
    await members.RecordAccess(request)
    await members.RecordAccess(request)
    await asyncio.gather(
        *(
            members.RecordAccess(
                pb.RecordAccessRequest(
                    member_id=member_id, action="cart.view", ip="192.0.2.5", request_id="retry-2"
                )
            )
            for _ in range(2)
        )
    )
    assert sorted(await _history(members, server, member_id)) == ["cart.view", "order.view"]
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await members.RecordAccess(
            pb.RecordAccessRequest(
                member_id=member_id, action="order.pay", ip="192.0.2.5", request_id=REQUEST_ID
            )
        )
    assert error_info(raised.value).reason == "IDEMPOTENCY_KEY_REUSED"
    assert len(await _history(members, server, member_id)) == 2
