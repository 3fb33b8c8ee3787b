"""ListAccessHistory page tokens are authenticated and bound to their member (issue 8,
item 2): a crafted, altered, oversized or other member's token is INVALID_ARGUMENT
with a field violation on page_token, never INTERNAL, on SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import grpc
import pytest
from grpc_support import Metadata, error_info, field_violations, sign_up_request, vault_session

from privacyvault.v1 import consent_pb2 as cpb
from privacyvault.v1 import consent_pb2_grpc, disclosure_pb2_grpc
from privacyvault.v1 import disclosure_pb2 as dpb
from privacyvault.v1 import member_pb2 as pb
from privacyvault.v1.member_pb2_grpc import MemberServiceStub
from service.config import Settings
from service.server import RunningServer, run_server
from vault import FrozenClock, _hazmat, page_tokens
from vault.clock import to_micros

Code = grpc.StatusCode
_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


#: Each member's session (ListAccessHistory is the member's own right), by member id.
_SESSIONS: dict[str, Metadata] = {}


async def _member_with_history(
    members: MemberServiceStub, server: RunningServer, clock: FrozenClock, entries: int = 5
) -> str:
    member_id = (await members.SignUp(sign_up_request())).member_id
    # Started by the vault, not Authenticate: a login would be one more history entry.
    _SESSIONS[member_id] = await vault_session(server, member_id)
    for i in range(entries):
        clock.advance(timedelta(seconds=1))
        await members.RecordAccess(
            pb.RecordAccessRequest(member_id=member_id, action=f"page.view.{i}", ip="192.0.2.1")
        )
    return member_id


async def _first_token(members: MemberServiceStub, member_id: str) -> str:
    page = await members.ListAccessHistory(
        pb.ListAccessHistoryRequest(member_id=member_id, page_size=2),
        metadata=_SESSIONS[member_id],
    )
    assert page.next_page_token
    return page.next_page_token


async def _refused(members: MemberServiceStub, member_id: str, token: str) -> None:
    """The token is INVALID_ARGUMENT, with exactly one violation, on page_token."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await members.ListAccessHistory(
            pb.ListAccessHistoryRequest(member_id=member_id, page_size=2, page_token=token),
            metadata=_SESSIONS[member_id],
        )
    error = caught.value
    assert error.code() == Code.INVALID_ARGUMENT, (error.code(), error.details())
    assert set(field_violations(error)) == {"page_token"}
    assert token not in (error.details() or "")


def _old_format(micros: int | str, entry_id: int | str) -> str:
    """A token as the code before this fix made them: unauthenticated text."""
    raw = f"v1:{micros}:{entry_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


async def test_crafted_tokens_with_out_of_range_cursors_are_invalid_argument(
    members: MemberServiceStub, clock: FrozenClock, server: RunningServer
) -> None:
    member_id = await _member_with_history(members, server, clock)
    now = to_micros(clock.now())
    crafted = [
        _old_format(now, 2**63),  # was INTERNAL: OverflowError / DataError
        _old_format(now, -(2**63) - 1),
        _old_format(now, 2**64),
        _old_format(10**20, 1),
        _old_format(-(10**20), 1),
        _old_format(now, 1),  # well-formed in the old format: not authenticated
        # The new layout with a made-up tag.
        base64.urlsafe_b64encode(struct.pack(">Bqq", 2, now, 2**63 - 1) + b"\0" * 16)
        .decode()
        .rstrip("="),
    ]
    for token in crafted:
        await _refused(members, member_id, token)


async def test_authentic_tokens_with_out_of_range_cursors_are_refused(
    members: MemberServiceStub, clock: FrozenClock, server: RunningServer
) -> None:
    """Even a correctly tagged token is range-checked before its cursor reaches SQL
    (the key is the server's own, taken in-process to sign what it never issues)."""
    member_id = await _member_with_history(members, server, clock)
    key = server.vault.parts.page_token_key
    for version, micros, entry_id in [
        (2, to_micros(clock.now()), 0),
        (2, to_micros(clock.now()), -1),
        (2, 2**63 - 1, 1),
        (2, -(2**63), 1),
        (3, to_micros(clock.now()), 1),
    ]:
        cursor = struct.pack(">Bqq", version, micros, entry_id)
        tag = _hazmat.token_tag(key, page_tokens.page_token_data(member_id, cursor))
        token = base64.urlsafe_b64encode(cursor + tag).decode().rstrip("=")
        await _refused(members, member_id, token)


async def test_a_token_is_refused_for_another_member(
    members: MemberServiceStub, clock: FrozenClock, server: RunningServer
) -> None:
    first = await _member_with_history(members, server, clock)
    second = await _member_with_history(members, server, clock)
    token = await _first_token(members, first)
    await _refused(members, second, token)
    # Nor for a member that does not exist: no session is theirs, so the call is
    # refused before the token is even looked at.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await members.ListAccessHistory(
            pb.ListAccessHistoryRequest(
                member_id="00000000-0000-4000-8000-000000000000", page_size=2, page_token=token
            ),
            metadata=_SESSIONS[first],
        )
    assert caught.value.code() == Code.UNAUTHENTICATED
    # It still works for its own member.
    page = await members.ListAccessHistory(
        pb.ListAccessHistoryRequest(member_id=first, page_size=2, page_token=token),
        metadata=_SESSIONS[first],
    )
    assert [e.action for e in page.entries] == ["page.view.2", "page.view.1"]


async def test_tampered_tokens_are_refused(
    members: MemberServiceStub, clock: FrozenClock, server: RunningServer
) -> None:
    member_id = await _member_with_history(members, server, clock)
    token = await _first_token(members, member_id)
    tampered = {token[:-1], token + "A", token + "=", token + "==", token[1:], "", token.upper()}
    tampered.discard("")  # empty means the first page
    tampered.discard(token)
    for i, char in enumerate(token):
        other = _ALPHABET[(_ALPHABET.index(char) + 1) % len(_ALPHABET)]
        tampered.add(token[:i] + other + token[i + 1 :])
    tampered |= {"garbage!", "A" * 44, "A" * 128, "A" * 129, "A" * 60_000, "\u00e9" * 44}
    for bad in sorted(tampered):
        await _refused(members, member_id, bad)


async def test_a_token_pages_on_with_any_page_size(
    members: MemberServiceStub, clock: FrozenClock, server: RunningServer
) -> None:
    member_id = await _member_with_history(members, server, clock, entries=7)
    token = await _first_token(members, member_id)  # after page.view.6 and .5
    page = await members.ListAccessHistory(
        pb.ListAccessHistoryRequest(member_id=member_id, page_size=3, page_token=token),
        metadata=_SESSIONS[member_id],
    )
    assert [e.action for e in page.entries] == ["page.view.4", "page.view.3", "page.view.2"]
    rest = await members.ListAccessHistory(
        pb.ListAccessHistoryRequest(
            member_id=member_id, page_size=50, page_token=page.next_page_token
        ),
        metadata=_SESSIONS[member_id],
    )
    assert [e.action for e in rest.entries] == ["page.view.1", "page.view.0"]
    assert rest.next_page_token == ""


async def test_every_server_on_the_database_accepts_the_token(
    server_settings: Settings, clock: FrozenClock
) -> None:
    """The token key is derived from the stored index key, not made per process: a
    token from one server process pages on at another (a replica, or after a restart)."""
    async with (
        run_server(server_settings, clock=clock) as first,
        grpc.aio.insecure_channel(first.target) as channel,
    ):
        members = MemberServiceStub(channel)
        member_id = await _member_with_history(members, first, clock)
        token = await _first_token(members, member_id)
    async with (
        run_server(server_settings, clock=clock) as second,
        grpc.aio.insecure_channel(second.target) as channel,
    ):
        page = await MemberServiceStub(channel).ListAccessHistory(
            pb.ListAccessHistoryRequest(member_id=member_id, page_size=2, page_token=token),
            metadata=_SESSIONS[member_id],  # sessions, too, are in the shared database
        )
        assert [e.action for e in page.entries] == ["page.view.2", "page.view.1"]


def test_the_page_token_key_is_hkdf_of_the_index_key_under_its_own_purpose() -> None:
    """The derivation as documented in _hazmat, recomputed here by hand (RFC 5869
    HKDF-SHA256 with no salt), so a change of format cannot pass unnoticed."""
    material = bytes(range(32))
    index_key = _hazmat.IndexKey(1, material)
    data = b"some token data"

    def hkdf(info: bytes) -> bytes:
        prk = hmac.new(b"\0" * 32, material, hashlib.sha256).digest()
        return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()

    info = b"pv.derive" + struct.pack(">H", len(b"page-token")) + b"page-token"
    expected = hmac.new(hkdf(info), data, hashlib.sha256).digest()[:16]
    key = _hazmat.derive_mac_key(index_key, "page-token")
    assert _hazmat.token_tag(key, data) == expected
    assert _hazmat.token_tag_matches(key, data, expected)
    assert not _hazmat.token_tag_matches(key, data + b"x", expected)
    # Another purpose is another key; and no tag is a blind index of the same bytes.
    other = _hazmat.derive_mac_key(index_key, "another-purpose")
    assert _hazmat.token_tag(other, data) != expected
    assert _hazmat.blind_index(index_key, "page-token", data.decode())[:16] != expected
    assert repr(key) == "<MacKey id=1>"  # no key bytes


#: Every list RPC that pages, called with a request's fields and the member's session.
_LISTS: dict[str, Callable[[grpc.aio.Channel, dict[str, Any], Metadata], Awaitable[Any]]] = {
    "ListAccessHistory": lambda channel, fields, session: MemberServiceStub(
        channel
    ).ListAccessHistory(pb.ListAccessHistoryRequest(**fields), metadata=session),
    "ListConsentHistory": lambda channel, fields, session: consent_pb2_grpc.ConsentServiceStub(
        channel
    ).ListConsentHistory(cpb.ListConsentHistoryRequest(**fields), metadata=session),
    "ListDisclosures": lambda channel, fields, session: disclosure_pb2_grpc.DisclosureServiceStub(
        channel
    ).ListDisclosures(dpb.ListDisclosuresRequest(**fields), metadata=session),
    "ListCorrections": lambda channel, fields, session: MemberServiceStub(channel).ListCorrections(
        pb.ListCorrectionsRequest(**fields), metadata=session
    ),
}


@pytest.mark.parametrize("rpc", sorted(_LISTS))
async def test_every_list_checks_its_page_alike(
    rpc: str, members: MemberServiceStub, channel: grpc.aio.Channel, server: RunningServer
) -> None:
    member_id = (await members.SignUp(sign_up_request())).member_id
    session = await vault_session(server, member_id)
    bad = {"member_id": member_id, "page_size": -1, "page_token": "garbage!"}
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _LISTS[rpc](channel, bad, session)
    assert caught.value.code() == Code.INVALID_ARGUMENT
    assert error_info(caught.value).reason == "INVALID_ARGUMENT"
    assert field_violations(caught.value) == {
        "page_size": "must not be negative",
        "page_token": f"is not a token {rpc} returned for this member",
    }
    # More than the most is cut to it (AIP-158), not refused.
    page = await _LISTS[rpc](channel, {"member_id": member_id, "page_size": 2**31 - 1}, session)
    assert page.next_page_token == ""
