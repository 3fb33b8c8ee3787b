"""DisclosureService and RecipientAdminService over real gRPC, on SQLite and
PostgreSQL: provision only with the member's consent to that recipient or a recorded
legal basis, only the recipient's fields, one ledger entry each, which the member
lists and exports; a withdrawal takes the ledger into retention or shreds it."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from grpc_support import (
    admin_metadata,
    embedded_settings,
    error_info,
    field_violations,
    member_session,
)
from grpc_support import sign_up_request as sign_up
from mail_support import SmtpServer, lf_body, outbox, relay_for, smtp_mailer
from process_support import cli_env, run_cli

from privacyvault.v1 import consent_pb2 as cpb
from privacyvault.v1 import consent_pb2_grpc, disclosure_pb2_grpc
from privacyvault.v1 import disclosure_pb2 as dpb
from privacyvault.v1 import key_admin_pb2 as kpb
from privacyvault.v1 import member_pb2 as pb
from privacyvault.v1.key_admin_pb2_grpc import KeyAdminServiceStub
from privacyvault.v1.member_pb2_grpc import MemberServiceStub
from service.caller_policy import CallerPolicyInvalid, parse_policy
from service.callers import policy_methods
from service.config import Settings
from service.server import POLICY_SERVICES, RunningServer, run_server
from service.sidecar import Sidecar
from vault import FrozenClock
from vault.lifecycle import RoundReport

Code = grpc.StatusCode
Metadata = tuple[tuple[str, str], ...]
ACME = dpb.RegisterRecipientRequest(
    recipient_id="acme_delivery",
    legal_entity="ACME Delivery Ltd",
    contact_email="privacy@acme.example",
    purposes=["INQUIRY"],
    fields=["name", "mobile_phone"],
    legal_basis="the member's consent to provision (policy section 4)",
    contract_reference="ACME-2026-01",
)
CONSENT_KEY = "PROVIDE_TO_ACME_DELIVERY"
COURT_ORDER = dpb.LegalBasis(reference="court order 2026-117", approved_by="the privacy officer")


@pytest.fixture
def disclosures(channel: grpc.aio.Channel) -> disclosure_pb2_grpc.DisclosureServiceStub:
    return disclosure_pb2_grpc.DisclosureServiceStub(channel)


@pytest.fixture
async def registry(
    channel: grpc.aio.Channel,
) -> disclosure_pb2_grpc.RecipientAdminServiceStub:
    stub = disclosure_pb2_grpc.RecipientAdminServiceStub(channel)
    await stub.RegisterRecipient(ACME)
    return stub


@pytest.fixture
def consents(channel: grpc.aio.Channel) -> consent_pb2_grpc.ConsentServiceStub:
    return consent_pb2_grpc.ConsentServiceStub(channel)


async def fails(call: Any, code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    return caught.value


async def member(members: MemberServiceStub, **overrides: Any) -> tuple[str, Metadata]:
    request = sign_up(mobile_phone="010-1234-5678", **overrides)
    member_id = (await members.SignUp(request)).member_id
    return member_id, await member_session(members, request)


async def consent(
    consents: consent_pb2_grpc.ConsentServiceStub,
    member_id: str,
    session: Metadata,
    granted: bool = True,
) -> None:
    await consents.UpdateConsents(
        cpb.UpdateConsentsRequest(
            member_id=member_id,
            changes=[cpb.ConsentChange(purpose_key=CONSENT_KEY, granted=granted)],
        ),
        metadata=session,
    )


def disclose(member_id: str, *fields: str, **extra: Any) -> dpb.DiscloseRequest:
    request: dict[str, Any] = {
        "member_id": member_id,
        "recipient_id": "acme_delivery",
        "purpose": pb.PURPOSE_INQUIRY,
        "fields": list(fields or ("name", "mobile_phone")),
    }
    return dpb.DiscloseRequest(**(request | extra))


async def ledger(
    disclosures: disclosure_pb2_grpc.DisclosureServiceStub, member_id: str, session: Metadata
) -> list[dpb.Disclosure]:
    reply = await disclosures.ListDisclosures(
        dpb.ListDisclosuresRequest(member_id=member_id), metadata=session
    )
    return list(reply.disclosures)


# --- the registry -------------------------------------------------------------------------


async def test_the_registry_registers_once_and_checks_every_field(
    registry: disclosure_pb2_grpc.RecipientAdminServiceStub,
    members: MemberServiceStub,
    consents: consent_pb2_grpc.ConsentServiceStub,
) -> None:
    (listed,) = (await registry.ListRecipients(dpb.ListRecipientsRequest())).recipients
    assert listed.recipient_id == "acme_delivery"
    assert sorted(listed.fields) == ["mobile_phone", "name"]
    assert list(listed.purposes) == ["INQUIRY"]
    assert listed.contract_reference == "ACME-2026-01"
    assert listed.registered_by == "local"
    assert listed.consent_purpose_key == CONSENT_KEY
    taken = await fails(registry.RegisterRecipient(ACME), Code.ALREADY_EXISTS)
    assert error_info(taken).reason == "RECIPIENT_ID_TAKEN"
    bad = dpb.RegisterRecipientRequest(
        recipient_id="ACME",
        legal_entity=" ",
        contact_email="not an address",
        purposes=["MEMBER_REQUEST", "NOPE"],
        fields=["password_hash"],
        legal_basis="",
        contract_reference="c",
    )
    error = await fails(registry.RegisterRecipient(bad), Code.INVALID_ARGUMENT)
    assert set(field_violations(error)) == {
        "recipient_id",
        "legal_entity",
        "contact_email",
        "purposes[0]",
        "purposes[1]",
        "fields[0]",
        "legal_basis",
    }
    # The recipient is an opt-in purpose the member can answer, not granted yet.
    member_id, session = await member(members)
    reply = await consents.GetConsents(
        cpb.GetConsentsRequest(member_id=member_id), metadata=session
    )
    state = {s.purpose_key: s for s in reply.consents}[CONSENT_KEY]
    assert state.kind == cpb.CONSENT_KIND_OPT_IN
    assert not state.granted
    assert sorted(state.fields) == ["mobile_phone", "name"]
    assert "ACME Delivery Ltd" in state.legal_basis


# --- provision ----------------------------------------------------------------------------


async def test_without_consent_or_basis_nothing_is_provided_or_recorded(
    registry: disclosure_pb2_grpc.RecipientAdminServiceStub,
    members: MemberServiceStub,
    consents: consent_pb2_grpc.ConsentServiceStub,
    disclosures: disclosure_pb2_grpc.DisclosureServiceStub,
) -> None:
    member_id, session = await member(members)
    error = await fails(disclosures.Disclose(disclose(member_id)), Code.PERMISSION_DENIED)
    info = error_info(error)
    assert info.reason == "NO_CONSENT_TO_PROVIDE"
    assert dict(info.metadata) == {}  # nothing of the request echoed
    # A refusal recorded is no consent either.
    await consent(consents, member_id, session, granted=False)
    error = await fails(disclosures.Disclose(disclose(member_id)), Code.PERMISSION_DENIED)
    assert error_info(error).reason == "NO_CONSENT_TO_PROVIDE"
    assert await ledger(disclosures, member_id, session) == []


async def test_with_consent_only_the_recipients_fields_and_one_entry(
    registry: disclosure_pb2_grpc.RecipientAdminServiceStub,
    members: MemberServiceStub,
    consents: consent_pb2_grpc.ConsentServiceStub,
    disclosures: disclosure_pb2_grpc.DisclosureServiceStub,
) -> None:
    member_id, session = await member(members, name="Provided Name")
    await consent(consents, member_id, session)
    # A field the recipient may not receive is refused, before anything is read.
    error = await fails(
        disclosures.Disclose(disclose(member_id, "name", "email")), Code.INVALID_ARGUMENT
    )
    assert set(field_violations(error)) == {"fields[1]"}
    error = await fails(
        disclosures.Disclose(
            disclose(member_id, "name", purpose=pb.PURPOSE_STATISTICS)  # not its purpose
        ),
        Code.INVALID_ARGUMENT,
    )
    assert set(field_violations(error)) == {"purpose"}
    assert await ledger(disclosures, member_id, session) == []

    reply = await disclosures.Disclose(disclose(member_id, "name", "mobile_phone"))
    assert [(f.field, f.value) for f in reply.fields] == [
        ("name", "Provided Name"),
        ("mobile_phone", "01012345678"),
    ]
    (entry,) = await ledger(disclosures, member_id, session)
    assert entry.disclosure_id == reply.disclosure_id
    assert (entry.recipient_id, entry.legal_entity, entry.purpose_key) == (
        "acme_delivery",
        "ACME Delivery Ltd",
        "INQUIRY",
    )
    assert list(entry.fields) == ["name", "mobile_phone"]
    assert entry.basis == dpb.DISCLOSURE_BASIS_CONSENT
    assert entry.caller == "local"
    assert entry.disclosed_at == reply.disclosed_at
    assert not entry.legal_reference

    # The member withdraws: the very next provision is refused.
    await consent(consents, member_id, session, granted=False)
    error = await fails(disclosures.Disclose(disclose(member_id)), Code.PERMISSION_DENIED)
    assert error_info(error).reason == "NO_CONSENT_TO_PROVIDE"
    assert len(await ledger(disclosures, member_id, session)) == 1


async def test_a_legal_basis_provides_without_consent_and_is_recorded(
    registry: disclosure_pb2_grpc.RecipientAdminServiceStub,
    members: MemberServiceStub,
    disclosures: disclosure_pb2_grpc.DisclosureServiceStub,
) -> None:
    member_id, session = await member(members, name="Lawful Name")
    empty = dpb.LegalBasis(reference=" ", approved_by="")
    error = await fails(
        disclosures.Disclose(disclose(member_id, "name", legal_basis=empty)),
        Code.INVALID_ARGUMENT,
    )
    assert set(field_violations(error)) == {
        "legal_basis.reference",
        "legal_basis.approved_by",
    }
    reply = await disclosures.Disclose(disclose(member_id, "name", legal_basis=COURT_ORDER))
    assert [(f.field, f.value) for f in reply.fields] == [("name", "Lawful Name")]
    (entry,) = await ledger(disclosures, member_id, session)
    assert entry.basis == dpb.DISCLOSURE_BASIS_LEGAL
    assert (entry.legal_reference, entry.approved_by) == (
        "court order 2026-117",
        "the privacy officer",
    )
    assert list(entry.fields) == ["name"]


async def test_unknown_recipients_and_members_are_not_found(
    registry: disclosure_pb2_grpc.RecipientAdminServiceStub,
    members: MemberServiceStub,
    disclosures: disclosure_pb2_grpc.DisclosureServiceStub,
) -> None:
    member_id, _ = await member(members)
    unknown = disclose(member_id)
    unknown.recipient_id = "nobody"
    error = await fails(disclosures.Disclose(unknown), Code.NOT_FOUND)
    assert error_info(error).reason == "RECIPIENT_NOT_FOUND"
    gone = disclose("00000000-0000-4000-8000-000000000000", legal_basis=COURT_ORDER)
    error = await fails(disclosures.Disclose(gone), Code.NOT_FOUND)
    assert error_info(error).reason == "MEMBER_NOT_FOUND"


async def test_a_consent_outdated_by_a_policy_version_refuses_until_given_again(
    registry: disclosure_pb2_grpc.RecipientAdminServiceStub,
    members: MemberServiceStub,
    consents: consent_pb2_grpc.ConsentServiceStub,
    disclosures: disclosure_pb2_grpc.DisclosureServiceStub,
    channel: grpc.aio.Channel,
    clock: FrozenClock,
) -> None:
    member_id, session = await member(members)
    await consent(consents, member_id, session)
    await disclosures.Disclose(disclose(member_id))
    clock.advance(timedelta(minutes=1))
    officer = consent_pb2_grpc.PolicyAdminServiceStub(channel)
    await officer.PublishPolicyVersion(
        cpb.PublishPolicyVersionRequest(
            version="2",
            effective_date=clock.now().date().isoformat(),
            text_sha256="5" * 64,
            changed_purposes=[CONSENT_KEY],
        )
    )
    clock.advance(timedelta(minutes=1))
    error = await fails(disclosures.Disclose(disclose(member_id)), Code.PERMISSION_DENIED)
    assert error_info(error).reason == "CONSENT_OUTDATED"
    await consent(consents, member_id, session)  # asked again, answered again
    await disclosures.Disclose(disclose(member_id))
    assert len(await ledger(disclosures, member_id, session)) == 2


async def test_the_member_pages_through_their_ledger_with_their_session(
    registry: disclosure_pb2_grpc.RecipientAdminServiceStub,
    members: MemberServiceStub,
    disclosures: disclosure_pb2_grpc.DisclosureServiceStub,
    clock: FrozenClock,
) -> None:
    member_id, session = await member(members)
    other_id, other_session = await member(members)
    ids = []
    for _ in range(3):
        clock.advance(timedelta(seconds=1))
        reply = await disclosures.Disclose(disclose(member_id, legal_basis=COURT_ORDER))
        ids.append(reply.disclosure_id)
    first = await disclosures.ListDisclosures(
        dpb.ListDisclosuresRequest(member_id=member_id, page_size=2), metadata=session
    )
    assert [d.disclosure_id for d in first.disclosures] == ids[:0:-1]
    second = await disclosures.ListDisclosures(
        dpb.ListDisclosuresRequest(
            member_id=member_id, page_size=2, page_token=first.next_page_token
        ),
        metadata=session,
    )
    assert [d.disclosure_id for d in second.disclosures] == ids[:1]
    assert not second.next_page_token
    # Another member's session, or none, reads nothing; a token is bound to its member.
    for metadata in (other_session, ()):
        error = await fails(
            disclosures.ListDisclosures(
                dpb.ListDisclosuresRequest(member_id=member_id), metadata=metadata
            ),
            Code.UNAUTHENTICATED,
        )
        assert error_info(error).reason == "MEMBER_SESSION_REQUIRED"
    error = await fails(
        disclosures.ListDisclosures(
            dpb.ListDisclosuresRequest(member_id=other_id, page_token=first.next_page_token),
            metadata=other_session,
        ),
        Code.INVALID_ARGUMENT,
    )
    assert set(field_violations(error)) == {"page_token"}


async def test_the_export_holds_the_ledger_and_a_shred_leaves_none(
    registry: disclosure_pb2_grpc.RecipientAdminServiceStub,
    members: MemberServiceStub,
    consents: consent_pb2_grpc.ConsentServiceStub,
    disclosures: disclosure_pb2_grpc.DisclosureServiceStub,
    server: RunningServer,
) -> None:
    password = "a long passphrase 1"
    member_id, session = await member(members)
    await consent(consents, member_id, session)
    await disclosures.Disclose(disclose(member_id, "name"))
    await disclosures.Disclose(disclose(member_id, "mobile_phone", legal_basis=COURT_ORDER))
    reply = await members.ExportMemberData(
        pb.ExportMemberDataRequest(member_id=member_id), metadata=session
    )
    document = json.loads(reply.json)
    assert [(d["fields"], d["basis"]) for d in document["disclosures"]] == [
        (["name"], "consent"),
        (["mobile_phone"], "legal"),
    ]  # oldest first
    assert document["disclosures"][1]["legal_reference"] == "court order 2026-117"
    assert {d["legal_entity"] for d in document["disclosures"]} == {"ACME Delivery Ltd"}

    await members.Withdraw(
        pb.WithdrawRequest(member_id=member_id, password=password), metadata=session
    )
    store = server.vault.parts.store
    assert await store.list_disclosures(member_id, 100) == []
    (record,) = await store.list_destruction_records(member_id)
    assert record.items["disclosure_ledger"] == 2
    assert await store.get_recipient("acme_delivery") is not None


@pytest.fixture
async def retaining_server(
    store_url: str, retention_url: str, tmp_path: Path, clock: FrozenClock
) -> AsyncIterator[RunningServer]:
    settings = embedded_settings(
        tmp_path / "data",
        database_url=store_url,
        retention_database_url=retention_url,
        withdrawal_retention_days=30,
    )
    async with run_server(settings, clock=clock) as running:
        yield running


async def test_a_withdrawal_into_retention_takes_the_ledger_along(
    retaining_server: RunningServer,
) -> None:
    async with grpc.aio.insecure_channel(retaining_server.target) as channel:
        members = MemberServiceStub(channel)
        disclosures = disclosure_pb2_grpc.DisclosureServiceStub(channel)
        await disclosure_pb2_grpc.RecipientAdminServiceStub(channel).RegisterRecipient(ACME)
        request = sign_up()
        member_id = (await members.SignUp(request)).member_id
        session = await member_session(members, request)
        await disclosures.Disclose(disclose(member_id, "name", legal_basis=COURT_ORDER))
        await members.Withdraw(
            pb.WithdrawRequest(member_id=member_id, password=request.password), metadata=session
        )
    vault = retaining_server.vault
    assert await vault.parts.store.list_disclosures(member_id, 100) == []
    document = await vault.retention.disclose(member_id, "officer", "audit 2026-3")
    (entry,) = document["disclosures"]
    assert (entry["recipient_id"], entry["fields"], entry["basis"]) == (
        "acme_delivery",
        ["name"],
        "legal",
    )
    assert entry["approved_by"] == "the privacy officer"
    record = await vault.retention.destroy(member_id, "officer", "the basis ended")
    assert record.items["disclosure_ledger"] == 1


# --- the caller policy and the CLI --------------------------------------------------------

POLICY = """
trust_domain = "example.org"

[[caller]]
identity = "spiffe://example.org/ns/shop/sa/orders"
methods = ["DisclosureService/Disclose"]
purposes = ["INQUIRY"]

[[caller]]
identity = "spiffe://example.org/ns/privacy/sa/officer-tool"
methods = ["RecipientAdminService/RegisterRecipient", "RecipientAdminService/ListRecipients"]
"""


def test_the_caller_policy_names_disclose_with_its_purposes() -> None:
    methods = policy_methods(POLICY_SERVICES)
    policy = parse_policy(POLICY, methods)
    orders = "spiffe://example.org/ns/shop/sa/orders"
    assert policy.allows(orders, "DisclosureService/Disclose", "INQUIRY")
    assert not policy.allows(orders, "DisclosureService/Disclose", "IDENTIFICATION")
    assert not policy.allows(orders, "RecipientAdminService/RegisterRecipient")
    assert not policy.allows(orders, "DisclosureService/ListDisclosures")
    # Disclose states a purpose: an entry granting it must name purposes.
    with pytest.raises(CallerPolicyInvalid, match="no purposes"):
        parse_policy(POLICY.replace('purposes = ["INQUIRY"]\n', ""), methods)


def test_the_cli_registers_and_lists_recipients(tmp_path: Path) -> None:
    env = cli_env(tmp_path / "data")
    args = [
        "recipients",
        "register",
        "--id",
        "acme_delivery",
        "--legal-entity",
        "ACME Delivery Ltd",
        "--contact-email",
        "privacy@acme.example",
        "--purpose",
        "INQUIRY",
        "--field",
        "name",
        "--legal-basis",
        "the member's consent (section 4)",
        "--contract",
        "ACME-2026-01",
        "--actor",
        "officer",
    ]
    bad = run_cli([*args[:-6], "--field", "password_hash", *args[-6:]], env, tmp_path)
    assert bad.returncode == 2, bad.stderr
    assert "fields[1]" in bad.stderr
    done = run_cli(args, env, tmp_path)
    assert done.returncode == 0, done.stderr
    (line,) = [json.loads(x) for x in done.stdout.splitlines()]
    assert line["type"] == "registered"
    assert line["consent_purpose_key"] == CONSENT_KEY
    assert line["registered_by"] == "officer"
    again = run_cli(args, env, tmp_path)
    assert again.returncode == 1  # the id is taken
    listed = run_cli(["recipients", "list"], env, tmp_path)
    assert [json.loads(x)["recipient_id"] for x in listed.stdout.splitlines()] == ["acme_delivery"]


async def test_a_member_key_rotation_reseals_the_ledger(
    admin_channel: grpc.aio.Channel,
) -> None:
    members = MemberServiceStub(admin_channel)
    disclosures = disclosure_pb2_grpc.DisclosureServiceStub(admin_channel)
    await disclosure_pb2_grpc.RecipientAdminServiceStub(admin_channel).RegisterRecipient(ACME)
    member_id, session = await member(members)
    await disclosures.Disclose(disclose(member_id, "name", legal_basis=COURT_ORDER))
    keys = KeyAdminServiceStub(admin_channel)
    rotated = await keys.RotateMemberKey(
        kpb.RotateMemberKeyRequest(member_id=member_id), metadata=admin_metadata("security")
    )
    assert rotated.dek_id == 2
    # Sealed under the new DEK: the entry still opens, and new ones append under it.
    await disclosures.Disclose(disclose(member_id, "mobile_phone", legal_basis=COURT_ORDER))
    entries = await ledger(disclosures, member_id, session)
    assert [list(e.fields) for e in entries] == [["mobile_phone"], ["name"]]
    assert {e.legal_reference for e in entries} == {"court order 2026-117"}


# --- corrections (policy section 7) -------------------------------------------------------


async def request_correction(
    members: MemberServiceStub, member_id: str, session: Metadata, *fields: str
) -> None:
    await members.RequestCorrection(
        pb.RequestCorrectionRequest(member_id=member_id, fields=list(fields)), metadata=session
    )


async def test_a_pending_correction_blocks_disclosure_of_exactly_its_fields(
    registry: disclosure_pb2_grpc.RecipientAdminServiceStub,
    members: MemberServiceStub,
    consents: consent_pb2_grpc.ConsentServiceStub,
    disclosures: disclosure_pb2_grpc.DisclosureServiceStub,
) -> None:
    member_id, session = await member(members)
    await consent(consents, member_id, session)
    await request_correction(members, member_id, session, "name")
    for request in (
        disclose(member_id, "name"),
        disclose(member_id, "mobile_phone", "name"),
        disclose(member_id, "name", legal_basis=COURT_ORDER),  # no basis unfreezes it
    ):
        error = await fails(disclosures.Disclose(request), Code.FAILED_PRECONDITION)
        assert error_info(error).reason == "CORRECTION_PENDING"
    reply = await disclosures.Disclose(disclose(member_id, "mobile_phone"))
    assert [f.field for f in reply.fields] == ["mobile_phone"]
    assert [list(e.fields) for e in await ledger(disclosures, member_id, session)] == [
        ["mobile_phone"]
    ]


def recipient(recipient_id: str, *fields: str) -> dpb.RegisterRecipientRequest:
    request = dpb.RegisterRecipientRequest()
    request.CopyFrom(ACME)
    request.recipient_id = recipient_id
    request.legal_entity = f"{recipient_id.title()} Ltd"
    request.contact_email = f"privacy@{recipient_id}.example"
    del request.fields[:]
    request.fields.extend(fields)
    return request


async def test_applying_a_correction_notifies_exactly_the_recipients_of_the_old_value(
    channel: grpc.aio.Channel,
    members: MemberServiceStub,
    disclosures: disclosure_pb2_grpc.DisclosureServiceStub,
    server: RunningServer,
    clock: FrozenClock,
    smtp_server: SmtpServer,
) -> None:
    registry = disclosure_pb2_grpc.RecipientAdminServiceStub(channel)
    for rid, fields in (
        ("acme", ("name", "mobile_phone")),
        ("beta", ("name", "email")),
        ("gamma", ("mobile_phone",)),
        ("delta", ("name",)),
    ):
        await registry.RegisterRecipient(recipient(rid, *fields))
    request = sign_up(name="Old Name", mobile_phone="010-1111-2222")
    member_id = (await members.SignUp(request)).member_id
    session = await member_session(members, request)
    bystander, _ = await member(members)

    def to(rid: str, *fields: str, mid: str = member_id) -> dpb.DiscloseRequest:
        got = disclose(mid, *fields, legal_basis=COURT_ORDER)
        got.recipient_id = rid
        return got

    await disclosures.Disclose(to("acme", "name", "mobile_phone"))
    await disclosures.Disclose(to("beta", "email"))  # not a corrected field
    await disclosures.Disclose(to("gamma", "mobile_phone"))
    await disclosures.Disclose(to("delta", "name", mid=bystander))  # another member
    clock.advance(timedelta(minutes=1))
    await request_correction(members, member_id, session, "name", "mobile_phone")
    clock.advance(timedelta(minutes=1))
    await members.UpdateMember(
        pb.UpdateMemberRequest(
            member_id=member_id,
            name="New Name",
            mobile_phone="010-3333-4444",
            update_mask=FieldMask(paths=["name", "mobile_phone"]),
        ),
        metadata=session,
    )
    # The update's transaction records the notices as owed; the sidecar's round
    # queues them (each with its ledger entry) and its relay sends them.
    assert await notices_in(disclosures, member_id, session) == {}
    report = await sidecar_round(server, clock, smtp_server)
    assert (report.correction_notices, report.mail_sent) == (2, 2)
    entries = await ledger(disclosures, member_id, session)
    assert await notices_in(disclosures, member_id, session) == {
        "acme": ["name", "mobile_phone"],
        "gamma": ["mobile_phone"],
    }
    mails = {m.rcpt_tos[0]: m for m in smtp_server.handler.received}
    assert set(mails) == {"privacy@acme.example", "privacy@gamma.example"}
    acme = lf_body(mails["privacy@acme.example"].message)
    assert "name: New Name" in acme
    assert "mobile phone number: 01033334444" in acme
    gamma = lf_body(mails["privacy@gamma.example"].message)
    assert "mobile phone number: 01033334444" in gamma
    assert "New Name" not in gamma  # it never received the name
    for mail in mails.values():
        text = lf_body(mail.message)
        # Nothing of the member but the corrected values of fields it received.
        for other in ("Old Name", "01011112222", request.email, request.login_id):
            assert other not in text
        assert "Old Name" not in str(mail.message["To"])
    (acme_ref,) = [e for e in entries if e.recipient_id == "acme" and e.basis == 2]
    assert f"#{acme_ref.disclosure_id}" in acme

    # A later update that completes no correction notifies nobody; another round
    # sends nothing again.
    await members.UpdateMember(
        pb.UpdateMemberRequest(
            member_id=member_id, name="Newer Name", update_mask=FieldMask(paths=["name"])
        ),
        metadata=session,
    )
    report = await sidecar_round(server, clock, smtp_server)
    assert (report.correction_notices, report.mail_sent) == (0, 0)
    assert len(await ledger(disclosures, member_id, session)) == len(entries)
    assert len(smtp_server.handler.received) == 2


async def sidecar_round(
    server: RunningServer, clock: FrozenClock, smtp_server: SmtpServer, *, dry_run: bool = False
) -> RoundReport:
    """A round of the lifecycle sidecar on the server's vault (its lease, its steps),
    with the outbox relay to the test's SMTP server."""
    relay = relay_for(server, smtp_mailer(smtp_server.port), clock)
    vault = server.vault
    # One holder for every round of a test: it takes its own lease again.
    sidecar = Sidecar(
        vault.lifecycle(), vault.leases, clock, interval=60, holder="test:1:x", relay=relay
    )
    report = await sidecar.run_round(dry_run=dry_run)
    assert report is not None
    return report


async def notices_in(
    disclosures: disclosure_pb2_grpc.DisclosureServiceStub, member_id: str, session: Metadata
) -> dict[str, list[str]]:
    """The member's correction notices in their ledger: recipient -> fields."""
    return {
        e.recipient_id: list(e.fields)
        for e in await ledger(disclosures, member_id, session)
        if e.basis == dpb.DISCLOSURE_BASIS_CORRECTION
    }


async def corrected_member(
    channel: grpc.aio.Channel, *, register: bool = True
) -> tuple[str, Metadata, str]:
    """A member whose name ACME received, then corrected by UpdateMember: the
    update has committed and one notice (to ACME) is owed, nothing queued yet.
    Returns the member id, their session and their password."""
    members = MemberServiceStub(channel)
    disclosures = disclosure_pb2_grpc.DisclosureServiceStub(channel)
    if register:
        await disclosure_pb2_grpc.RecipientAdminServiceStub(channel).RegisterRecipient(ACME)
    request = sign_up(name="Old Name", mobile_phone="010-1111-2222")
    member_id = (await members.SignUp(request)).member_id
    session = await member_session(members, request)
    await disclosures.Disclose(disclose(member_id, "name", legal_basis=COURT_ORDER))
    await request_correction(members, member_id, session, "name")
    await members.UpdateMember(
        pb.UpdateMemberRequest(
            member_id=member_id, name="New Name", update_mask=FieldMask(paths=["name"])
        ),
        metadata=session,
    )
    assert await notices_in(disclosures, member_id, session) == {}
    return member_id, session, request.password


async def test_notices_owed_at_a_crash_go_out_once_from_a_fresh_server(
    server_settings: Settings, clock: FrozenClock, smtp_server: SmtpServer
) -> None:
    # The first process commits the update (notices owed) and stops before any
    # sidecar round: as a crash right after UpdateMember's transaction would.
    async with run_server(server_settings, clock=clock) as first:
        channel = grpc.aio.insecure_channel(first.target)
        member_id, session, _ = await corrected_member(channel)
        await channel.close()
    assert smtp_server.handler.received == []
    # A fresh process on the same database: its sidecar queues and sends the notice.
    async with run_server(server_settings, clock=clock) as second:
        done = await sidecar_round(second, clock, smtp_server)
        again = await sidecar_round(second, clock, smtp_server)
        async with grpc.aio.insecure_channel(second.target) as channel:
            disclosures = disclosure_pb2_grpc.DisclosureServiceStub(channel)
            assert await notices_in(disclosures, member_id, session) == {"acme_delivery": ["name"]}
    assert (done.correction_notices, done.mail_sent) == (1, 1)
    assert (again.correction_notices, again.mail_sent) == (0, 0)  # exactly once
    (mail,) = smtp_server.handler.received
    assert mail.rcpt_tos == ["privacy@acme.example"]
    assert "name: New Name" in lf_body(mail.message)


async def test_a_dry_run_counts_the_notices_owed_and_queues_none(
    server: RunningServer, channel: grpc.aio.Channel, clock: FrozenClock, smtp_server: SmtpServer
) -> None:
    member_id, session, _ = await corrected_member(channel)
    report = await sidecar_round(server, clock, smtp_server, dry_run=True)
    assert report.correction_notices == 1
    disclosures = disclosure_pb2_grpc.DisclosureServiceStub(channel)
    assert await notices_in(disclosures, member_id, session) == {}
    report = await sidecar_round(server, clock, smtp_server)
    assert report.correction_notices == 1


async def test_a_notice_owed_is_made_under_the_members_key_rotated_since(
    admin_channel: grpc.aio.Channel,
    admin_server: RunningServer,
    clock: FrozenClock,
    smtp_server: SmtpServer,
) -> None:
    member_id, session, _ = await corrected_member(admin_channel)
    rotated = await KeyAdminServiceStub(admin_channel).RotateMemberKey(
        kpb.RotateMemberKeyRequest(member_id=member_id), metadata=admin_metadata("security")
    )
    assert rotated.dek_id == 2
    report = await sidecar_round(admin_server, clock, smtp_server)
    assert (report.correction_notices, report.mail_sent) == (1, 1)
    (mail,) = smtp_server.handler.received
    assert "name: New Name" in lf_body(mail.message)
    disclosures = disclosure_pb2_grpc.DisclosureServiceStub(admin_channel)
    assert await notices_in(disclosures, member_id, session) == {"acme_delivery": ["name"]}


async def test_a_shred_before_the_notice_is_sent_drops_it(
    server: RunningServer, channel: grpc.aio.Channel, clock: FrozenClock, smtp_server: SmtpServer
) -> None:
    members = MemberServiceStub(channel)
    # Shredded while the notice is owed: the debt goes with the member.
    owed, owed_session, owed_password = await corrected_member(channel)
    await members.Withdraw(
        pb.WithdrawRequest(member_id=owed, password=owed_password), metadata=owed_session
    )
    assert await server.vault.lifecycle().send_correction_notices() == 0
    # Shredded after the notice was queued, before the relay: the shred takes the
    # queued notice along (its sealed address and values with the member's key).
    queued, queued_session, password = await corrected_member(channel, register=False)
    assert await server.vault.lifecycle().send_correction_notices() == 1
    store = server.vault.parts.store
    assert [m.kind for m in await outbox(store, clock)] == ["correction_notice"]
    await members.Withdraw(
        pb.WithdrawRequest(member_id=queued, password=password), metadata=queued_session
    )
    assert await outbox(store, clock) == []
    report = await sidecar_round(server, clock, smtp_server)
    assert (report.correction_notices, report.mail_sent) == (0, 0)
    assert smtp_server.handler.received == []


# --- the ledger's sealing ------------------------------------------------------------------


async def _swap_details(url: str, first: int, second: int) -> None:
    """Swap two ledger entries' sealed details in the database, as someone with
    write access to it could (the vault's own statements never do)."""
    read = "SELECT details_ct FROM disclosures WHERE disclosure_id = {}"
    write = "UPDATE disclosures SET details_ct = {} WHERE disclosure_id = {}"
    if url.startswith("sqlite:///"):
        with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as db:
            a, b = (db.execute(read.format("?"), (i,)).fetchone()[0] for i in (first, second))
            db.executemany(write.format("?", "?"), [(b, first), (a, second)])
            db.commit()
        return
    conn = await asyncpg.connect(url)
    try:
        a, b = [await conn.fetchval(read.format("$1"), i) for i in (first, second)]
        await conn.executemany(write.format("$1", "$2"), [(b, first), (a, second)])
    finally:
        await conn.close()


async def test_two_entries_sealed_details_swapped_do_not_open(
    registry: disclosure_pb2_grpc.RecipientAdminServiceStub,
    members: MemberServiceStub,
    disclosures: disclosure_pb2_grpc.DisclosureServiceStub,
    store_url: str,
) -> None:
    # Two entries of one member in the same microsecond (the clock is frozen): bound
    # to the time alone, their sealed details would open in each other's place.
    member_id, session = await member(members)
    first = await disclosures.Disclose(disclose(member_id, "name", legal_basis=COURT_ORDER))
    other = dpb.LegalBasis(reference="tax audit 2026-9", approved_by="the auditor")
    second = await disclosures.Disclose(disclose(member_id, "mobile_phone", legal_basis=other))
    assert first.disclosed_at == second.disclosed_at
    before = await ledger(disclosures, member_id, session)
    assert [e.legal_reference for e in before] == ["tax audit 2026-9", "court order 2026-117"]
    await _swap_details(store_url, first.disclosure_id, second.disclosure_id)
    error = await fails(
        disclosures.ListDisclosures(
            dpb.ListDisclosuresRequest(member_id=member_id), metadata=session
        ),
        Code.INTERNAL,
    )
    # One opaque error: no entry, reference or key material in what the caller sees.
    assert error_info(error).reason == "DECRYPTION_FAILED"
    for secret in ("court order", "tax audit", member_id):
        assert secret not in (error.details() or "")
    # Swapped back, both open again: nothing else was harmed.
    await _swap_details(store_url, first.disclosure_id, second.disclosure_id)
    assert await ledger(disclosures, member_id, session) == before
