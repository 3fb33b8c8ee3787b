"""Who is calling (issue 10, item 1): caller identities over real mTLS channels, the
caller policy and its reload, x-forwarded-client-cert, the caller recorded with
access-log entries (both backends) and key events, and the embedded ``local``.

Certificates are made here (tests/tls_support.py). Production's start-up checks are
in test_caller_policy.py (server processes), with the policy parser."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_support import (
    ADMIN_TOKEN,
    CLIENT_IP,
    SESSION_KEY,
    admin_metadata,
    error_info,
    sign_up_request,
    vault_session,
)
from pydantic import SecretStr
from structlog.testing import capture_logs
from tls_support import TestPki

from privacyvault.v1 import key_admin_pb2 as kpb
from privacyvault.v1 import member_pb2 as pb
from privacyvault.v1.key_admin_pb2_grpc import KeyAdminServiceStub
from privacyvault.v1.member_pb2_grpc import MemberServiceStub
from service.config import Settings
from service.server import RunningServer, run_server
from vault import FrozenClock

DOMAIN = "example.org"
HELPDESK = "spiffe://example.org/ns/support/sa/helpdesk"
PORTAL = "spiffe://example.org/ns/web/sa/portal"
ORDERS = "spiffe://example.org/ns/shop/sa/orders"
IDENTIFIER = "spiffe://example.org/ns/login/sa/identify"
STRANGER = "spiffe://example.org/ns/other/sa/unknown"
SECURITY = "spiffe://example.org/ns/security/sa/keys"
ENVOY = "spiffe://example.org/ns/mesh/sa/envoy"

POLICY = f"""
trust_domain = "{DOMAIN}"

[[caller]]
identity = "{PORTAL}"
description = "the member portal"
methods = ["MemberService/SignUp", "MemberService/Authenticate",
           "MemberService/ListAccessHistory", "MemberService/ExportMemberData",
           "MemberService/GetMember"]
purposes = ["MEMBER_REQUEST"]

[[caller]]
identity = "{ORDERS}"
methods = ["MemberService/RecordAccess"]

[[caller]]
identity = "{IDENTIFIER}"
methods = ["MemberService/GetMember"]
purposes = ["IDENTIFICATION"]

[[caller]]
identity = "spiffe://example.org/ns/support/*"
methods = ["MemberService/GetMember", "MemberService/RecordAccess"]
purposes = ["INQUIRY"]

[[caller]]
identity = "spiffe://example.org/ns/support/sa/intern"
methods = ["MemberService/GetMember"]
purposes = ["IDENTIFICATION"]

[[caller]]
identity = "{SECURITY}"
methods = ["KeyAdminService/RotateKek", "KeyAdminService/ListKeyEvents"]
"""


def write_policy(path: Path, text: str) -> Path:
    """Replace the file at once (a new inode), as a config management tool would."""
    staged = path.with_suffix(".new")
    staged.write_text(text)
    os.replace(staged, path)
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    return TestPki.create(tmp_path_factory.mktemp("pki"))


def mtls_settings(base: Settings, pki: TestPki, policy: Path | None, **extra: Any) -> Settings:
    update: dict[str, Any] = {
        "tls_cert_file": pki.server_cert,
        "tls_key_file": pki.server_key,
        "tls_client_ca_file": pki.ca_cert,
        "caller_policy_file": policy,
        "caller_policy_check_seconds": 0,  # every call checks the file: no sleeps
    }
    return base.model_copy(update=update | extra)


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    return write_policy(tmp_path / "callers.toml", POLICY)


@pytest.fixture
async def mtls_server(
    server_settings: Settings, pki: TestPki, policy_file: Path, clock: FrozenClock
) -> AsyncIterator[RunningServer]:
    async with run_server(mtls_settings(server_settings, pki, policy_file), clock=clock) as s:
        yield s


@contextlib.asynccontextmanager
async def stub(pki: TestPki, server: RunningServer, *uris: str) -> AsyncIterator[Any]:
    async with pki.channel(server.target, *uris) as channel:
        yield MemberServiceStub(channel)


async def refused(call: Any) -> grpc.aio.AioRpcError:
    """The error of a call that must fail with PERMISSION_DENIED CALLER_NOT_ALLOWED."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED, caught.value.details()
    assert error_info(caught.value).reason == "CALLER_NOT_ALLOWED"
    return caught.value


async def signed_up(pki: TestPki, server: RunningServer) -> tuple[str, pb.SignUpRequest]:
    """A member who consented to inquiries, signed up by the portal."""
    request = sign_up_request(consents=[pb.ConsentChoice(purpose=pb.PURPOSE_INQUIRY, granted=True)])
    async with stub(pki, server, PORTAL) as portal:
        return (await portal.SignUp(request)).member_id, request


# --- identities ----------------------------------------------------------------------------


async def test_a_client_without_a_certificate_cannot_connect(
    mtls_server: RunningServer, pki: TestPki
) -> None:
    async with grpc.aio.secure_channel(mtls_server.target, pki.credentials(None)) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await MemberServiceStub(channel).SignUp(sign_up_request(), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


BAD_CERTIFICATES = {
    "no-uri-san": (),
    "two-uri-sans": (PORTAL, ORDERS),
    "foreign-trust-domain": ("spiffe://evil.example/ns/web/sa/portal",),
    "not-spiffe": ("https://example.org/ns/web/sa/portal",),
    "unknown-identity": (STRANGER,),
}


@pytest.mark.parametrize("uris", BAD_CERTIFICATES.values(), ids=BAD_CERTIFICATES.keys())
async def test_a_certificate_without_one_known_spiffe_id_is_refused(
    mtls_server: RunningServer, pki: TestPki, uris: tuple[str, ...]
) -> None:
    async with stub(pki, mtls_server, *uris) as members:
        error = await refused(members.SignUp(sign_up_request()))
    info = error_info(error)
    if uris == (STRANGER,):  # an identity, refused by the policy: named back
        assert dict(info.metadata) == {"identity": STRANGER, "method": "MemberService/SignUp"}
    else:  # nothing from a certificate that was not accepted is repeated
        assert dict(info.metadata) == {}
        assert not any(u in error.details() for u in uris)


async def test_a_caller_allowed_identification_only(
    mtls_server: RunningServer, pki: TestPki
) -> None:
    member_id, request = await signed_up(pki, mtls_server)
    async with stub(pki, mtls_server, IDENTIFIER) as identifier:
        read = pb.GetMemberRequest(member_id=member_id, purpose=pb.PURPOSE_IDENTIFICATION)
        member = (await identifier.GetMember(read)).member
        assert member.login_id == request.login_id
        assert not member.HasField("mobile_phone")
        for purpose in (pb.PURPOSE_INQUIRY, pb.PURPOSE_MEMBER_REQUEST, pb.PURPOSE_STATISTICS):
            error = await refused(
                identifier.GetMember(pb.GetMemberRequest(member_id=member_id, purpose=purpose))
            )
            assert error_info(error).metadata["purpose"] == pb.Purpose.Name(purpose)[8:]
        await refused(identifier.ExportMemberData(pb.ExportMemberDataRequest(member_id=member_id)))
        await refused(
            identifier.RecordAccess(
                pb.RecordAccessRequest(member_id=member_id, action="order.view", ip="192.0.2.1")
            )
        )
        await refused(identifier.SignUp(sign_up_request()))
        # A purpose that is not one is invalid input, once the method is allowed.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await identifier.GetMember(pb.GetMemberRequest(member_id=member_id))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_prefix_identities_and_the_most_specific_entry(
    mtls_server: RunningServer, pki: TestPki
) -> None:
    member_id, _ = await signed_up(pki, mtls_server)
    inquiry = pb.GetMemberRequest(member_id=member_id, purpose=pb.PURPOSE_INQUIRY)
    async with stub(pki, mtls_server, HELPDESK) as helpdesk:
        assert (await helpdesk.GetMember(inquiry)).member.name
    async with stub(pki, mtls_server, "spiffe://example.org/ns/support/sa/a/b") as deeper:
        assert (await deeper.GetMember(inquiry)).member.name
    async with stub(pki, mtls_server, "spiffe://example.org/ns/support/sa/intern") as intern:
        await refused(intern.GetMember(inquiry))  # its own entry, narrower than ns/support/*
    async with stub(pki, mtls_server, "spiffe://example.org/ns/supportive/sa/x") as near:
        await refused(near.GetMember(inquiry))  # a prefix ends at a path segment


# --- the policy file changes -----------------------------------------------------------------


async def test_a_policy_change_applies_without_restart_and_a_bad_one_is_refused(
    mtls_server: RunningServer, pki: TestPki, policy_file: Path
) -> None:
    member_id, _ = await signed_up(pki, mtls_server)
    inquiry = pb.GetMemberRequest(member_id=member_id, purpose=pb.PURPOSE_INQUIRY)
    async with stub(pki, mtls_server, IDENTIFIER) as identifier:
        await refused(identifier.GetMember(inquiry))
        widened = POLICY.replace('purposes = ["IDENTIFICATION"]', 'purposes = ["INQUIRY"]', 1)
        write_policy(policy_file, widened)
        assert (await identifier.GetMember(inquiry)).member.name

        secret_marker = "do-not-log-this-0123"
        broken = widened + f'\n[[caller]]\nidentity = "{ORDERS}"\nmethods = ["{secret_marker}"]\n'
        with capture_logs() as logs:
            write_policy(policy_file, broken)
            assert (await identifier.GetMember(inquiry)).member.name  # the last valid one
        refusals = [e for e in logs if e["event"] == "caller_policy_refused"]
        assert len(refusals) == 1
        assert "caller[6]" in refusals[0]["error"]
        assert "not a method of the API" in refusals[0]["error"]
        assert secret_marker not in json.dumps(logs, default=str)

        write_policy(policy_file, POLICY)  # valid again: applies
        await refused(identifier.GetMember(inquiry))


# --- x-forwarded-client-cert ---------------------------------------------------------------


def _xfcc(*elements: str) -> tuple[tuple[str, str], ...]:
    return (("x-forwarded-client-cert", ",".join(elements)),)


async def _history_callers(pki: TestPki, server: RunningServer, member_id: str) -> list[str]:
    # A session from the vault itself: a login would add an entry to the history.
    session = await vault_session(server, member_id)
    async with stub(pki, server, PORTAL) as portal:
        page = await portal.ListAccessHistory(
            pb.ListAccessHistoryRequest(member_id=member_id), metadata=session
        )
    return [e.caller for e in page.entries]


async def test_xfcc_is_honoured_from_loopback_when_trusted(
    server_settings: Settings, pki: TestPki, policy_file: Path, clock: FrozenClock
) -> None:
    settings = mtls_settings(server_settings, pki, policy_file, trust_forwarded_client_cert=True)
    element = f'By={ENVOY};Hash=1f2e;Subject="CN=helpdesk, O=Support";URI={HELPDESK}'
    async with run_server(settings, clock=clock) as server:
        member_id, _ = await signed_up(pki, server)
        record = pb.RecordAccessRequest(member_id=member_id, action="ticket.open", ip="192.0.2.9")
        async with stub(pki, server, ENVOY) as sidecar:
            await refused(sidecar.RecordAccess(record))  # the sidecar itself: not allowed
            await sidecar.RecordAccess(record, metadata=_xfcc(element))
            await refused(sidecar.RecordAccess(record, metadata=_xfcc(element, element)))
            two_uris = f"By={ENVOY};URI={HELPDESK};URI={ORDERS}"
            await refused(sidecar.RecordAccess(record, metadata=_xfcc(two_uris)))
            foreign = "URI=spiffe://evil.example/ns/support/sa/helpdesk"
            await refused(sidecar.RecordAccess(record, metadata=_xfcc(foreign)))
        assert await _history_callers(pki, server, member_id) == [HELPDESK]


async def test_xfcc_is_ignored_without_the_setting(
    mtls_server: RunningServer, pki: TestPki
) -> None:
    member_id, _ = await signed_up(pki, mtls_server)
    record = pb.RecordAccessRequest(member_id=member_id, action="ticket.open", ip="192.0.2.9")
    async with stub(pki, mtls_server, ENVOY) as sidecar:
        await refused(sidecar.RecordAccess(record, metadata=_xfcc(f"URI={HELPDESK}")))
    async with stub(pki, mtls_server, ORDERS) as orders:  # named by its own certificate
        await orders.RecordAccess(record, metadata=_xfcc(f"URI={HELPDESK}"))
    assert await _history_callers(pki, mtls_server, member_id) == [ORDERS]


def _non_loopback_address() -> str | None:
    """This host's address on its default route (a UDP "connect" sends nothing)."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))
        address = str(s.getsockname()[0])
        return None if address.startswith("127.") else address
    return None


async def test_xfcc_is_ignored_from_a_peer_beyond_loopback(
    server_settings: Settings, pki: TestPki, policy_file: Path, clock: FrozenClock
) -> None:
    address = _non_loopback_address()
    if address is None:
        pytest.skip("this host has no non-loopback IPv4 address")
    settings = mtls_settings(
        server_settings,
        pki,
        policy_file,
        trust_forwarded_client_cert=True,
        listen_address=f"{address}:0",
    )
    options = (("grpc.ssl_target_name_override", "localhost"),)

    def channel(port: int, uri: str) -> grpc.aio.Channel:
        credentials = pki.credentials(pki.client(uri))
        return grpc.aio.secure_channel(f"{address}:{port}", credentials, options=options)

    async with run_server(settings, clock=clock) as server:
        async with channel(server.port, PORTAL) as portal:
            member_id = (await MemberServiceStub(portal).SignUp(sign_up_request())).member_id
        async with channel(server.port, ENVOY) as sidecar:
            record = pb.RecordAccessRequest(member_id=member_id, action="x.y", ip="192.0.2.9")
            call = MemberServiceStub(sidecar).RecordAccess(
                record, metadata=_xfcc(f"URI={HELPDESK}")
            )
            error = await refused(call)
    assert error_info(error).metadata["identity"] == ENVOY  # the connection's own


# --- the caller is recorded ----------------------------------------------------------------


async def test_the_caller_is_recorded_with_each_access_log_entry(
    mtls_server: RunningServer, pki: TestPki
) -> None:
    member_id, request = await signed_up(pki, mtls_server)
    login = pb.AuthenticateRequest(login_id=request.login_id, password=request.password)
    async with (
        stub(pki, mtls_server, PORTAL) as portal,
        stub(pki, mtls_server, ORDERS) as orders,
        stub(pki, mtls_server, HELPDESK) as helpdesk,
    ):
        # Concurrent calls of different callers: each entry names its own.
        await asyncio.gather(
            *(
                orders.RecordAccess(
                    pb.RecordAccessRequest(member_id=member_id, action="order.view", ip="192.0.2.1")
                )
                for _ in range(5)
            ),
            *(portal.Authenticate(login, metadata=CLIENT_IP) for _ in range(3)),
            helpdesk.RecordAccess(
                pb.RecordAccessRequest(member_id=member_id, action="ticket.open", ip="192.0.2.2")
            ),
        )
        session = await vault_session(mtls_server, member_id)
        page = await portal.ListAccessHistory(
            pb.ListAccessHistoryRequest(member_id=member_id, page_size=50), metadata=session
        )
        export = await portal.ExportMemberData(
            pb.ExportMemberDataRequest(member_id=member_id), metadata=session
        )
    listed = sorted((e.action, e.caller) for e in page.entries)
    assert listed == sorted(
        [("order.view", ORDERS)] * 5 + [("authenticate", PORTAL)] * 3 + [("ticket.open", HELPDESK)]
    )
    exported = json.loads(export.json)["access_history"]
    assert sorted((e["action"], e["caller"]) for e in exported) == listed


async def test_the_embedded_default_calls_everyone_local(
    server_settings: Settings, clock: FrozenClock
) -> None:
    with capture_logs() as logs:
        async with (
            run_server(server_settings, clock=clock) as server,
            grpc.aio.insecure_channel(server.target) as channel,
        ):
            members = MemberServiceStub(channel)
            request = sign_up_request()
            member_id = (await members.SignUp(request)).member_id
            login = pb.AuthenticateRequest(login_id=request.login_id, password=request.password)
            auth = await members.Authenticate(login, metadata=CLIENT_IP)
            page = await members.ListAccessHistory(
                pb.ListAccessHistoryRequest(member_id=member_id),
                metadata=((SESSION_KEY, auth.session_token),),
            )
    assert [e.caller for e in page.entries] == ["local"]
    said = [e for e in logs if e["event"] == "caller_identity"]
    assert said
    assert said[0]["identity"] == "every caller is local"
    assert "development policy" in said[0]["policy"]


async def test_key_events_record_the_calling_service(
    server_settings: Settings, pki: TestPki, policy_file: Path, clock: FrozenClock
) -> None:
    settings = mtls_settings(server_settings, pki, policy_file, admin_token=SecretStr(ADMIN_TOKEN))
    async with run_server(settings, clock=clock) as server:
        async with pki.channel(server.target, SECURITY) as channel:
            keys = KeyAdminServiceStub(channel)
            await keys.RotateKek(kpb.RotateKekRequest(), metadata=admin_metadata("alice"))
            events = (
                await keys.ListKeyEvents(kpb.ListKeyEventsRequest(), metadata=admin_metadata("a"))
            ).events
            # Not listed for this caller: refused whatever the token says.
            await refused(
                keys.GetKeyStatus(kpb.GetKeyStatusRequest(), metadata=admin_metadata("a"))
            )
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await keys.RotateKek(
                    kpb.RotateKekRequest(),
                    metadata=(("authorization", "Bearer wrong-token-0123456789"), ("x-actor", "a")),
                )
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert error_info(caught.value).reason == "ADMIN_TOKEN_INVALID"
        async with pki.channel(server.target, PORTAL) as channel:
            await refused(
                KeyAdminServiceStub(channel).RotateKek(
                    kpb.RotateKekRequest(), metadata=admin_metadata("alice")
                )
            )
    assert (events[0].operation, events[0].actor, events[0].caller) == (
        "rotate_kek",
        "alice",
        SECURITY,
    )
    assert (events[-1].operation, events[-1].caller) == ("create_kek_version", "internal")
