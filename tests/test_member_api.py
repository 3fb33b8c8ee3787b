"""MemberService over a real gRPC channel, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import statistics
import time
from datetime import timedelta

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from grpc_support import (
    CLIENT_IP,
    Metadata,
    error_info,
    field_violations,
    member_session,
    rich_status,
    sign_up_request,
)

from privacyvault.v1 import member_pb2 as pb
from privacyvault.v1.member_pb2_grpc import MemberServiceStub
from service.config import Settings
from service.server import RunningServer, run_server
from vault import FrozenClock

Code = grpc.StatusCode


async def _fails(call: object, code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    assert caught.value.code() == code, caught.value.details()
    return caught.value


async def _get(
    members: MemberServiceStub, member_id: str, purpose: int, session: Metadata = ()
) -> pb.Member:
    """GetMember; PURPOSE_MEMBER_REQUEST needs the member's ``session``."""
    request = pb.GetMemberRequest(member_id=member_id, purpose=purpose)  # type: ignore[arg-type]
    return (await members.GetMember(request, metadata=session)).member


def _set_fields(member: pb.Member) -> set[str]:
    return {f for f in ("login_id", "name", "email", "mobile_phone") if member.HasField(f)}


# --- sign-up -------------------------------------------------------------------------


async def test_sign_up_then_authenticate(members: MemberServiceStub) -> None:
    request = sign_up_request(mobile_phone="+82 10-1234-5678")
    member_id = (await members.SignUp(request)).member_id
    auth = await members.Authenticate(
        pb.AuthenticateRequest(login_id=request.login_id, password=request.password),
        metadata=CLIENT_IP,
    )
    assert auth.member_id == member_id
    session = (("x-member-session", auth.session_token),)
    member = await _get(members, member_id, pb.PURPOSE_MEMBER_REQUEST, session)
    assert (member.login_id, member.name, member.email) == (
        request.login_id,
        request.name,
        request.email,
    )
    assert member.mobile_phone == "+821012345678"  # normalised


async def test_sign_up_reports_every_invalid_field(members: MemberServiceStub) -> None:
    error = await _fails(
        members.SignUp(
            pb.SignUpRequest(
                login_id="x",
                password="short",
                name="",
                email="not-an-address",
                mobile_phone="call me",
                birth_date="15/06/2000",
            )
        ),
        Code.INVALID_ARGUMENT,
    )
    assert set(field_violations(error)) == {
        "login_id",
        "password",
        "name",
        "email",
        "mobile_phone",
        "birth_date",
    }
    assert "not-an-address" not in error.details() + str(field_violations(error))


async def test_invalid_sign_up_stores_nothing(members: MemberServiceStub) -> None:
    bad = sign_up_request(email="broken@")
    await _fails(members.SignUp(bad), Code.INVALID_ARGUMENT)
    # The same login ID is still free: nothing was half-written.
    good = sign_up_request(login_id=bad.login_id)
    assert (await members.SignUp(good)).member_id


@pytest.mark.parametrize(
    ("birth_date", "allowed"),
    [
        ("2012-06-15", True),  # 14 today (the clock says 2026-06-15)
        ("2012-06-16", False),  # 14 tomorrow
        ("2000-02-29", True),
        ("2026-06-16", False),  # in the future
    ],
)
async def test_minimum_age_is_14(
    members: MemberServiceStub, birth_date: str, allowed: bool
) -> None:
    request = sign_up_request(birth_date=birth_date)
    if allowed:
        assert (await members.SignUp(request)).member_id
    else:
        error = await _fails(members.SignUp(request), Code.INVALID_ARGUMENT)
        assert set(field_violations(error)) == {"birth_date"}
        assert birth_date not in str(field_violations(error))


async def test_birth_date_is_checked_against_the_clock(
    members: MemberServiceStub, clock: FrozenClock
) -> None:
    request = sign_up_request(birth_date="2012-06-16")
    await _fails(members.SignUp(request), Code.INVALID_ARGUMENT)
    clock.advance(timedelta(days=1))
    assert (await members.SignUp(request)).member_id


@pytest.mark.parametrize("field", ["login_id", "email"])
async def test_duplicates_are_refused_without_echoing_the_value(
    members: MemberServiceStub, field: str
) -> None:
    first = sign_up_request()
    await members.SignUp(first)
    taken = getattr(first, field).upper()  # uniqueness ignores case
    error = await _fails(members.SignUp(sign_up_request(**{field: taken})), Code.ALREADY_EXISTS)
    assert error_info(error).metadata["field"] == field
    status = rich_status(error).SerializeToString()
    assert taken.encode() not in status
    assert taken.lower().encode() not in status
    assert taken.lower() not in error.details().lower()


# --- consents and purposes -------------------------------------------------------------


async def test_each_purpose_sees_only_its_fields(members: MemberServiceStub) -> None:
    request = sign_up_request(
        mobile_phone="010-9999-0000",
        consents=[
            pb.ConsentChoice(purpose=pb.PURPOSE_INQUIRY, granted=True),
            pb.ConsentChoice(purpose=pb.PURPOSE_STATISTICS, granted=True),
        ],
    )
    member_id = (await members.SignUp(request)).member_id
    session = await member_session(members, request)
    expected = {
        pb.PURPOSE_IDENTIFICATION: {"login_id", "name", "email"},
        pb.PURPOSE_ACCOUNT_RECOVERY: {"login_id", "email"},
        pb.PURPOSE_INQUIRY: {"name", "email", "mobile_phone"},
        pb.PURPOSE_MEMBER_REQUEST: {"login_id", "name", "email", "mobile_phone"},
    }  # PURPOSE_STATISTICS reads no member (tests/test_statistics.py)
    for purpose, fields in expected.items():
        member = await _get(members, member_id, purpose, session)
        assert _set_fields(member) == fields, pb.Purpose.Name(purpose)
        assert member.member_id == member_id
        assert member.created_at.seconds > 0


async def test_consents_are_recorded_with_policy_version(members: MemberServiceStub) -> None:
    request = sign_up_request(
        consents=[pb.ConsentChoice(purpose=pb.PURPOSE_INQUIRY, granted=False)]
    )
    member_id = (await members.SignUp(request)).member_id
    session = await member_session(members, request)
    member = await _get(members, member_id, pb.PURPOSE_MEMBER_REQUEST, session)
    recorded = {c.purpose: c.granted for c in member.consents}
    assert recorded == {
        pb.PURPOSE_IDENTIFICATION: True,
        pb.PURPOSE_ACCOUNT_RECOVERY: True,
        pb.PURPOSE_INQUIRY: False,
    }
    assert all(c.policy_version == "1" and c.recorded_at.seconds > 0 for c in member.consents)


@pytest.mark.parametrize("purpose", [pb.PURPOSE_INQUIRY])
async def test_optional_purposes_need_a_grant(members: MemberServiceStub, purpose: int) -> None:
    refused = (
        await members.SignUp(sign_up_request(consents=[pb.ConsentChoice(purpose=purpose)]))  # type: ignore[arg-type]
    ).member_id
    silent = (await members.SignUp(sign_up_request())).member_id
    for member_id in (refused, silent):
        error = await _fails(
            members.GetMember(pb.GetMemberRequest(member_id=member_id, purpose=purpose)),  # type: ignore[arg-type]
            Code.PERMISSION_DENIED,
        )
        assert error_info(error).reason == "PURPOSE_NOT_CONSENTED"


async def test_required_purposes_cannot_be_refused(members: MemberServiceStub) -> None:
    consents = [
        pb.ConsentChoice(purpose=pb.PURPOSE_IDENTIFICATION, granted=False),
        pb.ConsentChoice(purpose=pb.PURPOSE_MEMBER_REQUEST, granted=True),
        pb.ConsentChoice(purpose=pb.PURPOSE_INQUIRY, granted=True),
        pb.ConsentChoice(purpose=pb.PURPOSE_INQUIRY, granted=False),
    ]
    error = await _fails(members.SignUp(sign_up_request(consents=consents)), Code.INVALID_ARGUMENT)
    assert set(field_violations(error)) == {
        "consents[0].granted",  # refusing what membership is
        "consents[1].purpose",  # the member's own access right is not a consent
        "consents[3].purpose",  # given twice
    }


async def test_a_bad_purpose_key_is_reported_on_purpose_key(members: MemberServiceStub) -> None:
    consents = [
        pb.ConsentChoice(purpose_key="NO_SUCH_PURPOSE", granted=True),
        pb.ConsentChoice(purpose=pb.PURPOSE_INQUIRY, granted=True),
        pb.ConsentChoice(purpose_key="INQUIRY", granted=True),  # given twice, by key
        pb.ConsentChoice(purpose_key="MEMBER_REQUEST", granted=True),
    ]
    error = await _fails(members.SignUp(sign_up_request(consents=consents)), Code.INVALID_ARGUMENT)
    assert set(field_violations(error)) == {
        "consents[0].purpose_key",
        "consents[2].purpose_key",
        "consents[3].purpose_key",
    }
    both = [pb.ConsentChoice(purpose=pb.PURPOSE_INQUIRY, purpose_key="INQUIRY", granted=True)]
    error = await _fails(members.SignUp(sign_up_request(consents=both)), Code.INVALID_ARGUMENT)
    assert set(field_violations(error)) == {"consents[0].purpose_key"}


async def test_consent_without_a_purpose_is_invalid(members: MemberServiceStub) -> None:
    consents = [pb.ConsentChoice(purpose=pb.PURPOSE_UNSPECIFIED, granted=True)]
    error = await _fails(members.SignUp(sign_up_request(consents=consents)), Code.INVALID_ARGUMENT)
    assert set(field_violations(error)) == {"consents[0].purpose"}


async def test_unknown_or_missing_purpose_is_invalid(members: MemberServiceStub) -> None:
    member_id = (await members.SignUp(sign_up_request())).member_id
    for purpose in (pb.PURPOSE_UNSPECIFIED, 99):
        error = await _fails(
            members.GetMember(pb.GetMemberRequest(member_id=member_id, purpose=purpose)),  # type: ignore[arg-type]
            Code.INVALID_ARGUMENT,
        )
        assert set(field_violations(error)) == {"purpose"}


# --- authentication ----------------------------------------------------------------


async def test_wrong_password_and_unknown_login_fail_alike(members: MemberServiceStub) -> None:
    request = sign_up_request()
    await members.SignUp(request)
    wrong = await _fails(
        members.Authenticate(
            pb.AuthenticateRequest(login_id=request.login_id, password="not the password"),
            metadata=CLIENT_IP,
        ),
        Code.UNAUTHENTICATED,
    )
    unknown = await _fails(
        members.Authenticate(
            pb.AuthenticateRequest(login_id="nobody999", password=request.password),
            metadata=CLIENT_IP,
        ),
        Code.UNAUTHENTICATED,
    )
    assert wrong.details() == unknown.details() == "invalid credentials"


async def test_authenticate_needs_the_client_ip(members: MemberServiceStub) -> None:
    request = sign_up_request()
    await members.SignUp(request)
    auth = pb.AuthenticateRequest(login_id=request.login_id, password=request.password)
    for metadata in ((), (("x-client-ip", "not-an-ip"),)):
        error = await _fails(members.Authenticate(auth, metadata=metadata), Code.INVALID_ARGUMENT)
        assert set(field_violations(error)) == {"x-client-ip"}


async def test_authenticate_records_the_connection(
    members: MemberServiceStub, clock: FrozenClock
) -> None:
    request = sign_up_request()
    member_id = (await members.SignUp(request)).member_id
    # Read as a calling service (IDENTIFICATION needs no session): no login yet.
    signed_up = (await _get(members, member_id, pb.PURPOSE_IDENTIFICATION)).last_seen_at
    clock.advance(timedelta(days=3))
    auth = await members.Authenticate(
        pb.AuthenticateRequest(login_id=request.login_id, password=request.password),
        metadata=(("x-client-ip", "2001:DB8::7"),),
    )
    session = (("x-member-session", auth.session_token),)
    member = await _get(members, member_id, pb.PURPOSE_MEMBER_REQUEST, session)
    assert member.last_seen_at.ToDatetime() - signed_up.ToDatetime() == timedelta(days=3)
    history = await members.ListAccessHistory(
        pb.ListAccessHistoryRequest(member_id=member_id), metadata=session
    )
    assert [(e.action, e.ip, e.at) for e in history.entries] == [
        ("authenticate", "2001:db8::7", member.last_seen_at)
    ]


async def test_login_case_insensitive(members: MemberServiceStub) -> None:
    request = sign_up_request(login_id="MixedCase01")
    member_id = (await members.SignUp(request)).member_id
    auth = await members.Authenticate(
        pb.AuthenticateRequest(login_id="mixedcase01", password=request.password),
        metadata=CLIENT_IP,
    )
    assert auth.member_id == member_id


async def test_rehash_on_login_when_parameters_change(
    server_settings,
    clock: FrozenClock,  # type: ignore[no-untyped-def]
) -> None:
    from service.server import run_server

    request = sign_up_request()
    async with run_server(server_settings, clock=clock) as first:
        async with grpc.aio.insecure_channel(first.target) as ch:
            member_id = (await MemberServiceStub(ch).SignUp(request)).member_id
        before = await first.vault.parts.store.get_member(member_id)
    stronger = server_settings.model_copy(update={"argon2_time_cost": 2})
    async with (
        run_server(stronger, clock=clock) as second,
        grpc.aio.insecure_channel(second.target) as ch,
    ):
        stub = MemberServiceStub(ch)
        auth = pb.AuthenticateRequest(login_id=request.login_id, password=request.password)
        await stub.Authenticate(auth, metadata=CLIENT_IP)
        after_first = await second.vault.parts.store.get_member(member_id)
        await stub.Authenticate(auth, metadata=CLIENT_IP)  # still valid after the rehash
        after_second = await second.vault.parts.store.get_member(member_id)
    assert before
    assert after_first
    assert after_second
    assert before.ciphertexts["password_hash"] != after_first.ciphertexts["password_hash"]
    # Already at the current parameters: no second rehash.
    assert after_first.ciphertexts["password_hash"] == after_second.ciphertexts["password_hash"]


# --- correction ----------------------------------------------------------------------


async def test_update_member_corrects_fields_and_indexes(members: MemberServiceStub) -> None:
    request = sign_up_request(mobile_phone="01012345678")
    member_id = (await members.SignUp(request)).member_id
    updated = await members.UpdateMember(
        pb.UpdateMemberRequest(
            member_id=member_id,
            name="Corrected Name",
            email="corrected@example.org",
            mobile_phone="",
            update_mask=FieldMask(paths=["name", "email", "mobile_phone"]),
            current_password=request.password,  # a new e-mail needs it
        ),
        metadata=await member_session(members, request),
    )
    assert (updated.member.name, updated.member.email) == (
        "Corrected Name",
        "corrected@example.org",
    )
    assert not updated.member.HasField("mobile_phone")
    assert updated.member.login_id == request.login_id  # not in the mask: untouched
    # The old e-mail is free again; the new one is taken.
    assert (await members.SignUp(sign_up_request(email=request.email))).member_id
    error = await _fails(
        members.SignUp(sign_up_request(email="Corrected@Example.org")), Code.ALREADY_EXISTS
    )
    assert error_info(error).metadata["field"] == "email"


async def test_update_member_refuses_a_taken_email(members: MemberServiceStub) -> None:
    first = sign_up_request()
    await members.SignUp(first)
    second = sign_up_request()
    second_id = (await members.SignUp(second)).member_id
    await _fails(
        members.UpdateMember(
            pb.UpdateMemberRequest(
                member_id=second_id,
                email=first.email,
                update_mask=FieldMask(paths=["email"]),
                current_password=second.password,
            ),
            metadata=await member_session(members, second),
        ),
        Code.ALREADY_EXISTS,
    )


@pytest.mark.parametrize(
    ("paths", "values", "bad"),
    [
        ([], {}, {"update_mask"}),
        (["login_id"], {}, {"update_mask"}),
        (["name"], {"name": ""}, {"name"}),
        (["email"], {"email": "nope"}, {"email"}),
        (["mobile_phone"], {"mobile_phone": "12"}, {"mobile_phone"}),
    ],
)
async def test_update_member_validates(
    members: MemberServiceStub, paths: list[str], values: dict[str, str], bad: set[str]
) -> None:
    request = sign_up_request()
    member_id = (await members.SignUp(request)).member_id
    password = {"current_password": request.password} if "email" in paths else {}
    error = await _fails(
        members.UpdateMember(
            pb.UpdateMemberRequest(
                member_id=member_id, update_mask=FieldMask(paths=paths), **values, **password
            ),
            metadata=await member_session(members, request),
        ),
        Code.INVALID_ARGUMENT,
    )
    assert set(field_violations(error)) == bad


async def test_change_password(members: MemberServiceStub) -> None:
    request = sign_up_request()
    member_id = (await members.SignUp(request)).member_id
    session = await member_session(members, request)
    await _fails(
        members.ChangePassword(
            pb.ChangePasswordRequest(
                member_id=member_id, current_password="wrong password", new_password="new secret 22"
            ),
            metadata=session,
        ),
        Code.UNAUTHENTICATED,
    )
    await members.ChangePassword(
        pb.ChangePasswordRequest(
            member_id=member_id, current_password=request.password, new_password="new secret 22"
        ),
        metadata=session,
    )
    old = pb.AuthenticateRequest(login_id=request.login_id, password=request.password)
    await _fails(members.Authenticate(old, metadata=CLIENT_IP), Code.UNAUTHENTICATED)
    new = pb.AuthenticateRequest(login_id=request.login_id, password="new secret 22")
    auth = await members.Authenticate(new, metadata=CLIENT_IP)
    assert auth.member_id == member_id
    error = await _fails(
        members.ChangePassword(
            pb.ChangePasswordRequest(
                member_id=member_id, current_password="new secret 22", new_password="x"
            ),
            metadata=(("x-member-session", auth.session_token),),  # the old one ended
        ),
        Code.INVALID_ARGUMENT,
    )
    assert set(field_violations(error)) == {"new_password"}


# --- access history --------------------------------------------------------------------


async def test_access_history_pages_newest_first(
    members: MemberServiceStub, clock: FrozenClock
) -> None:
    request = sign_up_request()
    member_id = (await members.SignUp(request)).member_id
    session = await member_session(members, request)  # its login is the oldest entry
    for i in range(25):
        if i % 2:
            clock.advance(timedelta(seconds=1))  # half the entries share a timestamp
        await members.RecordAccess(
            pb.RecordAccessRequest(member_id=member_id, action=f"page.view.{i}", ip="192.0.2.1")
        )
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await members.ListAccessHistory(
            pb.ListAccessHistoryRequest(member_id=member_id, page_size=10, page_token=token),
            metadata=session,
        )
        pages += 1
        seen.extend(e.action for e in page.entries)
        token = page.next_page_token
        if not token:
            break
    assert pages == 3
    assert seen == [f"page.view.{i}" for i in reversed(range(25))] + ["authenticate"]


@pytest.mark.parametrize(
    ("request_fields", "bad"),
    [
        ({"page_size": -1}, {"page_size"}),
        ({"page_token": "garbage!"}, {"page_token"}),
        ({"member_id": "not-a-uuid"}, {"member_id"}),
    ],
)
async def test_access_history_validates(
    members: MemberServiceStub, request_fields: dict[str, object], bad: set[str]
) -> None:
    request = sign_up_request()
    member_id = (await members.SignUp(request)).member_id
    session = await member_session(members, request)
    fields: dict[str, object] = {"member_id": member_id, **request_fields}
    error = await _fails(
        members.ListAccessHistory(pb.ListAccessHistoryRequest(**fields), metadata=session),  # type: ignore[arg-type]
        Code.INVALID_ARGUMENT,
    )
    assert set(field_violations(error)) == bad


async def test_record_access_validates(members: MemberServiceStub) -> None:
    member_id = (await members.SignUp(sign_up_request())).member_id
    error = await _fails(
        members.RecordAccess(pb.RecordAccessRequest(member_id=member_id, action="", ip="1.2.3")),
        Code.INVALID_ARGUMENT,
    )
    assert set(field_violations(error)) == {"action", "ip"}


# --- export and withdrawal ---------------------------------------------------------------


async def test_export_member_data(members: MemberServiceStub) -> None:
    request = sign_up_request(mobile_phone="+15550100", name="이순신")
    member_id = (await members.SignUp(request)).member_id
    session = await member_session(members, request)  # Authenticate, from CLIENT_IP
    await members.RecordAccess(
        pb.RecordAccessRequest(member_id=member_id, action="order.view", ip="192.0.2.9")
    )
    export = pb.ExportMemberDataRequest(member_id=member_id)
    document = json.loads((await members.ExportMemberData(export, metadata=session)).json)
    assert document["member"]["member_id"] == member_id
    assert document["member"]["login_id"] == request.login_id
    assert document["member"]["name"] == "이순신"
    assert document["member"]["email"] == request.email
    assert document["member"]["mobile_phone"] == "+15550100"
    assert request.password not in json.dumps(document)
    assert {c["purpose"] for c in document["consents"]} == {"IDENTIFICATION", "ACCOUNT_RECOVERY"}
    assert [(e["action"], e["ip"]) for e in document["access_history"]] == [
        ("order.view", "192.0.2.9"),
        ("authenticate", "203.0.113.7"),
    ]


async def test_withdraw_needs_the_password(members: MemberServiceStub) -> None:
    request = sign_up_request()
    member_id = (await members.SignUp(request)).member_id
    await _fails(
        members.Withdraw(
            pb.WithdrawRequest(member_id=member_id, password="wrong password"),
            metadata=await member_session(members, request),
        ),
        Code.UNAUTHENTICATED,
    )
    assert (await _get(members, member_id, pb.PURPOSE_IDENTIFICATION)).login_id == request.login_id


async def test_withdraw_shreds_the_member(
    members: MemberServiceStub, server: RunningServer
) -> None:
    request = sign_up_request()
    member_id = (await members.SignUp(request)).member_id
    await members.RecordAccess(
        pb.RecordAccessRequest(member_id=member_id, action="x", ip="192.0.2.1")
    )
    stored = await server.vault.parts.store.get_member(member_id)
    assert stored is not None

    session = await member_session(members, request)
    outcome = await members.Withdraw(
        pb.WithdrawRequest(member_id=member_id, password=request.password), metadata=session
    )
    assert outcome.WhichOneof("outcome") == "destroyed_at"

    # The member's own rights: their sessions ended with them (one answer, no oracle).
    own_rights = [
        members.GetMember(
            pb.GetMemberRequest(member_id=member_id, purpose=pb.PURPOSE_MEMBER_REQUEST),
            metadata=session,
        ),
        members.UpdateMember(
            pb.UpdateMemberRequest(
                member_id=member_id, name="n", update_mask=FieldMask(paths=["name"])
            ),
            metadata=session,
        ),
        members.ChangePassword(
            pb.ChangePasswordRequest(
                member_id=member_id, current_password=request.password, new_password="another one 1"
            ),
            metadata=session,
        ),
        members.Withdraw(
            pb.WithdrawRequest(member_id=member_id, password=request.password), metadata=session
        ),
        members.ExportMemberData(pb.ExportMemberDataRequest(member_id=member_id), metadata=session),
        members.ListAccessHistory(
            pb.ListAccessHistoryRequest(member_id=member_id), metadata=session
        ),
    ]
    for call in own_rights:
        error = await _fails(call, Code.UNAUTHENTICATED)
        assert error_info(error).reason == "MEMBER_SESSION_REQUIRED"
    calls = [
        members.GetMember(
            pb.GetMemberRequest(member_id=member_id, purpose=pb.PURPOSE_IDENTIFICATION)
        ),
        members.RecordAccess(
            pb.RecordAccessRequest(member_id=member_id, action="x", ip="192.0.2.1")
        ),
    ]
    for call in calls:
        await _fails(call, Code.NOT_FOUND)
    await _fails(
        members.Authenticate(
            pb.AuthenticateRequest(login_id=request.login_id, password=request.password),
            metadata=CLIENT_IP,
        ),
        Code.UNAUTHENTICATED,
    )
    # Nothing of theirs is left to decrypt, and a record proves the destruction.
    assert await server.vault.parts.store.get_member(member_id) is None
    assert await server.vault.parts.store.is_destroyed(member_id)
    (record,) = await server.vault.parts.store.list_destruction_records(member_id)
    assert record.reason == "withdrawal"
    assert record.items["member_keys"] == 1
    assert record.items["access_log"] == 2  # the RecordAccess and the login
    assert record.kek_versions == (1,)
    # The login ID and e-mail are free for a new member.
    assert (
        await members.SignUp(sign_up_request(login_id=request.login_id, email=request.email))
    ).member_id != member_id


async def test_unknown_member_is_not_found(members: MemberServiceStub) -> None:
    await _fails(
        members.GetMember(
            pb.GetMemberRequest(
                member_id="00000000-0000-4000-8000-000000000000", purpose=pb.PURPOSE_IDENTIFICATION
            )
        ),
        Code.NOT_FOUND,
    )


async def test_unknown_login_costs_what_a_wrong_password_costs(
    server_settings: Settings, clock: FrozenClock
) -> None:
    """An unknown login ID must not answer faster: that would tell which IDs exist."""
    costly = server_settings.model_copy(update={"argon2_memory_cost": 16 * 1024})
    request = sign_up_request()
    async with (
        run_server(costly, clock=clock) as running,
        grpc.aio.insecure_channel(running.target) as ch,
    ):
        stub = MemberServiceStub(ch)
        await stub.SignUp(request)

        async def attempt(login_id: str) -> float:
            started = time.perf_counter()
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.Authenticate(
                    pb.AuthenticateRequest(login_id=login_id, password="wrong password"),
                    metadata=CLIENT_IP,
                )
            return time.perf_counter() - started

        wrong, unknown = [], []
        for i in range(15):  # interleaved, so machine noise hits both alike
            wrong.append(await attempt(request.login_id))
            unknown.append(await attempt(f"unknown{i:04d}"))
    ratio = statistics.median(unknown) / statistics.median(wrong)
    # Without the decoy verification an unknown ID answers ~50x faster.
    assert 0.7 < ratio < 1.4, ratio
