"""The member's export works whatever their history (issue 8, item 6).

StreamMemberData sends the export document in bounded pieces for any history
size; ExportMemberData serves small records in one message and refuses a large
one with FAILED_PRECONDITION naming the stream, instead of an opaque send-limit
error. On SQLite and PostgreSQL, read over real gRPC.

Seeding: 50,000 RecordAccess calls would take minutes on a shared machine, so the
entries are encrypted by the vault's own code (``member_cipher.seal_access``, exactly
what RecordAccess stores) and inserted in one batch; the export is then read
over gRPC like any caller would.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta

import asyncpg
import grpc
import pytest
from grpc_support import Metadata, precondition_violation, sign_up_request, vault_session

from privacyvault.v1 import member_pb2 as pb
from privacyvault.v1.member_pb2_grpc import MemberServiceStub
from service.server import RunningServer
from vault import FrozenClock, member_cipher
from vault.clock import to_micros
from vault.errors import NotFound
from vault.facade import EXPORT_MAX_BYTES, EXPORT_PIECE_CHARS

Code = grpc.StatusCode
HISTORY = 50_000


def _ip(i: int) -> str:
    return f"198.51.{i // 256 % 256}.{i % 256}"


#: ``await seed(member_id, count, ip=_ip)``
Seed = Callable[..., Awaitable[None]]


@pytest.fixture
def seed(server: RunningServer, store_url: str, backend: str, clock: FrozenClock) -> Seed:
    """Writes ``count`` access-log entries, oldest first, one millisecond apart, action
    ``page.view.<i>``: sealed under the member's DEK by the vault, inserted at once."""

    async def seed(member_id: str, count: int, ip: Callable[[int], str] = _ip) -> None:
        vault = server.vault
        row = await vault.parts.store.get_member(member_id)
        assert row is not None
        dek = await vault.parts.member_keys.dek(row.key)
        records = []
        for i in range(count):
            clock.advance(timedelta(milliseconds=1))
            entry = member_cipher.seal_access(dek, member_id, clock.now(), f"page.view.{i}", ip(i))
            records.append((entry.at, entry.action_ct, entry.ip_ct))
        if backend == "sqlite":
            conn = sqlite3.connect(store_url.removeprefix("sqlite:///"))
            try:
                with conn:
                    conn.executemany(
                        "INSERT INTO access_log (member_id, at, action_ct, ip_ct)"
                        " VALUES (?, ?, ?, ?)",
                        [(member_id, to_micros(at), a, i) for at, a, i in records],
                    )
            finally:
                conn.close()
        else:
            pg = await asyncpg.connect(store_url)
            try:
                await pg.copy_records_to_table(
                    "access_log",
                    columns=["member_id", "at", "action_ct", "ip_ct"],
                    records=[(uuid.UUID(member_id), at, a, i) for at, a, i in records],
                )
            finally:
                await pg.close()

    return seed


async def _stream(members: MemberServiceStub, member_id: str, session: Metadata) -> list[str]:
    request = pb.StreamMemberDataRequest(member_id=member_id)
    call = members.StreamMemberData(request, timeout=300, metadata=session)
    return [piece.json async for piece in call]


async def _export_refused(members: MemberServiceStub, member_id: str, session: Metadata) -> None:
    """ExportMemberData is FAILED_PRECONDITION, saying to use StreamMemberData."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await members.ExportMemberData(
            pb.ExportMemberDataRequest(member_id=member_id), timeout=300, metadata=session
        )
    error = caught.value
    assert error.code() == Code.FAILED_PRECONDITION, (error.code(), error.details())
    violation = precondition_violation(error)
    assert violation.type == "EXPORT_TOO_LARGE"
    assert "StreamMemberData" in violation.description
    assert "StreamMemberData" in (error.details() or "")


async def test_a_history_of_50000_entries_streams_whole(
    members: MemberServiceStub, seed: Seed, backend: str, server: RunningServer
) -> None:
    request = sign_up_request(name="김지수")
    member_id = (await members.SignUp(request)).member_id
    await seed(member_id, HISTORY)

    session = await vault_session(server, member_id)
    started = time.perf_counter()
    pieces = await _stream(members, member_id, session)
    elapsed = time.perf_counter() - started
    document_text = "".join(pieces)
    size = len(document_text.encode())
    print(
        f"\nStreamMemberData [{backend}]: {HISTORY} entries, {size} bytes of JSON "
        f"in {len(pieces)} pieces, {elapsed:.2f} s"
    )

    assert size > 4 * 1024 * 1024  # more than one gRPC message could carry
    assert all(len(p) <= EXPORT_PIECE_CHARS for p in pieces)
    document = json.loads(document_text)
    assert document["member"]["member_id"] == member_id
    assert document["member"]["login_id"] == request.login_id
    assert document["member"]["name"] == "김지수"
    history = document["access_history"]
    assert len(history) == HISTORY
    # Newest first, every entry once, each with its own address.
    assert [e["action"] for e in history] == [f"page.view.{i}" for i in reversed(range(HISTORY))]
    assert [e["ip"] for e in history] == [_ip(i) for i in reversed(range(HISTORY))]

    # The one-message form refuses it clearly (it was RESOURCE_EXHAUSTED from the
    # transport's send limit) and points at the stream.
    await _export_refused(members, member_id, session)


async def test_oversized_entries_stored_before_the_ip_check_still_stream(
    members: MemberServiceStub, seed: Seed, server: RunningServer
) -> None:
    """80 entries of 60 KiB each (what the old IP check let through): every piece
    stays within its bound, and the document is whole."""
    member_id = (await members.SignUp(sign_up_request())).member_id
    huge = "fe80::1%" + "x" * (60 * 1024)
    await seed(member_id, 80, ip=lambda i: huge)
    session = await vault_session(server, member_id)
    pieces = await _stream(members, member_id, session)
    assert all(len(p) <= EXPORT_PIECE_CHARS for p in pieces)
    history = json.loads("".join(pieces))["access_history"]
    assert len(history) == 80
    assert all(e["ip"] == huge for e in history)
    await _export_refused(members, member_id, session)


async def test_stream_and_one_message_export_are_the_same_document(
    members: MemberServiceStub, seed: Seed, server: RunningServer
) -> None:
    for entries in (0, 1, 2500):
        member_id = (await members.SignUp(sign_up_request(mobile_phone="+15550100"))).member_id
        await seed(member_id, entries)
        session = await vault_session(server, member_id)
        streamed = "".join(await _stream(members, member_id, session))
        export = pb.ExportMemberDataRequest(member_id=member_id)
        exported = (await members.ExportMemberData(export, metadata=session)).json
        assert streamed == exported
        assert len(exported.encode()) <= EXPORT_MAX_BYTES
        document = json.loads(exported)
        assert len(document["access_history"]) == entries
        assert document["member"]["mobile_phone"] == "+15550100"


async def test_a_member_key_rotation_during_the_stream_is_followed(
    members: MemberServiceStub, seed: Seed, server: RunningServer
) -> None:
    """The history is re-encrypted under a new DEK while an export is under way: the
    pages after it are read under the new key and the document is whole. Driven
    through the vault's own stream (in-process) so the rotation lands, every time,
    after the first page and before the rest."""
    member_id = (await members.SignUp(sign_up_request())).member_id
    await seed(member_id, 5000)
    vault = server.vault
    pieces: list[str] = []
    stream = vault.stream_member(member_id)
    try:
        pieces.append(await anext(stream))  # one page read, four to go
        assert await vault.keys.rotate_member_key(member_id, "test") == 2
        pieces.extend([piece async for piece in stream])
    finally:
        await stream.aclose()
    history = json.loads("".join(pieces))["access_history"]
    assert [e["action"] for e in history] == [f"page.view.{i}" for i in reversed(range(5000))]


async def test_a_shred_during_the_stream_is_not_found_not_a_short_document(
    members: MemberServiceStub, seed: Seed, server: RunningServer
) -> None:
    member_id = (await members.SignUp(sign_up_request())).member_id
    await seed(member_id, 5000)
    vault = server.vault
    stream = vault.stream_member(member_id)
    try:
        await anext(stream)
        await vault.shred(member_id, reason="test")
        with pytest.raises(NotFound):
            async for _ in stream:
                pass
    finally:
        await stream.aclose()


@pytest.mark.parametrize(
    ("member_id", "code"),
    [
        # No session can be for an unknown member: the one answer, no oracle.
        ("00000000-0000-4000-8000-000000000000", Code.UNAUTHENTICATED),
        ("not-a-member-id", Code.INVALID_ARGUMENT),
        ("0" * 46, Code.INVALID_ARGUMENT),
    ],
)
async def test_stream_of_a_missing_or_malformed_member(
    members: MemberServiceStub, member_id: str, code: grpc.StatusCode
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _stream(members, member_id, ())
    assert caught.value.code() == code
    assert member_id not in (caught.value.details() or "")
