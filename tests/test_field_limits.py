"""Every string field of the API has a documented maximum length and is refused past
it; IP addresses are stored only in canonical form (issue 8, item 7).

Descriptor-driven: every string field (and repeated field) of every request of every
service of the API (MemberService, ConsentService, PolicyAdminService,
StatisticsService, DisclosureService, RecipientAdminService, KeyAdminService), and
of the messages inside those requests (a legal basis, a consent change), is sent at
its limit plus one, which must be INVALID_ARGUMENT with the limit's field violation
(named by its path, e.g. ``legal_basis.reference``), and at its limit, which must
not be refused for its length (it is accepted, or refused for another reason;
never INTERNAL or UNKNOWN). On SQLite and PostgreSQL, over real gRPC.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from grpc_support import (
    ADMIN_TOKEN,
    NO_LOCKOUT,
    SESSION_KEY,
    Metadata,
    admin_metadata,
    field_violations,
    member_session,
    sign_up_request,
    vault_session,
)
from pydantic import SecretStr

from privacyvault.v1 import (
    consent_pb2,
    consent_pb2_grpc,
    disclosure_pb2,
    disclosure_pb2_grpc,
    field_limits_pb2,
    key_admin_pb2,
    member_pb2,
    statistics_pb2,
)
from privacyvault.v1 import consent_pb2 as cpb
from privacyvault.v1 import disclosure_pb2 as dpb
from privacyvault.v1 import member_pb2 as pb
from privacyvault.v1.key_admin_pb2_grpc import KeyAdminServiceStub
from privacyvault.v1.member_pb2_grpc import MemberServiceStub
from privacyvault.v1.statistics_pb2_grpc import StatisticsServiceStub
from service.config import Settings
from service.member_rights import CONSENT_RIGHTS, DISCLOSURE_RIGHTS, MEMBER_RIGHTS
from service.server import RunningServer

Code = grpc.StatusCode
PROTOS = Path(__file__).resolve().parent.parent / "protos" / "privacyvault" / "v1"
SERVICES = (
    member_pb2.DESCRIPTOR.services_by_name["MemberService"],
    consent_pb2.DESCRIPTOR.services_by_name["ConsentService"],
    consent_pb2.DESCRIPTOR.services_by_name["PolicyAdminService"],
    statistics_pb2.DESCRIPTOR.services_by_name["StatisticsService"],
    disclosure_pb2.DESCRIPTOR.services_by_name["DisclosureService"],
    disclosure_pb2.DESCRIPTOR.services_by_name["RecipientAdminService"],
    key_admin_pb2.DESCRIPTOR.services_by_name["KeyAdminService"],
)
#: The services whose methods take the member's session, and which methods.
SESSION_RIGHTS = {
    "MemberService": MEMBER_RIGHTS,
    "ConsentService": CONSENT_RIGHTS,
    "DisclosureService": DISCLOSURE_RIGHTS,
}
STUBS: dict[str, Callable[[grpc.aio.Channel], Any]] = {
    "MemberService": MemberServiceStub,
    "ConsentService": consent_pb2_grpc.ConsentServiceStub,
    "PolicyAdminService": consent_pb2_grpc.PolicyAdminServiceStub,
    "StatisticsService": StatisticsServiceStub,
    "DisclosureService": disclosure_pb2_grpc.DisclosureServiceStub,
    "RecipientAdminService": disclosure_pb2_grpc.RecipientAdminServiceStub,
    "KeyAdminService": KeyAdminServiceStub,
}
#: The walk's recipient, registered before it (so Disclose gets past the registry).
WALK_RECIPIENT = dpb.RegisterRecipientRequest(
    recipient_id="walk_recipient",
    legal_entity="Walk Ltd",
    contact_email="privacy@walk.example",
    purposes=["INQUIRY"],
    # The login ID: no correction freezes it (the walk's RequestCorrection freezes
    # the rest), so Disclose at its limits provides it.
    fields=["login_id", "name"],
    legal_basis="the member's consent (section 4)",
    contract_reference="WALK-1",
)
ADMIN = admin_metadata("limits@test")
CLIENT_IP = (("x-client-ip", "192.0.2.77"),)
LONGEST_IP = "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255"  # 45 characters
_unique = itertools.count(1)


def _max_length(field: FieldDescriptor) -> int:
    return int(field.GetOptions().Extensions[field_limits_pb2.max_length])


def _max_items(field: FieldDescriptor) -> int:
    return int(field.GetOptions().Extensions[field_limits_pb2.max_items])


def _request_types() -> dict[str, Any]:
    """Every request message type of both services, and the message types inside them."""
    found: dict[str, Any] = {}

    def visit(descriptor: Any) -> None:
        if descriptor.full_name in found or descriptor.full_name.startswith("google.protobuf."):
            return
        found[descriptor.full_name] = descriptor
        for field in descriptor.fields:
            if field.message_type is not None:
                visit(field.message_type)

    for service in SERVICES:
        for method in service.methods:
            visit(method.input_type)
    return found


# --- the limits are declared and documented -------------------------------------------


def test_every_request_string_and_repeated_field_declares_a_limit() -> None:
    missing = []
    for name, descriptor in _request_types().items():
        for field in descriptor.fields:
            if field.type == FieldDescriptor.TYPE_STRING and not _max_length(field):
                missing.append(f"{name}.{field.name}: max_length")
            is_mask = (
                field.message_type is not None
                and field.message_type.full_name == "google.protobuf.FieldMask"
            )
            if is_mask and not (_max_length(field) and _max_items(field)):
                missing.append(f"{name}.{field.name}: max_items and max_length (paths)")
            if field.is_repeated and not _max_items(field):
                missing.append(f"{name}.{field.name}: max_items")
    assert missing == []


def test_every_limit_is_written_in_the_field_comment() -> None:
    """The proto comments say each limit (what a caller reading the .proto sees)."""
    undocumented = []
    for proto in (p.name for p in sorted(PROTOS.glob("*.proto"))):
        lines = (PROTOS / proto).read_text().splitlines()
        for i, line in enumerate(lines):
            if not re.match(r"\s*(optional |repeated )?[\w.]+ \w+ = \d+", line):
                continue
            # A field's options may span lines: read up to its ';'.
            end = next(j for j in range(i, len(lines)) if ";" in lines[j])
            statement = " ".join(lines[i : end + 1])
            comment = []
            for previous in reversed(lines[:i]):
                if not previous.strip().startswith("//"):
                    break
                comment.append(previous)
            text = " ".join(c.strip().removeprefix("//").strip() for c in reversed(comment))
            for kind, phrase in (("max_length", "{n} characters"), ("max_items", "{n} ")):
                for n in re.findall(rf"\({kind}\) = (\d+)", statement):
                    if f"at most {phrase.format(n=n)}" not in text.lower():
                        undocumented.append(f"{proto}:{i + 1} {kind}={n}")
    assert undocumented == []


# --- every field at its limit and past it, over gRPC ------------------------------------


@dataclass
class Context:
    member_id: str
    login_id: str
    password: str
    #: The member's session, for the member's own rights.
    session: Metadata = ()


def _email(n: int, length: int = 0) -> str:
    """A unique valid address; with ``length``, exactly that long (at most 254)."""
    if not length:
        return f"limits{n:05d}@example.com"
    local = f"limits{n:05d}".ljust(64, "a")
    domain_tail = "." + "b" * 63 + "." + "c" * (length - 65 - 63 - 1 - 63 - 1 - 4) + ".com"
    return f"{local}@{'a' * 63}{domain_tail}"


def _base(method: str, ctx: Context) -> Message:
    """A request for ``method`` whose every field is well-formed."""
    n = next(_unique)
    mid = ctx.member_id
    requests: dict[str, Callable[[], Message]] = {
        "SignUp": lambda: sign_up_request(login_id=f"limits{n:05d}", email=_email(n)),
        "Authenticate": lambda: pb.AuthenticateRequest(login_id=ctx.login_id, password="wrong!!!"),
        "GetMember": lambda: pb.GetMemberRequest(member_id=mid, purpose=pb.PURPOSE_MEMBER_REQUEST),
        "UpdateMember": lambda: pb.UpdateMemberRequest(
            member_id=mid, name="Renamed Member", update_mask={"paths": ["name"]}
        ),
        "ChangePassword": lambda: pb.ChangePasswordRequest(
            member_id=mid, current_password="not the password", new_password="another one 1"
        ),
        "Withdraw": lambda: pb.WithdrawRequest(member_id=mid, password="not the password"),
        "ExportMemberData": lambda: pb.ExportMemberDataRequest(member_id=mid),
        "StreamMemberData": lambda: pb.StreamMemberDataRequest(member_id=mid),
        "RecordAccess": lambda: pb.RecordAccessRequest(
            member_id=mid, action="order.view", ip="192.0.2.1"
        ),
        "ListAccessHistory": lambda: pb.ListAccessHistoryRequest(member_id=mid),
        "FindLoginId": lambda: pb.FindLoginIdRequest(email=_email(n)),
        "StartPasswordReset": lambda: pb.StartPasswordResetRequest(login_id=ctx.login_id),
        "CompletePasswordReset": lambda: pb.CompletePasswordResetRequest(
            token="t" * 43, new_password="another one 1"
        ),
        "EndSession": lambda: pb.EndSessionRequest(member_id=mid),
        "RequestCorrection": lambda: pb.RequestCorrectionRequest(
            member_id=mid, fields=["mobile_phone"], note="the number is old"
        ),
        # No such correction: at the limit, only INVALID_ARGUMENT on correction_id.
        "CloseCorrection": lambda: pb.CloseCorrectionRequest(
            member_id=mid, correction_id="none", reason="verified as correct"
        ),
        "ListCorrections": lambda: pb.ListCorrectionsRequest(member_id=mid),
        "GetStatistics": lambda: statistics_pb2.GetStatisticsRequest(purpose=pb.PURPOSE_STATISTICS),
        "RotateMemberKey": lambda: key_admin_pb2.RotateMemberKeyRequest(member_id=mid),
        "GetConsents": lambda: cpb.GetConsentsRequest(member_id=mid),
        "UpdateConsents": lambda: cpb.UpdateConsentsRequest(
            member_id=mid, changes=[cpb.ConsentChange(purpose_key="INQUIRY", granted=True)]
        ),
        "ListConsentHistory": lambda: cpb.ListConsentHistoryRequest(member_id=mid),
        # Published versions are forever: each request names a new one.
        "PublishPolicyVersion": lambda: cpb.PublishPolicyVersionRequest(
            version=f"walk-{n}", effective_date="2030-01-01", text_sha256="a" * 64
        ),
        "ListPolicyVersions": lambda: cpb.ListPolicyVersionsRequest(),
        "Disclose": lambda: dpb.DiscloseRequest(
            member_id=mid,
            recipient_id=WALK_RECIPIENT.recipient_id,
            purpose=pb.PURPOSE_INQUIRY,
            fields=["login_id"],
            legal_basis=dpb.LegalBasis(reference="court order 1", approved_by="the officer"),
        ),
        "ListDisclosures": lambda: dpb.ListDisclosuresRequest(member_id=mid),
        "RegisterRecipient": lambda: _recipient(n),
        "ListRecipients": lambda: dpb.ListRecipientsRequest(),
    }
    return requests[method]()


def _recipient(n: int) -> dpb.RegisterRecipientRequest:
    request = dpb.RegisterRecipientRequest()
    request.CopyFrom(WALK_RECIPIENT)
    request.recipient_id = f"walk_{n}"
    return request


def _at_max(field: str, n: int, ctx: Context) -> str:
    """A value of exactly ``n`` characters, valid for the field where one exists."""
    i = next(_unique)
    valid: dict[str, Callable[[], str]] = {
        "login_id": lambda: f"limits{i:05d}".ljust(n, "a"),
        "password": lambda: "p" * n,
        "current_password": lambda: "p" * n,
        "new_password": lambda: "n" * n,
        "name": lambda: "김" * n,  # characters, not bytes: 300 bytes of UTF-8
        "email": lambda: _email(i, n),
        "mobile_phone": lambda: ("+" + " ".join("821012345678901") + "()")[:n],
        "birth_date": lambda: "1990-04-01",
        "member_id": lambda: ("urn:uuid:" + ctx.member_id)[-n:],
        "action": lambda: "a" * n,
        "ip": lambda: LONGEST_IP,
        "recipient_id": lambda: f"walk_{i}".ljust(n, "a"),
        "contact_email": lambda: _email(i, n),
        "effective_date": lambda: "2030-01-01",
        "start_date": lambda: "2026-01-01",
        "end_date": lambda: "2026-01-31",
        "text_sha256": lambda: "a" * n,
        "version": lambda: f"walk-{i}".ljust(n, "v"),
    }
    value = valid.get(field, lambda: "a" * n)()
    assert len(value) == n, (field, len(value))
    return value


async def _call(
    channel: grpc.aio.Channel, method: MethodDescriptor, request: Message, ctx: Context
) -> None:
    service = method.containing_service
    stub = STUBS[service.name](channel)
    metadata = ADMIN if service.name == "KeyAdminService" else CLIENT_IP
    if method.name in SESSION_RIGHTS.get(service.name, {}):
        session = ctx.session
        if method.name == "EndSession":  # a session of its own to end, not ctx's
            login = pb.AuthenticateRequest(login_id=ctx.login_id, password=ctx.password)
            auth = await MemberServiceStub(channel).Authenticate(login, metadata=CLIENT_IP)
            session = ((SESSION_KEY, auth.session_token),)
        metadata = (*metadata, *session)
    call = getattr(stub, method.name)(request, metadata=metadata, timeout=30)
    if method.server_streaming:
        async for _ in call:
            pass
    else:
        await call


Path_ = tuple[FieldDescriptor, ...]


def _limited(descriptor: Any, chain: Path_ = ()) -> list[Path_]:
    """The paths to every limited field of a message type, nested ones included."""
    found: list[Path_] = []
    for field in descriptor.fields:
        path = (*chain, field)
        if _max_length(field) or _max_items(field):
            found.append(path)
        inner = field.message_type
        if inner is not None and not inner.full_name.startswith("google.protobuf."):
            found.extend(_limited(inner, path))
    return found


def _cases() -> list[tuple[MethodDescriptor, Path_]]:
    return [
        (method, path)
        for service in SERVICES
        for method in service.methods
        for path in _limited(method.input_type)
    ]


def _name(path: Path_) -> str:
    """The field violation's name: ``legal_basis.reference``, ``changes[0].purpose_key``."""
    return (
        ".".join(f.name + ("[0]" if f.is_repeated else "") for f in path[:-1])
        + ("." if len(path) > 1 else "")
        + path[-1].name
    )


def _set(request: Message, path: Path_, value: object) -> None:
    message: Any = request
    for parent in path[:-1]:  # into the (first item of the) enclosing message
        inner = getattr(message, parent.name)
        if parent.is_repeated and not len(inner):
            inner.add()
        message = inner[0] if parent.is_repeated else inner
    field = path[-1]
    if field.is_repeated:  # replacing what the base request had
        del getattr(message, field.name)[:]
        getattr(message, field.name).extend(value)
    elif field.message_type is not None:  # a FieldMask: the value is its paths
        paths = getattr(message, field.name).paths
        del paths[:]
        paths.extend(value)
    else:
        setattr(message, field.name, value)


#: Valid items of repeated fields, repeated as need be to reach a limit.
ITEM_VALUES = {
    "fields": ["name", "email", "mobile_phone", "login_id"],
    "purposes": ["INQUIRY"],
    "changed_purposes": ["INQUIRY"],
}
ITEM_MESSAGES: dict[str, Message] = {
    "consents": pb.ConsentChoice(purpose=pb.PURPOSE_INQUIRY, granted=True),
    "changes": cpb.ConsentChange(purpose_key="INQUIRY", granted=True),
}


def _values(field: FieldDescriptor, ctx: Context) -> list[tuple[str, object, object]]:
    """(what, value at the limit, value one past it) for each limit of ``field``."""
    out: list[tuple[str, object, object]] = []
    if field.message_type is not None and not field.is_repeated:  # update_mask
        out.append(
            ("paths", ["name", "email", "mobile_phone"], ["name", "email", "mobile_phone", "name"])
        )
        n = _max_length(field)
        out.append(("path length", ["a" * n], ["a" * (n + 1)]))
    elif field.is_repeated and field.type == FieldDescriptor.TYPE_STRING:  # fields, purposes
        n = _max_items(field)
        valid = ITEM_VALUES[field.name]
        out.append(("items", (valid * n)[:n], (valid * (n + 1))[: n + 1]))
        n = _max_length(field)
        out.append(("item length", ["a" * n], ["a" * (n + 1)]))
    elif field.is_repeated:  # consents, consent changes
        n = _max_items(field)
        item = ITEM_MESSAGES[field.name]
        out.append(("items", [item] * n, [item] * (n + 1)))
    else:
        n = _max_length(field)
        at_max = _at_max(field.name, n, ctx)
        out.append(("length", at_max, at_max + "x"))
        out.append(("length (non-ASCII)", _at_max(field.name, n, ctx), "가" * (n + 1)))
    return out


def _limit_description(field: FieldDescriptor, what: str) -> str:
    if what == "paths":
        return f"must name at most {_max_items(field)} paths"
    if what == "path length":
        return f"paths must be at most {_max_length(field)} characters"
    if what == "items":
        return f"must have at most {_max_items(field)} items"
    if what == "item length":
        return f"items must be at most {_max_length(field)} characters"
    return f"must be at most {_max_length(field)} characters"


@pytest.fixture
def admin_settings(server_settings: Settings) -> Settings:
    """KeyAdminService on, and no lockout within the walk: its at-the-limit passwords are
    wrong ones, which would lock the account and refuse the walk's own logins part-way."""
    return server_settings.model_copy(update={"admin_token": SecretStr(ADMIN_TOKEN), **NO_LOCKOUT})


async def test_every_field_past_its_limit_is_refused_and_at_its_limit_is_not(
    admin_channel: grpc.aio.Channel,
) -> None:
    members = MemberServiceStub(admin_channel)
    first = sign_up_request()
    member_id = (await members.SignUp(first)).member_id
    session = await member_session(members, first)
    ctx = Context(member_id, first.login_id, first.password, session)
    registry = disclosure_pb2_grpc.RecipientAdminServiceStub(admin_channel)
    await registry.RegisterRecipient(WALK_RECIPIENT)
    cases = _cases()
    walked = {(m.containing_service.name, m.name) for m, _ in cases}
    # Every method of every service that takes a limited field is in the walk.
    assert walked == {
        (service.name, method.name)
        for service in SERVICES
        for method in service.methods
        if _limited(method.input_type)
    }
    assert {service for service, _ in walked} == {s.name for s in SERVICES}
    assert len(cases) >= 60
    problems: list[str] = []
    checked = 0
    for method, path in cases:
        field, name = path[-1], _name(path)
        for what, at_max, past in _values(field, ctx):
            label = f"{method.containing_service.name}.{method.name}.{name} ({what})"
            limit = _limit_description(field, what)

            request = _base(method.name, ctx)
            _set(request, path, past)
            try:
                await _call(admin_channel, method, request, ctx)
                problems.append(f"{label}: past the limit was accepted")
            except grpc.aio.AioRpcError as error:
                if error.code() != Code.INVALID_ARGUMENT:
                    problems.append(f"{label}: past the limit gave {error.code().name}")
                elif field_violations(error) != {name: limit}:
                    problems.append(f"{label}: past the limit gave {field_violations(error)}")

            request = _base(method.name, ctx)
            _set(request, path, at_max)
            try:
                await _call(admin_channel, method, request, ctx)
            except grpc.aio.AioRpcError as error:
                if error.code() in (Code.INTERNAL, Code.UNKNOWN):
                    problems.append(f"{label}: at the limit gave {error.code().name}")
                elif error.code() == Code.INVALID_ARGUMENT:
                    if field_violations(error).get(name) == limit:
                        problems.append(f"{label}: at the limit was refused for its length")
                elif error.code() not in AT_MAX_REFUSALS.get(method.name, ()):
                    problems.append(f"{label}: at the limit gave {error.code().name}")
            checked += 1
    assert problems == [], "\n".join(problems)
    assert checked == sum(len(_values(p[-1], ctx)) for _, p in cases)


#: What a request at its limits may be refused with, other than INVALID_ARGUMENT: a
#: wrong password on purpose; for Disclose, a recipient id at the limit no one
#: registered.
AT_MAX_REFUSALS: dict[str, tuple[grpc.StatusCode, ...]] = {
    "Authenticate": (Code.UNAUTHENTICATED,),
    "ChangePassword": (Code.UNAUTHENTICATED,),
    "Withdraw": (Code.UNAUTHENTICATED,),
    "Disclose": (Code.NOT_FOUND,),
}


# --- IP addresses ----------------------------------------------------------------------


async def _history_ips(
    members: MemberServiceStub, server: RunningServer, member_id: str
) -> list[str]:
    # A session from the vault itself: a login would add an entry to what is counted.
    session = await vault_session(server, member_id)
    request = pb.ListAccessHistoryRequest(member_id=member_id)
    page = await members.ListAccessHistory(request, metadata=session)
    return [e.ip for e in page.entries]


BAD_IPS = [
    "fe80::1%eth0",
    "fe80::1%Kim Jisoo 010-1234-5678\n",
    "fe80::1%" + "x" * 60_000,
    "::ffff:192.0.2.1%1",
    LONGEST_IP + "0",
    " " + LONGEST_IP,  # 46 characters as sent
    "192.0.2.1/24",
    "",
]


async def test_record_access_refuses_zone_ids_and_oversized_addresses(
    admin_channel: grpc.aio.Channel, admin_server: RunningServer
) -> None:
    members = MemberServiceStub(admin_channel)
    member_id = (await members.SignUp(sign_up_request())).member_id
    for ip in BAD_IPS:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await members.RecordAccess(
                pb.RecordAccessRequest(member_id=member_id, action="order.view", ip=ip)
            )
        assert caught.value.code() == Code.INVALID_ARGUMENT, repr(ip)
        assert set(field_violations(caught.value)) == {"ip"}
        assert "Kim" not in (caught.value.details() or "")
    assert await _history_ips(members, admin_server, member_id) == []


async def test_authenticate_refuses_zone_ids_and_oversized_client_ips(
    admin_channel: grpc.aio.Channel, admin_server: RunningServer
) -> None:
    members = MemberServiceStub(admin_channel)
    request = sign_up_request()
    member_id = (await members.SignUp(request)).member_id
    auth = pb.AuthenticateRequest(login_id=request.login_id, password=request.password)
    # Metadata cannot carry a newline; 60 KiB would pass the default 8 KiB metadata
    # limit neither, so the longest bad values here are what metadata can carry.
    for ip in [i for i in BAD_IPS if "\n" not in i and len(i) < 4096 and i]:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await members.Authenticate(auth, metadata=(("x-client-ip", ip),))
        assert caught.value.code() == Code.INVALID_ARGUMENT, repr(ip)
        assert set(field_violations(caught.value)) == {"x-client-ip"}
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await members.Authenticate(auth, metadata=(("x-client-ip", "fe80::1%" + "x" * 4000),))
    assert caught.value.code() == Code.INVALID_ARGUMENT
    assert await _history_ips(members, admin_server, member_id) == []


@pytest.mark.parametrize(
    ("sent", "stored"),
    [
        ("::ffff:192.0.2.1", "192.0.2.1"),
        ("::FFFF:C000:0201", "192.0.2.1"),
        ("0:0:0:0:0:ffff:198.51.100.7", "198.51.100.7"),
        ("2001:DB8:0:0:0:0:0:7", "2001:db8::7"),
        (LONGEST_IP, "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"),
        ("203.0.113.9", "203.0.113.9"),
    ],
)
async def test_addresses_are_stored_in_canonical_form(
    admin_channel: grpc.aio.Channel, admin_server: RunningServer, sent: str, stored: str
) -> None:
    members = MemberServiceStub(admin_channel)
    request = sign_up_request()
    member_id = (await members.SignUp(request)).member_id
    await members.RecordAccess(
        pb.RecordAccessRequest(member_id=member_id, action="order.view", ip=sent)
    )
    await members.Authenticate(
        pb.AuthenticateRequest(login_id=request.login_id, password=request.password),
        metadata=(("x-client-ip", sent),),
    )
    assert await _history_ips(members, admin_server, member_id) == [stored, stored]
