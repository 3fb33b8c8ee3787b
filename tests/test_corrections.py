"""Corrections that freeze use (policy section 7), over real gRPC on both backends:
a pending correction blocks exactly its fields for every purpose but the member's
own, UpdateMember lifts it field by field, CloseCorrection with a recorded reason;
the export, the retention copy and a key rotation carry the corrections along."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from grpc_support import (
    Metadata,
    embedded_settings,
    error_info,
    field_violations,
    sign_up_request,
)
from process_support import serving
from pydantic import SecretStr
from tls_support import TestPki

from privacyvault.v1 import consent_pb2 as cpb
from privacyvault.v1 import member_pb2 as pb
from privacyvault.v1.consent_pb2_grpc import ConsentServiceStub
from privacyvault.v1.member_pb2_grpc import MemberServiceStub
from service.config import Settings
from service.server import RunningServer, run_server
from vault import FrozenClock

Code = grpc.StatusCode
INQUIRY = [pb.ConsentChoice(purpose=pb.PURPOSE_INQUIRY, granted=True)]
PHONE = "010-1234-5678"


async def fails(call: Any, code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    return caught.value


async def new_member(members: MemberServiceStub) -> tuple[str, pb.SignUpRequest, Metadata]:
    request = sign_up_request(consents=INQUIRY, mobile_phone=PHONE)
    member_id = (await members.SignUp(request)).member_id
    auth = await members.Authenticate(
        pb.AuthenticateRequest(
            login_id=request.login_id, password=request.password, client_ip="192.0.2.1"
        )
    )
    return member_id, request, (("x-member-session", auth.session_token),)


def read(members: MemberServiceStub, member_id: str, purpose: int, session: Metadata = ()) -> Any:
    request = pb.GetMemberRequest(member_id=member_id, purpose=purpose)  # type: ignore[arg-type]
    return members.GetMember(request, metadata=session)


async def frozen(members: MemberServiceStub, member_id: str, purpose: int) -> str:
    """The fields a refused read names (ErrorInfo metadata), after checking the refusal."""
    error = await fails(read(members, member_id, purpose), Code.FAILED_PRECONDITION)
    info = error_info(error)
    assert info.reason == "CORRECTION_PENDING"
    assert info.domain == "privacyvault.v1"
    return info.metadata["fields"]


async def test_a_pending_correction_blocks_exactly_its_fields_until_applied(
    members: MemberServiceStub,
) -> None:
    member_id, request, session = await new_member(members)
    asked = await members.RequestCorrection(
        pb.RequestCorrectionRequest(
            member_id=member_id, fields=["mobile_phone"], note="my number changed last month"
        ),
        metadata=session,
    )
    correction = asked.correction
    assert correction.state == "pending"
    assert correction.requested_by == "member"
    assert dict(correction.fields) == {"mobile_phone": "pending"}

    # INQUIRY reads the phone: refused as a whole, naming only the frozen field.
    assert await frozen(members, member_id, pb.PURPOSE_INQUIRY) == "mobile_phone"
    # Purposes that do not read the phone still read.
    identified = (await read(members, member_id, pb.PURPOSE_IDENTIFICATION)).member
    assert identified.email == request.email
    recovery = (await read(members, member_id, pb.PURPOSE_ACCOUNT_RECOVERY)).member
    assert recovery.login_id == request.login_id
    # The member's own read still works, with the frozen field.
    own = (await read(members, member_id, pb.PURPOSE_MEMBER_REQUEST, session)).member
    assert own.mobile_phone == "01012345678"

    listed = await members.ListCorrections(
        pb.ListCorrectionsRequest(member_id=member_id), metadata=session
    )
    assert [c.note for c in listed.corrections] == ["my number changed last month"]
    assert listed.corrections[0].requested_at.seconds > 0

    # Correcting the phone applies the correction and lifts the freeze.
    await members.UpdateMember(
        pb.UpdateMemberRequest(
            member_id=member_id,
            mobile_phone="010-8765-4321",
            update_mask=FieldMask(paths=["mobile_phone"]),
        ),
        metadata=session,
    )
    inquiry = (await read(members, member_id, pb.PURPOSE_INQUIRY)).member
    assert inquiry.mobile_phone == "01087654321"
    (applied,) = (
        await members.ListCorrections(
            pb.ListCorrectionsRequest(member_id=member_id), metadata=session
        )
    ).corrections
    assert applied.state == "applied"
    assert dict(applied.fields) == {"mobile_phone": "corrected"}
    assert applied.resolved_by == "member"
    assert applied.resolved_at.seconds > 0


async def test_fields_are_released_one_by_one_and_a_closure_records_its_reason(
    members: MemberServiceStub,
) -> None:
    member_id, _, session = await new_member(members)
    # A calling service on the member's behalf (no session): its identity is recorded.
    asked = await members.RequestCorrection(
        pb.RequestCorrectionRequest(member_id=member_id, fields=["email", "name"])
    )
    cid = asked.correction.correction_id
    assert asked.correction.requested_by == "local"
    assert await frozen(members, member_id, pb.PURPOSE_IDENTIFICATION) == "email,name"
    assert await frozen(members, member_id, pb.PURPOSE_ACCOUNT_RECOVERY) == "email"

    await members.UpdateMember(
        pb.UpdateMemberRequest(
            member_id=member_id, name="Corrected Name", update_mask=FieldMask(paths=["name"])
        ),
        metadata=session,
    )
    # The name is released, the e-mail is not: still refused wherever it is read.
    assert await frozen(members, member_id, pb.PURPOSE_IDENTIFICATION) == "email"
    assert await frozen(members, member_id, pb.PURPOSE_INQUIRY) == "email"

    closed = await members.CloseCorrection(
        pb.CloseCorrectionRequest(
            member_id=member_id, correction_id=cid, reason="the address was verified as correct"
        )
    )
    assert closed.correction.state == "closed"
    assert dict(closed.correction.fields) == {"name": "corrected", "email": "closed"}
    assert closed.correction.reason == "the address was verified as correct"
    assert closed.correction.resolved_by == "local"
    assert (await read(members, member_id, pb.PURPOSE_IDENTIFICATION)).member.name == (
        "Corrected Name"
    )

    again = await fails(
        members.CloseCorrection(
            pb.CloseCorrectionRequest(member_id=member_id, correction_id=cid, reason="again"),
            metadata=session,
        ),
        Code.FAILED_PRECONDITION,
    )
    assert error_info(again).reason == "CORRECTION_RESOLVED"
    unknown = await fails(
        members.CloseCorrection(
            pb.CloseCorrectionRequest(
                member_id=member_id, correction_id=str(uuid.uuid4()), reason="none"
            )
        ),
        Code.NOT_FOUND,
    )
    assert error_info(unknown).reason == "CORRECTION_NOT_FOUND"


async def test_another_members_correction_cannot_be_closed(members: MemberServiceStub) -> None:
    member_id, _, _ = await new_member(members)
    other_id, _, other_session = await new_member(members)
    asked = await members.RequestCorrection(
        pb.RequestCorrectionRequest(member_id=member_id, fields=["name"])
    )
    cid = asked.correction.correction_id
    error = await fails(
        members.CloseCorrection(
            pb.CloseCorrectionRequest(member_id=other_id, correction_id=cid, reason="mine?"),
            metadata=other_session,
        ),
        Code.NOT_FOUND,
    )
    assert error_info(error).reason == "CORRECTION_NOT_FOUND"
    # Another member's session for this member is no session of theirs.
    error = await fails(
        members.CloseCorrection(
            pb.CloseCorrectionRequest(member_id=member_id, correction_id=cid, reason="x"),
            metadata=other_session,
        ),
        Code.UNAUTHENTICATED,
    )
    assert error_info(error).reason == "MEMBER_SESSION_REQUIRED"
    assert await frozen(members, member_id, pb.PURPOSE_IDENTIFICATION) == "name"


async def test_bad_correction_requests_are_refused(members: MemberServiceStub) -> None:
    member_id, _, session = await new_member(members)
    for fields in ([], ["login_id"], ["name", "name"], ["password_hash"]):
        error = await fails(
            members.RequestCorrection(
                pb.RequestCorrectionRequest(member_id=member_id, fields=fields)
            ),
            Code.INVALID_ARGUMENT,
        )
        assert set(field_violations(error)) == {"fields"}
        assert "login_id" not in field_violations(error)["fields"] or fields != ["login_id"]
    error = await fails(
        members.RequestCorrection(
            pb.RequestCorrectionRequest(member_id=member_id, fields=["name"], note="x" * 1001)
        ),
        Code.INVALID_ARGUMENT,
    )
    assert set(field_violations(error)) == {"note"}
    error = await fails(
        members.RequestCorrection(
            pb.RequestCorrectionRequest(member_id=member_id, fields=["name"], note="a\x00b")
        ),
        Code.INVALID_ARGUMENT,
    )
    assert set(field_violations(error)) == {"note"}
    error = await fails(
        members.CloseCorrection(
            pb.CloseCorrectionRequest(member_id=member_id, correction_id="nope", reason=" ")
        ),
        Code.INVALID_ARGUMENT,
    )
    assert set(field_violations(error)) == {"correction_id", "reason"}
    unknown = await fails(
        members.RequestCorrection(
            pb.RequestCorrectionRequest(member_id=str(uuid.uuid4()), fields=["name"])
        ),
        Code.NOT_FOUND,
    )
    assert error_info(unknown).reason == "MEMBER_NOT_FOUND"
    # A session that is sent must be the member's own and live.
    error = await fails(
        members.RequestCorrection(
            pb.RequestCorrectionRequest(member_id=member_id, fields=["name"]),
            metadata=(("x-member-session", "not-a-session"),),
        ),
        Code.UNAUTHENTICATED,
    )
    assert error_info(error).reason == "MEMBER_SESSION_REQUIRED"
    error = await fails(
        members.ListCorrections(pb.ListCorrectionsRequest(member_id=member_id)),
        Code.UNAUTHENTICATED,
    )
    assert error_info(error).reason == "MEMBER_SESSION_REQUIRED"
    # Nothing was recorded by any of them.
    listed = await members.ListCorrections(
        pb.ListCorrectionsRequest(member_id=member_id), metadata=session
    )
    assert list(listed.corrections) == []


# --- ListCorrections pages (AIP-158) ------------------------------------------------------

_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


async def file_corrections(
    members: MemberServiceStub, clock: FrozenClock, member_id: str, session: Metadata, n: int
) -> list[str]:
    """``n`` corrections, three at each instant (ties, ordered by id), every other
    one closed (a member has at most 20 pending); their ids."""
    filed = []
    for i in range(n):
        if i % 3 == 0:
            clock.advance(timedelta(seconds=1))
        asked = await members.RequestCorrection(
            pb.RequestCorrectionRequest(member_id=member_id, fields=["name"], note=f"n{i}"),
            metadata=session,
        )
        filed.append(asked.correction.correction_id)
        if i % 2:
            await members.CloseCorrection(
                pb.CloseCorrectionRequest(
                    member_id=member_id, correction_id=filed[-1], reason="checked"
                ),
                metadata=session,
            )
    return filed


def list_corrections(
    members: MemberServiceStub, member_id: str, session: Metadata, **paging: Any
) -> Any:
    return members.ListCorrections(
        pb.ListCorrectionsRequest(member_id=member_id, **paging), metadata=session
    )


async def test_pages_cover_every_correction_exactly_once_in_order(
    members: MemberServiceStub, clock: FrozenClock
) -> None:
    member_id, _, session = await new_member(members)
    filed = await file_corrections(members, clock, member_id, session, 23)
    seen: list[tuple[int, int, str]] = []
    token, pages = "", 0
    while True:
        page = await list_corrections(members, member_id, session, page_size=5, page_token=token)
        assert len(page.corrections) <= 5
        seen.extend(
            (c.requested_at.seconds, c.requested_at.nanos, c.correction_id)
            for c in page.corrections
        )
        pages += 1
        if pages == 2:
            # Requests and closures between pages neither skip nor repeat one.
            filed += await file_corrections(members, clock, member_id, session, 2)
            await members.CloseCorrection(
                pb.CloseCorrectionRequest(
                    member_id=member_id, correction_id=filed[0], reason="checked"
                ),
                metadata=session,
            )
        token = page.next_page_token
        if not token:
            break
    assert pages == 5
    assert sorted(c for _, _, c in seen) == sorted(filed)
    assert seen == sorted(seen)  # oldest first; at one instant, by id
    # The default page is 20, and more than the most (100) is read as the most.
    first = await list_corrections(members, member_id, session)
    assert len(first.corrections) == 20
    assert first.next_page_token
    whole = await list_corrections(members, member_id, session, page_size=2**31 - 1)
    assert [c.correction_id for c in whole.corrections] == [c for _, _, c in seen]
    assert whole.next_page_token == ""


async def test_bad_paging_is_invalid_argument_with_field_violations(
    members: MemberServiceStub, clock: FrozenClock
) -> None:
    member_id, _, session = await new_member(members)
    other_id, _, other_session = await new_member(members)
    await file_corrections(members, clock, member_id, session, 3)
    await file_corrections(members, clock, other_id, other_session, 3)
    token = (await list_corrections(members, member_id, session, page_size=1)).next_page_token
    assert token
    await members.RecordAccess(  # one entry more than the login: a second page
        pb.RecordAccessRequest(member_id=member_id, action="order.view", ip="192.0.2.1")
    )
    history = await members.ListAccessHistory(
        pb.ListAccessHistoryRequest(member_id=member_id, page_size=1), metadata=session
    )
    assert history.next_page_token

    async def refused(mid: str, md: Metadata, **paging: Any) -> dict[str, str]:
        error = await fails(list_corrections(members, mid, md, **paging), Code.INVALID_ARGUMENT)
        assert error_info(error).reason == "INVALID_ARGUMENT"
        return field_violations(error)

    assert await refused(member_id, session, page_size=-1) == {"page_size": "must not be negative"}
    not_ours = {"page_token": "is not a token ListCorrections returned for this member"}
    assert await refused(member_id, session, page_token="garbage!") == not_ours
    # Another member's token, with that member's own session: refused.
    assert await refused(other_id, other_session, page_token=token) == not_ours
    # Another listing's token of the same member: refused, and the other way round.
    assert await refused(member_id, session, page_token=history.next_page_token) == not_ours
    error = await fails(
        members.ListAccessHistory(
            pb.ListAccessHistoryRequest(member_id=member_id, page_token=token), metadata=session
        ),
        Code.INVALID_ARGUMENT,
    )
    assert set(field_violations(error)) == {"page_token"}
    # Any character altered, or one more or less: refused.
    altered = {token[:-1], token + "A", token[1:]}
    for i, char in enumerate(token):
        altered.add(token[:i] + _ALPHABET[(_ALPHABET.index(char) + 1) % 64] + token[i + 1 :])
    for bad in sorted(altered):
        assert await refused(member_id, session, page_token=bad) == not_ours
    # Both at once, both named; the token still pages on for its own member.
    assert set(await refused(member_id, session, page_size=-5, page_token="x")) == {
        "page_size",
        "page_token",
    }
    rest = await list_corrections(members, member_id, session, page_token=token)
    assert len(rest.corrections) == 2


async def test_the_export_and_a_key_rotation_carry_the_corrections(
    server: RunningServer, members: MemberServiceStub
) -> None:
    member_id, _, session = await new_member(members)
    await members.RequestCorrection(
        pb.RequestCorrectionRequest(member_id=member_id, fields=["email"], note="typo in domain"),
        metadata=session,
    )
    # A per-member key rotation re-seals the note under the new key.
    await server.vault.keys.rotate_member_key(member_id, "test")
    exported = json.loads(
        (
            await members.ExportMemberData(
                pb.ExportMemberDataRequest(member_id=member_id), metadata=session
            )
        ).json
    )
    (entry,) = exported["corrections"]
    assert entry["note"] == "typo in domain"
    assert entry["fields"] == {"email": "pending"}
    assert entry["state"] == "pending"
    assert entry["requested_by"] == "member"
    # The note is ciphertext at rest.
    (row,) = await server.vault.parts.store.list_corrections(member_id)
    assert row.note_ct is not None
    assert b"typo" not in row.note_ct


@pytest.fixture
async def retaining_server(
    server_settings: Settings, retention_url: str, clock: FrozenClock
) -> AsyncIterator[RunningServer]:
    settings = server_settings.model_copy(
        update={
            "withdrawal_retention_days": 30,
            "retention_database_url": SecretStr(retention_url),
        }
    )
    async with run_server(settings, clock=clock) as running:
        yield running


async def test_a_withdrawal_into_retention_copies_the_corrections(
    retaining_server: RunningServer,
) -> None:
    async with grpc.aio.insecure_channel(retaining_server.target) as channel:
        members = MemberServiceStub(channel)
        member_id, request, session = await new_member(members)
        await members.RequestCorrection(
            pb.RequestCorrectionRequest(member_id=member_id, fields=["name"], note="wrong name"),
            metadata=session,
        )
        await members.Withdraw(
            pb.WithdrawRequest(member_id=member_id, password=request.password), metadata=session
        )
    vault = retaining_server.vault
    disclosed = await vault.retention.disclose(member_id, "officer", "court order 2026-17")
    (entry,) = disclosed["corrections"]
    assert (entry["note"], entry["fields"], entry["state"]) == (
        "wrong name",
        {"name": "pending"},
        "pending",
    )
    # The live database kept nothing of them.
    assert await vault.parts.store.list_corrections(member_id) == []


# --- who may: the caller policy --------------------------------------------------------------

HELPDESK = "spiffe://example.org/ns/support/sa/helpdesk"
READER = "spiffe://example.org/ns/login/sa/identify"
POLICY = f"""
trust_domain = "example.org"

[[caller]]
identity = "{HELPDESK}"
methods = ["MemberService/SignUp", "MemberService/RequestCorrection",
           "MemberService/CloseCorrection"]

[[caller]]
identity = "{READER}"
methods = ["MemberService/GetMember"]
purposes = ["IDENTIFICATION"]
"""


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    return TestPki.create(tmp_path_factory.mktemp("pki"))


async def test_a_calling_service_is_recorded_and_needs_the_policy(
    server_settings: Settings, pki: TestPki, tmp_path: Path, clock: FrozenClock
) -> None:
    policy = tmp_path / "callers.toml"
    policy.write_text(POLICY)
    settings = server_settings.model_copy(
        update={
            "tls_cert_file": pki.server_cert,
            "tls_key_file": pki.server_key,
            "tls_client_ca_file": pki.ca_cert,
            "caller_policy_file": policy,
        }
    )
    async with run_server(settings, clock=clock) as running:
        async with pki.channel(running.target, HELPDESK) as channel:
            helpdesk = MemberServiceStub(channel)
            member_id = (await helpdesk.SignUp(sign_up_request())).member_id
            asked = await helpdesk.RequestCorrection(
                pb.RequestCorrectionRequest(member_id=member_id, fields=["email"])
            )
            assert asked.correction.requested_by == HELPDESK
        async with pki.channel(running.target, READER) as channel:
            reader = MemberServiceStub(channel)
            assert await frozen(reader, member_id, pb.PURPOSE_IDENTIFICATION) == "email"
            error = await fails(
                reader.CloseCorrection(
                    pb.CloseCorrectionRequest(
                        member_id=member_id,
                        correction_id=asked.correction.correction_id,
                        reason="not mine to close",
                    )
                ),
                Code.PERMISSION_DENIED,
            )
            assert error_info(error).reason == "CALLER_NOT_ALLOWED"


# --- every replica: a second server process on the same PostgreSQL ------------------------


@pytest.mark.postgres
async def test_a_pending_correction_blocks_reads_on_a_second_server_process(
    make_postgres_database: Callable[[], Awaitable[str]], tmp_path: Path
) -> None:
    """The freeze is in the member read's own query, with the consent check: a
    correction requested through one server refuses the very next read through
    another, and its resolution lifts it there at once."""
    url = await make_postgres_database()
    data = tmp_path / "data"  # shared: both servers use its KEK file
    settings = embedded_settings(data, database_url=url)
    # The system clock on both (the member's session must be live on each).
    async with run_server(settings) as running:
        with serving(tmp_path, data, "second", database_url=url) as (process, _):
            async with (
                grpc.aio.insecure_channel(running.target) as here,
                grpc.aio.insecure_channel(process.target) as there,
            ):
                members, replica = MemberServiceStub(here), MemberServiceStub(there)
                member_id, request, session = await new_member(members)
                assert (await read(replica, member_id, pb.PURPOSE_INQUIRY)).member.email
                asked = await members.RequestCorrection(
                    pb.RequestCorrectionRequest(member_id=member_id, fields=["email"]),
                    metadata=session,
                )
                # The very next read on the other process is refused, for every
                # purpose that reads the e-mail address; the member's own is not.
                assert await frozen(replica, member_id, pb.PURPOSE_INQUIRY) == "email"
                assert await frozen(replica, member_id, pb.PURPOSE_IDENTIFICATION) == "email"
                own = await read(replica, member_id, pb.PURPOSE_MEMBER_REQUEST, session)
                assert own.member.email == request.email

                # Closed through the first server: the other reads again at once.
                await members.CloseCorrection(
                    pb.CloseCorrectionRequest(
                        member_id=member_id,
                        correction_id=asked.correction.correction_id,
                        reason="the address was right after all",
                    ),
                    metadata=session,
                )
                assert (await read(replica, member_id, pb.PURPOSE_INQUIRY)).member.email

                # Asked again, then applied by UpdateMember: the new value, at once.
                await members.RequestCorrection(
                    pb.RequestCorrectionRequest(member_id=member_id, fields=["email"]),
                    metadata=session,
                )
                assert await frozen(replica, member_id, pb.PURPOSE_ACCOUNT_RECOVERY) == "email"
                await members.UpdateMember(
                    pb.UpdateMemberRequest(
                        member_id=member_id,
                        email="corrected@example.org",
                        current_password=request.password,
                        update_mask=FieldMask(paths=["email"]),
                    ),
                    metadata=session,
                )
                got = (await read(replica, member_id, pb.PURPOSE_INQUIRY)).member
                assert got.email == "corrected@example.org"

                # Both checks ride the one read: a withdrawn consent is refused first.
                await members.RequestCorrection(
                    pb.RequestCorrectionRequest(member_id=member_id, fields=["name"]),
                    metadata=session,
                )
                await ConsentServiceStub(here).UpdateConsents(
                    cpb.UpdateConsentsRequest(
                        member_id=member_id,
                        changes=[cpb.ConsentChange(purpose_key="INQUIRY", granted=False)],
                    ),
                    metadata=session,
                )
                error = await fails(
                    read(replica, member_id, pb.PURPOSE_INQUIRY), Code.PERMISSION_DENIED
                )
                assert error_info(error).reason == "PURPOSE_NOT_CONSENTED"
                assert await frozen(replica, member_id, pb.PURPOSE_IDENTIFICATION) == "name"
