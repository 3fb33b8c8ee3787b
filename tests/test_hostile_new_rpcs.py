"""Hostile tests of the RPCs added with consents, disclosures, statistics and
corrections: a real in-process server over a real gRPC channel, on SQLite and
PostgreSQL. Each test names the defect an attack on our own server found; each
failed before its fix."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from grpc_support import error_info, field_violations, member_session, sign_up_request
from mail_support import SmtpServer, relay_for, smtp_mailer

from privacyvault.v1 import disclosure_pb2 as dpb
from privacyvault.v1 import disclosure_pb2_grpc, statistics_pb2_grpc
from privacyvault.v1 import member_pb2 as pb
from privacyvault.v1 import statistics_pb2 as spb
from privacyvault.v1.member_pb2_grpc import MemberServiceStub
from service.server import RunningServer
from service.sidecar import Sidecar
from vault import FrozenClock
from vault.page_tokens import MAX_PAGE_SIZE
from vault.store.sql.corrections import MAX_CORRECTIONS, MAX_PENDING_CORRECTIONS

Code = grpc.StatusCode
Metadata = tuple[tuple[str, str], ...]
COURT_ORDER = dpb.LegalBasis(reference="court order 2026-117", approved_by="the privacy officer")


def recipient(**overrides: Any) -> dpb.RegisterRecipientRequest:
    fields: dict[str, Any] = {
        "recipient_id": "acme_delivery",
        "legal_entity": "ACME Delivery Ltd",
        "contact_email": "privacy@acme.example",
        "purposes": ["INQUIRY"],
        "fields": ["name", "mobile_phone"],
        "legal_basis": "the member's consent to provision (policy section 4)",
        "contract_reference": "ACME-2026-01",
    }
    return dpb.RegisterRecipientRequest(**(fields | overrides))


async def error_of(call: Any) -> grpc.aio.AioRpcError | None:
    """The call's error, or None when it succeeded."""
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error
    return None


async def signed_up(members: MemberServiceStub, **overrides: Any) -> tuple[str, Metadata]:
    request = sign_up_request(mobile_phone="010-1234-5678", **overrides)
    member_id = (await members.SignUp(request)).member_id
    return member_id, await member_session(members, request)


# Was: GetStatistics answered INTERNAL for a valid date range that ends on
# 9999-12-31: the per-day loop steps past date.max (OverflowError in
# vault.statistics.Statistics.report). Bad input must never be INTERNAL.
@pytest.mark.parametrize(
    ("start", "end"), [("9999-12-31", "9999-12-31"), ("9999-12-01", "9999-12-31")]
)
async def test_statistics_range_ending_on_the_last_representable_day_is_not_internal(
    channel: grpc.aio.Channel, start: str, end: str
) -> None:
    stats = statistics_pb2_grpc.StatisticsServiceStub(channel)
    request = spb.GetStatisticsRequest(
        purpose=pb.PURPOSE_STATISTICS, start_date=start, end_date=end
    )
    error = await error_of(stats.GetStatistics(request))
    if error is not None:  # refusing the far future is fine; INTERNAL is not
        assert error.code() == Code.INVALID_ARGUMENT, (error.code(), error.details())
        assert set(field_violations(error)) <= {"start_date", "end_date"}


# Was: corrections per member were unbounded and ListCorrections had no paging.
# Any caller the policy allows RequestCorrection (no member session needed) can
# file corrections until the member's ListCorrections answer passes gRPC's 4 MiB
# limit: the member then gets RESOURCE_EXHAUSTED ("Sent message larger than max")
# for their own corrections, for good. Either a cap on open corrections or a paged
# listing would hold.
async def test_a_flood_of_corrections_never_breaks_the_members_listing(
    members: MemberServiceStub,
) -> None:
    member_id, session = await signed_up(members)
    note = "n" * 1000  # the longest note allowed
    gate = asyncio.Semaphore(8)
    refused: list[grpc.aio.AioRpcError] = []

    async def file_one() -> None:
        async with gate:
            # A calling service on the member's behalf: no session.
            error = await error_of(
                members.RequestCorrection(
                    pb.RequestCorrectionRequest(
                        member_id=member_id, fields=["name", "email", "mobile_phone"], note=note
                    )
                )
            )
            if error is not None:
                refused.append(error)

    await asyncio.gather(*(file_one() for _ in range(MAX_PENDING_CORRECTIONS + 10)))
    # Exactly the cap is recorded, also under concurrent requests; the rest is refused
    # clearly, never INTERNAL.
    assert len(refused) == 10
    assert {e.code() for e in refused} == {Code.FAILED_PRECONDITION}
    assert {error_info(e).reason for e in refused} == {"TOO_MANY_CORRECTIONS"}
    listed = await members.ListCorrections(
        pb.ListCorrectionsRequest(member_id=member_id), metadata=session
    )
    assert len(listed.corrections) == MAX_PENDING_CORRECTIONS
    # Closing one makes room for one more.
    await members.CloseCorrection(
        pb.CloseCorrectionRequest(
            member_id=member_id,
            correction_id=listed.corrections[0].correction_id,
            reason="filed by mistake",
        ),
        metadata=session,
    )
    await members.RequestCorrection(
        pb.RequestCorrectionRequest(member_id=member_id, fields=["name"]), metadata=session
    )
    again = await error_of(
        members.RequestCorrection(
            pb.RequestCorrectionRequest(member_id=member_id, fields=["name"]), metadata=session
        )
    )
    assert again is not None
    assert error_info(again).reason == "TOO_MANY_CORRECTIONS"


async def test_a_members_corrections_in_all_are_bounded_too(
    members: MemberServiceStub,
) -> None:
    """Request and close, over and over: the record stops growing at the cap."""
    member_id, session = await signed_up(members)
    ask = pb.RequestCorrectionRequest(member_id=member_id, fields=["name"])
    for _ in range(MAX_CORRECTIONS):
        cid = (await members.RequestCorrection(ask, metadata=session)).correction.correction_id
        await members.CloseCorrection(
            pb.CloseCorrectionRequest(member_id=member_id, correction_id=cid, reason="checked"),
            metadata=session,
        )
    error = await error_of(members.RequestCorrection(ask, metadata=session))
    assert error is not None
    assert error.code() == Code.FAILED_PRECONDITION
    assert error_info(error).reason == "TOO_MANY_CORRECTIONS"
    # The listing pages (at most MAX_PAGE_SIZE a page, whatever is asked for) and
    # holds every one of them once.
    listed: list[str] = []
    token = ""
    while True:
        page = await members.ListCorrections(
            pb.ListCorrectionsRequest(member_id=member_id, page_size=1000, page_token=token),
            metadata=session,
        )
        assert len(page.corrections) == min(MAX_PAGE_SIZE, MAX_CORRECTIONS - len(listed))
        listed += [c.correction_id for c in page.corrections]
        token = page.next_page_token
        if not token:
            break
    assert len(set(listed)) == len(listed) == MAX_CORRECTIONS


# Was: RegisterRecipient took control characters (CR, LF, NUL, ESC) in
# legal_entity: vault.disclosures._text checks only the length. The legal entity
# is the display name of the correction notice's To header, which the standard
# library refuses to build with CR/LF ("address parts cannot contain CR or LF"),
# so the notice policy section 7 owes that recipient never goes out. Either the
# registration is refused (INVALID_ARGUMENT on legal_entity, as every other free
# text of the API is) or the notice is sent.
async def test_a_recipients_legal_entity_never_stops_its_correction_notice(
    channel: grpc.aio.Channel,
    members: MemberServiceStub,
    server: RunningServer,
    clock: FrozenClock,
    smtp_server: SmtpServer,
) -> None:
    registry = disclosure_pb2_grpc.RecipientAdminServiceStub(channel)
    disclosures = disclosure_pb2_grpc.DisclosureServiceStub(channel)
    error = await error_of(
        registry.RegisterRecipient(recipient(legal_entity="ACME\r\nBcc: evil@attacker.example"))
    )
    if error is not None:
        assert error.code() == Code.INVALID_ARGUMENT, (error.code(), error.details())
        assert set(field_violations(error)) == {"legal_entity"}
        return
    member_id, session = await signed_up(members, name="Old Name")
    await disclosures.Disclose(
        dpb.DiscloseRequest(
            member_id=member_id,
            recipient_id="acme_delivery",
            purpose=pb.PURPOSE_INQUIRY,
            fields=["name"],
            legal_basis=COURT_ORDER,
        )
    )
    await members.RequestCorrection(
        pb.RequestCorrectionRequest(member_id=member_id, fields=["name"]), metadata=session
    )
    await members.UpdateMember(
        pb.UpdateMemberRequest(
            member_id=member_id, name="New Name", update_mask=FieldMask(paths=["name"])
        ),
        metadata=session,
    )
    vault = server.vault
    relay = relay_for(server, smtp_mailer(smtp_server.port), clock)
    sidecar = Sidecar(
        vault.lifecycle(), vault.leases, clock, interval=60, holder="test:1:x", relay=relay
    )
    report = await sidecar.run_round()
    assert report is not None
    assert report.correction_notices == 1
    assert report.mail_sent == 1
    (mail,) = smtp_server.handler.received
    assert mail.rcpt_tos == ["privacy@acme.example"]
