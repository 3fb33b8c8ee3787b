"""The suite does not depend on the order its tests run in (issue 8, item 15).

Two causes of failures that came and went with the order: structlog's cached
loggers kept the configuration (and the stream) in force when each was first
used, so a test's log capture depended on which test logged first; and every
test server ran the lifecycle sidecar on real time, whose relay wrote .eml files
into the data directory while a test read it. The whole suite is also run in
random orders (pytest-randomly, see conftest.py); these tests pin the two causes.
"""

from __future__ import annotations

import io
import json
from datetime import timedelta

import grpc
import pytest
from structlog.testing import capture_logs

from privacyvault.v1 import member_pb2 as pb
from privacyvault.v1 import member_pb2_grpc
from service.config import Settings
from service.logs import configure_logging
from service.server import RunningServer
from service.sidecar import LEASE_NAME
from vault import FrozenClock

BAD_ID = pb.GetMemberRequest(member_id="not-a-member-id", purpose=pb.PURPOSE_IDENTIFICATION)


def _events(buffer: io.StringIO) -> list[str]:
    return [json.loads(line)["event"] for line in buffer.getvalue().splitlines() if line]


async def _refused(members: member_pb2_grpc.MemberServiceStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await members.GetMember(BAD_ID)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_new_log_configuration_reaches_loggers_already_used(
    members: member_pb2_grpc.MemberServiceStub,
) -> None:
    # First use of the RPC logger under one configuration (debug, into `first`) ...
    first, second = io.StringIO(), io.StringIO()
    configure_logging(level="debug", fmt="json", stream=first)
    await _refused(members)
    assert "rpc_refused" in _events(first)

    # ... and a second configuration still reaches it: its stream and its level.
    configure_logging(level="warning", fmt="json", stream=second)
    await _refused(members)  # an info event: below the level now
    assert _events(second) == []
    configure_logging(level="info", fmt="json", stream=second)
    await _refused(members)
    assert _events(second) == ["rpc_refused"]
    assert _events(first) == ["rpc_refused"]  # nothing more went to the old stream

    # structlog's own capture sees the cached logger too, at every level.
    with capture_logs() as captured:
        await _refused(members)
    assert [e["event"] for e in captured] == ["rpc_refused"]
    assert _events(second) == ["rpc_refused"]


async def test_test_servers_run_no_sidecar_on_real_time(
    server_settings: Settings, server: RunningServer, clock: FrozenClock
) -> None:
    assert not server_settings.sidecar_in_process_enabled
    async with grpc.aio.insecure_channel(server.target) as channel:
        await _refused(member_pb2_grpc.MemberServiceStub(channel))
    # Nobody holds the lifecycle lease: no round ran, none will.
    assert await server.vault.leases.acquire_lease(
        LEASE_NAME, "test:1:x", clock.now(), timedelta(minutes=1)
    )
