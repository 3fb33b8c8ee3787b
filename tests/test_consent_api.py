"""ConsentService and PolicyAdminService over real gRPC, on SQLite and PostgreSQL: the
member's answers over time, their history, reads that follow each change at once,
policy versions that ask members again (and mail them, at a real SMTP server), and
purposes added by configuration."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_support import (
    embedded_settings,
    error_info,
    field_violations,
    member_session,
    sign_up_request,
)
from mail_support import SmtpServer, lf_body, relay_for, smtp_mailer
from process_support import cli_env, run_cli, serving

from privacyvault.v1 import consent_pb2 as cpb
from privacyvault.v1 import consent_pb2_grpc
from privacyvault.v1 import member_pb2 as pb
from privacyvault.v1.member_pb2_grpc import MemberServiceStub
from service.caller_policy import CallerPolicyInvalid, parse_policy
from service.callers import policy_methods
from service.server import POLICY_SERVICES, RunningServer, run_server
from vault import FrozenClock
from vault.purposes import parse_catalogue

Code = grpc.StatusCode
TEXT_SHA256 = "5" * 64
INQUIRY = pb.ConsentChoice(purpose=pb.PURPOSE_INQUIRY, granted=True)
STATISTICS = pb.ConsentChoice(purpose=pb.PURPOSE_STATISTICS, granted=True)
Metadata = tuple[tuple[str, str], ...]


@pytest.fixture
def consents(channel: grpc.aio.Channel) -> consent_pb2_grpc.ConsentServiceStub:
    return consent_pb2_grpc.ConsentServiceStub(channel)


@pytest.fixture
def officer(channel: grpc.aio.Channel) -> consent_pb2_grpc.PolicyAdminServiceStub:
    return consent_pb2_grpc.PolicyAdminServiceStub(channel)


async def fails(call: Any, code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    return caught.value


async def member(members: MemberServiceStub, *choices: pb.ConsentChoice) -> tuple[str, Metadata]:
    request = sign_up_request(consents=list(choices))
    member_id = (await members.SignUp(request)).member_id
    return member_id, await member_session(members, request)


async def read(
    members: MemberServiceStub, member_id: str, purpose: int = pb.PURPOSE_INQUIRY
) -> pb.Member:
    return (
        await members.GetMember(pb.GetMemberRequest(member_id=member_id, purpose=purpose))
    ).member


async def refused(
    members: MemberServiceStub, member_id: str, purpose: int = pb.PURPOSE_INQUIRY
) -> str:
    """The ErrorInfo reason of a read for ``purpose`` that must be PERMISSION_DENIED."""
    error = await fails(
        members.GetMember(pb.GetMemberRequest(member_id=member_id, purpose=purpose)),  # type: ignore[arg-type]
        Code.PERMISSION_DENIED,
    )
    return error_info(error).reason


async def answer(
    consents: consent_pb2_grpc.ConsentServiceStub,
    member_id: str,
    session: Metadata,
    **granted: bool,
) -> dict[str, cpb.ConsentState]:
    reply = await consents.UpdateConsents(
        cpb.UpdateConsentsRequest(
            member_id=member_id,
            changes=[cpb.ConsentChange(purpose_key=k, granted=g) for k, g in granted.items()],
        ),
        metadata=session,
    )
    return {s.purpose_key: s for s in reply.consents}


async def states(
    consents: consent_pb2_grpc.ConsentServiceStub, member_id: str, session: Metadata
) -> dict[str, cpb.ConsentState]:
    reply = await consents.GetConsents(
        cpb.GetConsentsRequest(member_id=member_id), metadata=session
    )
    return {s.purpose_key: s for s in reply.consents}


async def publish(
    officer: consent_pb2_grpc.PolicyAdminServiceStub,
    version: str,
    effective_date: str,
    *changed: str,
) -> cpb.PolicyVersion:
    reply = await officer.PublishPolicyVersion(
        cpb.PublishPolicyVersionRequest(
            version=version,
            effective_date=effective_date,
            text_sha256=TEXT_SHA256,
            changed_purposes=list(changed),
        )
    )
    return reply.version


def today(clock: FrozenClock, days: int = 0) -> str:
    return (clock.now() + timedelta(days=days)).date().isoformat()


# --- the member's answers and their history ----------------------------------------------


async def test_grant_withdraw_grant_is_three_events_and_reads_follow_each(
    members: MemberServiceStub, consents: consent_pb2_grpc.ConsentServiceStub
) -> None:
    member_id, session = await member(members)
    assert await refused(members, member_id) == "PURPOSE_NOT_CONSENTED"

    await answer(consents, member_id, session, INQUIRY=True)
    assert (await read(members, member_id)).email.endswith("@example.com")
    await answer(consents, member_id, session, INQUIRY=False)
    assert await refused(members, member_id) == "PURPOSE_NOT_CONSENTED"
    after = await answer(consents, member_id, session, INQUIRY=True)
    assert after["INQUIRY"].granted
    assert after["INQUIRY"].policy_version == "1"
    assert (await read(members, member_id)).name.startswith("Member Number")

    history = await consents.ListConsentHistory(
        cpb.ListConsentHistoryRequest(member_id=member_id), metadata=session
    )
    inquiry = [e for e in history.events if e.purpose_key == "INQUIRY"]
    assert [e.granted for e in inquiry] == [True, False, True]  # newest first
    assert {(e.policy_version, e.recorded_by, e.caller) for e in inquiry} == {
        ("1", "member", "local")
    }
    assert all(e.purpose == pb.PURPOSE_INQUIRY for e in inquiry)
    # Sign-up's answers are the first events: the membership purposes.
    assert {e.purpose_key for e in history.events[3:]} == {"IDENTIFICATION", "ACCOUNT_RECOVERY"}
    assert len(history.events) == 5


async def test_history_pages_with_tokens_bound_to_the_member(
    members: MemberServiceStub, consents: consent_pb2_grpc.ConsentServiceStub
) -> None:
    member_id, session = await member(members)
    other_id, other_session = await member(members)
    for granted in (True, False, True):
        await answer(consents, member_id, session, STATISTICS=granted)
    seen = []
    token = ""
    while True:
        page = await consents.ListConsentHistory(
            cpb.ListConsentHistoryRequest(member_id=member_id, page_size=2, page_token=token),
            metadata=session,
        )
        assert len(page.events) <= 2
        seen.extend(page.events)
        token = page.next_page_token
        if not token:
            break
        # Another member's history does not open with it.
        error = await fails(
            consents.ListConsentHistory(
                cpb.ListConsentHistoryRequest(member_id=other_id, page_token=token),
                metadata=other_session,
            ),
            Code.INVALID_ARGUMENT,
        )
        assert set(field_violations(error)) == {"page_token"}
    assert len(seen) == 5  # two at sign-up, three answers
    assert [e.granted for e in seen if e.purpose_key == "STATISTICS"] == [True, False, True]


async def test_consent_calls_need_the_members_session(
    members: MemberServiceStub, consents: consent_pb2_grpc.ConsentServiceStub
) -> None:
    member_id, _ = await member(members)
    _, other_session = await member(members)
    for call in (
        consents.GetConsents(cpb.GetConsentsRequest(member_id=member_id)),
        consents.GetConsents(cpb.GetConsentsRequest(member_id=member_id), metadata=other_session),
        consents.UpdateConsents(
            cpb.UpdateConsentsRequest(
                member_id=member_id, changes=[cpb.ConsentChange(purpose_key="INQUIRY")]
            ),
            metadata=other_session,
        ),
        consents.ListConsentHistory(
            cpb.ListConsentHistoryRequest(member_id=member_id), metadata=other_session
        ),
    ):
        error = await fails(call, Code.UNAUTHENTICATED)
        assert error_info(error).reason == "MEMBER_SESSION_REQUIRED"
    assert await refused(members, member_id) == "PURPOSE_NOT_CONSENTED"  # nothing granted


async def test_a_membership_purpose_cannot_be_withdrawn_alone(
    members: MemberServiceStub, consents: consent_pb2_grpc.ConsentServiceStub
) -> None:
    member_id, session = await member(members, INQUIRY)
    before = await consents.ListConsentHistory(
        cpb.ListConsentHistoryRequest(member_id=member_id), metadata=session
    )
    error = await fails(
        consents.UpdateConsents(
            cpb.UpdateConsentsRequest(
                member_id=member_id,
                changes=[
                    cpb.ConsentChange(purpose_key="INQUIRY", granted=False),
                    cpb.ConsentChange(purpose_key="IDENTIFICATION", granted=False),
                ],
            ),
            metadata=session,
        ),
        Code.INVALID_ARGUMENT,
    )
    info = error_info(error)
    assert info.reason == "PURPOSE_REQUIRED_FOR_MEMBERSHIP"
    assert dict(info.metadata) == {"purpose": "IDENTIFICATION", "use": "MemberService/Withdraw"}
    assert "Withdraw" in field_violations(error)["changes[1].granted"]
    # Nothing of the request was recorded, the INQUIRY withdrawal included.
    after = await consents.ListConsentHistory(
        cpb.ListConsentHistoryRequest(member_id=member_id), metadata=session
    )
    assert after.events == before.events
    assert (await read(members, member_id, pb.PURPOSE_IDENTIFICATION)).login_id
    # Granting it (again) is an answer like any other.
    assert (await answer(consents, member_id, session, IDENTIFICATION=True))[
        "IDENTIFICATION"
    ].granted


async def test_bad_answers_are_invalid_arguments(
    members: MemberServiceStub, consents: consent_pb2_grpc.ConsentServiceStub
) -> None:
    member_id, session = await member(members)
    cases = {
        "changes[0].purpose_key": [cpb.ConsentChange(purpose_key="NO_SUCH_PURPOSE", granted=True)],
        "changes[1].purpose_key": [
            cpb.ConsentChange(purpose_key="INQUIRY", granted=True),
            cpb.ConsentChange(purpose_key="INQUIRY", granted=False),
        ],
        "changes": [],
    }
    for field, changes in cases.items():
        error = await fails(
            consents.UpdateConsents(
                cpb.UpdateConsentsRequest(member_id=member_id, changes=changes), metadata=session
            ),
            Code.INVALID_ARGUMENT,
        )
        assert field in field_violations(error)
    error = await fails(
        consents.UpdateConsents(
            cpb.UpdateConsentsRequest(
                member_id=member_id,
                changes=[cpb.ConsentChange(purpose_key="MEMBER_REQUEST", granted=True)],
            ),
            metadata=session,
        ),
        Code.INVALID_ARGUMENT,
    )
    assert "needs no consent" in field_violations(error)["changes[0].purpose_key"]


async def test_get_consents_lists_every_purpose_that_takes_consent(
    members: MemberServiceStub, consents: consent_pb2_grpc.ConsentServiceStub
) -> None:
    member_id, session = await member(members, pb.ConsentChoice(purpose=pb.PURPOSE_INQUIRY))
    got = await states(consents, member_id, session)
    assert set(got) == {"IDENTIFICATION", "ACCOUNT_RECOVERY", "INQUIRY", "STATISTICS"}
    assert got["IDENTIFICATION"].kind == cpb.CONSENT_KIND_MEMBERSHIP
    assert got["IDENTIFICATION"].granted
    assert got["IDENTIFICATION"].answered
    assert got["INQUIRY"].kind == cpb.CONSENT_KIND_OPT_IN
    assert got["INQUIRY"].answered
    assert not got["INQUIRY"].granted
    assert not got["STATISTICS"].answered
    assert not got["STATISTICS"].granted
    assert sorted(got["INQUIRY"].fields) == ["email", "mobile_phone", "name"]
    assert "consent" in got["INQUIRY"].legal_basis
    assert not any(s.outdated for s in got.values())


async def test_the_export_holds_the_consent_history(
    members: MemberServiceStub, consents: consent_pb2_grpc.ConsentServiceStub
) -> None:
    member_id, session = await member(members, INQUIRY)
    await answer(consents, member_id, session, INQUIRY=False)
    reply = await members.ExportMemberData(
        pb.ExportMemberDataRequest(member_id=member_id), metadata=session
    )
    document = json.loads(reply.json)
    history = [(e["purpose"], e["granted"]) for e in document["consent_history"]]
    assert history[-2:] == [("INQUIRY", True), ("INQUIRY", False)]  # oldest first
    assert {e["recorded_by"] for e in document["consent_history"]} == {"member"}
    assert document["policy_version"] == "1"


# --- policy versions: who is asked again, and when ------------------------------------------


async def test_a_material_change_blocks_exactly_the_affected_consents(
    members: MemberServiceStub,
    consents: consent_pb2_grpc.ConsentServiceStub,
    officer: consent_pb2_grpc.PolicyAdminServiceStub,
    clock: FrozenClock,
    server: RunningServer,
    smtp_server: SmtpServer,
) -> None:
    before, before_session = await member(members, INQUIRY, STATISTICS)
    refuser, _ = await member(members, pb.ConsentChoice(purpose=pb.PURPOSE_INQUIRY))
    silent, silent_session = await member(members)
    await member(members, STATISTICS)  # granted STATISTICS only
    clock.advance(timedelta(minutes=1))

    version = await publish(officer, "2", today(clock), "INQUIRY")
    assert list(version.changed_purposes) == ["INQUIRY"]
    assert version.published_by == "local"
    clock.advance(timedelta(minutes=1))
    after, _ = await member(members, INQUIRY)  # consented after publication

    # The grant that predates the version: outdated. Nothing else is.
    assert await refused(members, before) == "CONSENT_OUTDATED"
    assert (await read(members, before, pb.PURPOSE_IDENTIFICATION)).login_id
    assert await refused(members, refuser) == "PURPOSE_NOT_CONSENTED"  # never granted
    assert await refused(members, silent) == "PURPOSE_NOT_CONSENTED"
    assert (await read(members, after)).email
    error = await fails(
        members.GetMember(pb.GetMemberRequest(member_id=before, purpose=pb.PURPOSE_INQUIRY)),
        Code.PERMISSION_DENIED,
    )
    assert dict(error_info(error).metadata) == {"purpose": "INQUIRY"}

    shown = await states(consents, before, before_session)
    assert shown["INQUIRY"].outdated
    assert not shown["INQUIRY"].granted
    assert shown["INQUIRY"].policy_version == "1"
    assert not shown["STATISTICS"].outdated
    assert shown["STATISTICS"].granted
    own = (
        await members.GetMember(
            pb.GetMemberRequest(member_id=before, purpose=pb.PURPOSE_MEMBER_REQUEST),
            metadata=before_session,
        )
    ).member
    assert {c.purpose_key: c.outdated for c in own.consents}["INQUIRY"] is True
    assert not (await states(consents, silent, silent_session))["INQUIRY"].outdated

    # One notice per affected member, naming what changed and when it applies.
    assert await server.vault.lifecycle().send_policy_notices() == 1
    assert await server.vault.lifecycle().send_policy_notices() == 0  # exactly once
    relay = relay_for(server, smtp_mailer(smtp_server.port), clock)
    assert (await relay.relay_once()).sent == 1
    (mail,) = smtp_server.handler.received
    recipient = await server.vault.resolve_recipient(before)
    assert recipient is not None
    assert mail.rcpt_tos == [recipient.email]  # not the refuser, silent, stats_only, after
    text = lf_body(mail.message)
    assert "version 2" in text
    assert "answering your inquiries" in text
    assert clock.now().strftime("%-d %B %Y") in text
    assert mail.message["Subject"].startswith(f"Our privacy policy changes on {today(clock)}")

    # Re-consent lifts the block, under the new version.
    regranted = await answer(consents, before, before_session, INQUIRY=True)
    assert regranted["INQUIRY"].granted
    assert not regranted["INQUIRY"].outdated
    assert regranted["INQUIRY"].policy_version == "2"
    assert (await read(members, before)).email


async def test_a_version_without_a_material_change_blocks_nothing(
    members: MemberServiceStub,
    consents: consent_pb2_grpc.ConsentServiceStub,
    officer: consent_pb2_grpc.PolicyAdminServiceStub,
    clock: FrozenClock,
    server: RunningServer,
) -> None:
    granted, session = await member(members, INQUIRY, STATISTICS)
    clock.advance(timedelta(minutes=1))
    await publish(officer, "1.1", today(clock))
    assert (await read(members, granted)).email
    # STATISTICS reads no member (GetStatistics): its grant is seen in GetConsents.
    assert not any(s.outdated for s in (await states(consents, granted, session)).values())
    assert await server.vault.lifecycle().send_policy_notices() == 0
    listed = await officer.ListPolicyVersions(cpb.ListPolicyVersionsRequest())
    assert [(v.version, list(v.changed_purposes)) for v in listed.versions] == [("1.1", [])]


async def test_a_version_applies_from_its_effective_date(
    members: MemberServiceStub,
    consents: consent_pb2_grpc.ConsentServiceStub,
    officer: consent_pb2_grpc.PolicyAdminServiceStub,
    clock: FrozenClock,
) -> None:
    early, early_session = await member(members, INQUIRY)
    clock.advance(timedelta(minutes=1))
    await publish(officer, "2", today(clock, 10), "INQUIRY")
    # Published, not yet in force: reads go on; GetConsents says when it applies.
    assert (await read(members, early)).email
    shown = (await states(consents, early, early_session))["INQUIRY"]
    assert not shown.outdated
    assert shown.granted
    assert shown.reconsent_due_at.ToDatetime().date().isoformat() == today(clock, 10)
    # Answering before the date keeps the member's use going past it.
    ready, ready_session = await member(members, INQUIRY)
    await answer(consents, ready, ready_session, INQUIRY=True)  # under version 2 now
    clock.advance(timedelta(days=10))
    assert await refused(members, early) == "CONSENT_OUTDATED"
    assert (await read(members, ready)).email


async def test_successive_versions_ask_again_only_for_what_each_changes(
    members: MemberServiceStub,
    consents: consent_pb2_grpc.ConsentServiceStub,
    officer: consent_pb2_grpc.PolicyAdminServiceStub,
    clock: FrozenClock,
    server: RunningServer,
) -> None:
    first, first_session = await member(members, INQUIRY, STATISTICS)
    clock.advance(timedelta(minutes=1))
    await publish(officer, "2", today(clock), "INQUIRY")
    clock.advance(timedelta(minutes=1))
    await answer(consents, first, first_session, INQUIRY=True)  # under 2
    assert (await read(members, first)).email
    clock.advance(timedelta(minutes=1))
    # Version 3 touches STATISTICS only: the INQUIRY grant under 2 stays valid.
    await publish(officer, "3", today(clock), "STATISTICS")
    assert (await read(members, first)).email
    assert (await states(consents, first, first_session))["STATISTICS"].outdated
    clock.advance(timedelta(minutes=1))
    # Version 4 changes INQUIRY again: the grant under 2 predates it.
    await publish(officer, "4", today(clock), "INQUIRY")
    assert await refused(members, first) == "CONSENT_OUTDATED"
    # Withdrawn, then granted again: a fresh grant under 4, valid.
    await answer(consents, first, first_session, INQUIRY=False)
    assert await refused(members, first) == "PURPOSE_NOT_CONSENTED"
    await answer(consents, first, first_session, INQUIRY=True, STATISTICS=True)
    assert (await read(members, first)).email
    assert not (await states(consents, first, first_session))["STATISTICS"].outdated
    # The sidecar runs only now: every grant the versions changed has been given
    # again since, so nobody is asked any more and no notice is queued.
    assert await server.vault.lifecycle().send_policy_notices() == 0
    history = await consents.ListConsentHistory(
        cpb.ListConsentHistoryRequest(member_id=first), metadata=first_session
    )
    versions = [e.policy_version for e in history.events if e.purpose_key == "INQUIRY"]
    assert versions == ["4", "4", "2", "1"]


async def test_each_version_mails_each_affected_member_once(
    members: MemberServiceStub,
    officer: consent_pb2_grpc.PolicyAdminServiceStub,
    clock: FrozenClock,
    server: RunningServer,
    smtp_server: SmtpServer,
) -> None:
    both, _ = await member(members, INQUIRY, STATISTICS)
    inquiry_only, _ = await member(members, INQUIRY)
    await member(members)  # asked nothing
    clock.advance(timedelta(minutes=1))
    await publish(officer, "2", today(clock, 30), "INQUIRY", "STATISTICS")
    await publish(officer, "3", today(clock, 60), "STATISTICS")
    lifecycle = server.vault.lifecycle()
    assert await lifecycle.send_policy_notices() == 3  # 2: both members; 3: one
    assert await lifecycle.send_policy_notices() == 0
    relay = relay_for(server, smtp_mailer(smtp_server.port), clock)
    assert (await relay.relay_once()).sent == 3
    got: dict[str, list[str]] = {}
    for received in smtp_server.handler.received:
        text = lf_body(received.message)
        got.setdefault(received.rcpt_tos[0], []).append(text.split("version ")[1].split(" ")[0])
    addresses = {}
    for mid in (both, inquiry_only):
        row = await server.vault.parts.store.get_member(mid)
        assert row is not None
        recipient = await server.vault.resolve_recipient(mid)
        assert recipient is not None
        addresses[mid] = recipient.email
    assert sorted(got[addresses[both]]) == ["2", "3"]
    assert got[addresses[inquiry_only]] == ["2"]
    assert len(got) == 2


async def test_publishing_refuses_bad_versions(
    officer: consent_pb2_grpc.PolicyAdminServiceStub, clock: FrozenClock
) -> None:
    cases = {
        "effective_date": ("2", today(clock, -1), []),  # retroactive
        "changed_purposes[0]": ("2", today(clock), ["IDENTIFICATION"]),  # membership
        "changed_purposes[1]": ("2", today(clock), ["INQUIRY", "NO_SUCH"]),
        "version": ("not a version", today(clock), []),
    }
    for field, (version, date, changed) in cases.items():
        error = await fails(
            officer.PublishPolicyVersion(
                cpb.PublishPolicyVersionRequest(
                    version=version,
                    effective_date=date,
                    text_sha256=TEXT_SHA256,
                    changed_purposes=changed,
                )
            ),
            Code.INVALID_ARGUMENT,
        )
        assert field in field_violations(error)
    error = await fails(
        officer.PublishPolicyVersion(
            cpb.PublishPolicyVersionRequest(
                version="2", effective_date=today(clock), text_sha256="A" * 64
            )
        ),
        Code.INVALID_ARGUMENT,
    )
    assert set(field_violations(error)) == {"text_sha256"}
    await publish(officer, "2", today(clock))
    error = await fails(publish(officer, "2", today(clock)), Code.ALREADY_EXISTS)
    assert error_info(error).reason == "POLICY_VERSION_TAKEN"


# --- the caller policy: only the privacy officer publishes --------------------------------

POLICY = """
trust_domain = "example.org"

[[caller]]
identity = "local"
methods = ["MemberService/SignUp", "MemberService/Authenticate", "MemberService/GetMember",
           "ConsentService/UpdateConsents", "PolicyAdminService/ListPolicyVersions"]
purposes = ["INQUIRY", "NEWSLETTER"]
"""
PURPOSES = """
[[purpose]]
key = "NEWSLETTER"
fields = ["email"]
consent = "opt-in"
legal_basis = "the member's separate consent to the newsletter (policy section 3)"
"""


@pytest.fixture
async def configured(
    store_url: str, tmp_path: Path, clock: FrozenClock
) -> AsyncIterator[grpc.aio.Channel]:
    """A server with a purposes file (NEWSLETTER) and a caller policy for ``local``."""
    (tmp_path / "callers.toml").write_text(POLICY)
    (tmp_path / "purposes.toml").write_text(PURPOSES)
    settings = embedded_settings(
        tmp_path / "configured",
        database_url=store_url,
        caller_policy_file=tmp_path / "callers.toml",
        purposes_file=tmp_path / "purposes.toml",
    )
    async with (
        run_server(settings, clock=clock) as running,
        grpc.aio.insecure_channel(running.target) as channel,
    ):
        yield channel


async def test_only_the_policy_names_who_publishes(
    configured: grpc.aio.Channel, clock: FrozenClock
) -> None:
    officer = consent_pb2_grpc.PolicyAdminServiceStub(configured)
    error = await fails(publish(officer, "2", today(clock), "INQUIRY"), Code.PERMISSION_DENIED)
    info = error_info(error)
    assert info.reason == "CALLER_NOT_ALLOWED"
    assert info.metadata["method"] == "PolicyAdminService/PublishPolicyVersion"
    assert list((await officer.ListPolicyVersions(cpb.ListPolicyVersionsRequest())).versions) == []


async def test_a_configured_purpose_reads_nothing_before_consent_and_its_fields_after(
    configured: grpc.aio.Channel,
) -> None:
    members = MemberServiceStub(configured)
    consents = consent_pb2_grpc.ConsentServiceStub(configured)
    request = sign_up_request(mobile_phone="+82 10 1234 5678")
    member_id = (await members.SignUp(request)).member_id
    session = await member_session(members, request)
    newsletter = pb.GetMemberRequest(member_id=member_id, purpose_key="NEWSLETTER")
    error = await fails(members.GetMember(newsletter), Code.PERMISSION_DENIED)
    assert error_info(error).reason == "PURPOSE_NOT_CONSENTED"

    await answer(consents, member_id, session, NEWSLETTER=True)
    got = (await members.GetMember(newsletter)).member
    assert got.email == request.email
    assert not got.HasField("name")
    assert not got.HasField("mobile_phone")
    assert not got.HasField("login_id")
    consent = {c.purpose_key: c for c in got.consents}["NEWSLETTER"]
    assert consent.purpose == pb.PURPOSE_UNSPECIFIED
    assert consent.granted

    await answer(consents, member_id, session, NEWSLETTER=False)
    error = await fails(members.GetMember(newsletter), Code.PERMISSION_DENIED)
    assert error_info(error).reason == "PURPOSE_NOT_CONSENTED"

    # Granted at sign-up, by key: read at once.
    signed = sign_up_request(consents=[pb.ConsentChoice(purpose_key="NEWSLETTER", granted=True)])
    second = (await members.SignUp(signed)).member_id
    assert (
        await members.GetMember(pb.GetMemberRequest(member_id=second, purpose_key="NEWSLETTER"))
    ).member.email == signed.email


async def test_a_read_names_one_purpose_the_catalogue_knows(
    configured: grpc.aio.Channel,
) -> None:
    members = MemberServiceStub(configured)
    member_id = (await members.SignUp(sign_up_request())).member_id
    for request, field in (
        (
            pb.GetMemberRequest(
                member_id=member_id, purpose=pb.PURPOSE_INQUIRY, purpose_key="NEWSLETTER"
            ),
            "purpose_key",
        ),
        (pb.GetMemberRequest(member_id=member_id), "purpose"),
        (pb.GetMemberRequest(member_id=member_id, purpose_key="NO_SUCH_PURPOSE"), "purpose_key"),
    ):
        error = await fails(members.GetMember(request), Code.INVALID_ARGUMENT)
        assert set(field_violations(error)) == {field}
    # A known purpose the caller policy does not give this caller.
    error = await fails(
        members.GetMember(pb.GetMemberRequest(member_id=member_id, purpose_key="STATISTICS")),
        Code.PERMISSION_DENIED,
    )
    assert error_info(error).reason == "CALLER_NOT_ALLOWED"


def test_an_invalid_purposes_file_refuses_the_settings(tmp_path: Path) -> None:
    bad = {
        "none": '[[purpose]]\nkey = "X_Y"\nfields = []\nconsent = "none"\nlegal_basis = "b"\n',
        "builtin": '[[purpose]]\nkey = "INQUIRY"\nfields = []\nconsent = "opt-in"\n'
        'legal_basis = "b"\n',
        "field": '[[purpose]]\nkey = "X_Y"\nfields = ["password_hash"]\nconsent = "opt-in"\n'
        'legal_basis = "b"\n',
        "basis": '[[purpose]]\nkey = "X_Y"\nfields = []\nconsent = "opt-in"\n',
    }
    for name, text in bad.items():
        path = tmp_path / f"{name}.toml"
        path.write_text(text)
        with pytest.raises(ValueError, match="PRIVACY_VAULT_PURPOSES_FILE"):
            embedded_settings(tmp_path / "data", purposes_file=path)


# --- every replica: a second server process on the same PostgreSQL ------------------------


@pytest.mark.postgres
async def test_reads_follow_each_answer_on_a_second_server_process(
    make_postgres_database: Callable[[], Awaitable[str]], tmp_path: Path, clock: FrozenClock
) -> None:
    url = await make_postgres_database()
    data = tmp_path / "data"  # shared: both servers use its KEK file
    settings = embedded_settings(data, database_url=url)
    async with run_server(settings, clock=clock) as running:
        with serving(tmp_path, data, "second", database_url=url) as (process, _):
            async with (
                grpc.aio.insecure_channel(running.target) as here,
                grpc.aio.insecure_channel(process.target) as there,
            ):
                members, consents = (
                    MemberServiceStub(here),
                    consent_pb2_grpc.ConsentServiceStub(here),
                )
                replica = MemberServiceStub(there)
                member_id, session = await member(members)
                assert await refused(replica, member_id) == "PURPOSE_NOT_CONSENTED"
                for granted in (True, False, True, False):
                    await answer(consents, member_id, session, INQUIRY=granted)
                    # The very next read on the other process sees the answer.
                    if granted:
                        assert (await read(replica, member_id)).email
                    else:
                        assert await refused(replica, member_id) == "PURPOSE_NOT_CONSENTED"
                history = await consents.ListConsentHistory(
                    cpb.ListConsentHistoryRequest(member_id=member_id), metadata=session
                )
                assert [e.granted for e in history.events if e.purpose_key == "INQUIRY"] == [
                    False,
                    True,
                    False,
                    True,
                ]


# --- the privacy officer's CLI ----------------------------------------------------------------


def test_the_cli_publishes_a_version_with_the_texts_hash(tmp_path: Path) -> None:
    text = tmp_path / "policy-v2.txt"
    text.write_text("Privacy Policy, version 2.\n")
    env = cli_env(tmp_path / "data")
    args = ["policy", "publish", "--version", "2", "--text", str(text), "--actor", "officer"]
    for bad in ("2999-01-01", "2000-01-01", "soon"):  # too far, retroactive, not a date
        refused_run = run_cli([*args, "--effective-date", bad], env, tmp_path)
        assert refused_run.returncode == 2, refused_run.stderr
        assert "effective_date" in refused_run.stderr
    effective = (datetime.now(UTC) + timedelta(days=7)).date().isoformat()
    published = run_cli(
        [*args, "--effective-date", effective, "--changed", "INQUIRY"], env, tmp_path
    )
    assert published.returncode == 0, published.stderr
    (line,) = [json.loads(x) for x in published.stdout.splitlines()]
    assert line["type"] == "published"
    assert line["text_sha256"] == hashlib.sha256(text.read_bytes()).hexdigest()
    assert line["changed_purposes"] == ["INQUIRY"]
    assert line["published_by"] == "officer"
    assert line["effective_at"].startswith(effective)
    again = run_cli([*args, "--effective-date", effective], env, tmp_path)
    assert again.returncode == 1  # the number is taken
    assert "policy version" in again.stderr
    listed = run_cli(["policy", "list"], env, tmp_path)
    assert [json.loads(x)["version"] for x in listed.stdout.splitlines()] == ["2"]


def test_the_caller_policy_names_configured_purposes_and_only_known_ones() -> None:
    methods = policy_methods(POLICY_SERVICES)
    catalogue = parse_catalogue(PURPOSES)
    policy = parse_policy(POLICY, methods, catalogue.keys)
    assert policy.allows("local", "MemberService/GetMember", "NEWSLETTER")
    assert not policy.allows("local", "MemberService/GetMember", "STATISTICS")
    # Without the purposes file, NEWSLETTER is no purpose: the policy is invalid.
    with pytest.raises(CallerPolicyInvalid, match=r"purposes\[1\] is not a purpose"):
        parse_policy(POLICY, methods)
