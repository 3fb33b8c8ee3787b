"""StatisticsService (policy section 3(3)) over real gRPC on both backends: aggregates
over members who consent to statistics, small cells suppressed, and no per-member
read for STATISTICS any more."""

from __future__ import annotations

from datetime import datetime, timedelta
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
from tls_support import TestPki

from privacyvault.v1 import consent_pb2 as cpb
from privacyvault.v1 import member_pb2 as pb
from privacyvault.v1 import statistics_pb2 as spb
from privacyvault.v1.consent_pb2_grpc import ConsentServiceStub, PolicyAdminServiceStub
from privacyvault.v1.member_pb2_grpc import MemberServiceStub
from privacyvault.v1.statistics_pb2_grpc import StatisticsServiceStub
from service.config import Settings
from service.server import RunningServer, run_server
from vault import FrozenClock

Code = grpc.StatusCode
DAY = timedelta(days=1)


@pytest.fixture
def statistics(channel: grpc.aio.Channel) -> StatisticsServiceStub:
    return StatisticsServiceStub(channel)


async def fails(call: Any, code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    return caught.value


def ask(first: datetime, last: datetime | None = None) -> spb.GetStatisticsRequest:
    return spb.GetStatisticsRequest(
        purpose=pb.PURPOSE_STATISTICS,
        start_date=first.date().isoformat(),
        end_date=(last or first).date().isoformat(),
    )


async def sign_up(members: MemberServiceStub, *, statistics: bool) -> tuple[str, pb.SignUpRequest]:
    # Every member consents to inquiries: only those consenting to statistics count.
    request = sign_up_request(
        consents=[
            pb.ConsentChoice(purpose=pb.PURPOSE_INQUIRY, granted=True),
            pb.ConsentChoice(purpose=pb.PURPOSE_STATISTICS, granted=statistics),
        ]
    )
    return (await members.SignUp(request)).member_id, request


async def withdraw(members: MemberServiceStub, request: pb.SignUpRequest, member_id: str) -> None:
    auth = await members.Authenticate(
        pb.AuthenticateRequest(
            login_id=request.login_id, password=request.password, client_ip="192.0.2.9"
        )
    )
    await members.Withdraw(
        pb.WithdrawRequest(member_id=member_id, password=request.password),
        metadata=(("x-member-session", auth.session_token),),
    )


def consents(answer: spb.GetStatisticsResponse) -> dict[str, int | None]:
    return {c.purpose_key: c.granted if c.HasField("granted") else None for c in answer.consents}


async def test_small_cells_are_suppressed_and_non_consenting_members_never_count(
    members: MemberServiceStub, statistics: StatisticsServiceStub, clock: FrozenClock
) -> None:
    today = clock.now()
    counted = [await sign_up(members, statistics=True) for _ in range(12)]
    others = [await sign_up(members, statistics=False) for _ in range(3)]

    answer = await statistics.GetStatistics(ask(today))
    assert answer.minimum_cell_size == 10
    assert answer.members == 12  # not 15
    assert answer.active_members_30d == 12
    (day,) = answer.days
    assert day.date == today.date().isoformat()
    assert day.sign_ups == 12
    assert not day.HasField("withdrawals")  # zero is a small cell too
    # 12 of the counted consent to inquiries (the 3 others do too, uncounted). The
    # rates are the opt-in purposes' (membership purposes are what signing up is).
    assert consents(answer) == {"INQUIRY": 12}
    assert [c.purpose for c in answer.consents] == [pb.PURPOSE_INQUIRY]
    assert {c.rate for c in answer.consents} == {1.0}

    # Withdrawals count by the consent at that moment: 10 counted, 3 not.
    for member_id, request in counted[:10] + others:
        await withdraw(members, request, member_id)
    answer = await statistics.GetStatistics(ask(today))
    (day,) = answer.days
    assert (day.sign_ups, day.withdrawals) == (12, 10)
    # Two counted members are left: every cell over them is suppressed.
    assert not answer.HasField("members")
    assert not answer.HasField("active_members_30d")
    assert consents(answer) == {"INQUIRY": None}
    assert not any(c.HasField("rate") for c in answer.consents)


async def test_a_cell_a_shown_total_would_give_away_is_suppressed(
    members: MemberServiceStub, statistics: StatisticsServiceStub, clock: FrozenClock
) -> None:
    start = clock.now()
    signed = [await sign_up(members, statistics=True) for _ in range(14)]
    clock.advance(40 * DAY)
    # Twelve of the fourteen log in again: 12 active is a big cell, but it would
    # tell that exactly 2 are inactive.
    for _, request in signed[:12]:
        await members.Authenticate(
            pb.AuthenticateRequest(
                login_id=request.login_id, password=request.password, client_ip="192.0.2.9"
            )
        )
    answer = await statistics.GetStatistics(ask(start, clock.now()))
    assert answer.members == 14
    assert not answer.HasField("active_members_30d")
    for _, request in signed[12:]:
        await members.Authenticate(
            pb.AuthenticateRequest(
                login_id=request.login_id, password=request.password, client_ip="192.0.2.9"
            )
        )
    answer = await statistics.GetStatistics(ask(start, clock.now()))
    assert answer.active_members_30d == 14
    assert len(answer.days) == 41
    assert answer.days[0].sign_ups == 14
    assert not any(d.HasField("sign_ups") for d in answer.days[1:])


async def test_inquiry_complement_is_suppressed(
    members: MemberServiceStub, statistics: StatisticsServiceStub, clock: FrozenClock
) -> None:
    for _ in range(11):
        await sign_up(members, statistics=True)
    request = sign_up_request(
        consents=[pb.ConsentChoice(purpose=pb.PURPOSE_STATISTICS, granted=True)]
    )
    await members.SignUp(request)  # one member who does not consent to inquiries
    answer = await statistics.GetStatistics(ask(clock.now()))
    assert answer.members == 12
    # 11 granted would tell that exactly one counted member refused inquiries.
    assert consents(answer) == {"INQUIRY": None}


async def test_statistics_read_no_member(
    members: MemberServiceStub, statistics: StatisticsServiceStub, clock: FrozenClock
) -> None:
    member_id, _ = await sign_up(members, statistics=True)
    error = await fails(
        members.GetMember(pb.GetMemberRequest(member_id=member_id, purpose=pb.PURPOSE_STATISTICS)),
        Code.INVALID_ARGUMENT,
    )
    assert "GetStatistics" in field_violations(error)["purpose"]
    # Named by its catalogue key: the same refusal, on the field that named it.
    error = await fails(
        members.GetMember(pb.GetMemberRequest(member_id=member_id, purpose_key="STATISTICS")),
        Code.INVALID_ARGUMENT,
    )
    assert set(field_violations(error)) == {"purpose_key"}
    assert "GetStatistics" in field_violations(error)["purpose_key"]


async def test_bad_statistics_requests_are_refused(
    statistics: StatisticsServiceStub, clock: FrozenClock
) -> None:
    today = clock.now()
    for purpose in (pb.PURPOSE_UNSPECIFIED, pb.PURPOSE_INQUIRY):
        error = await fails(
            statistics.GetStatistics(spb.GetStatisticsRequest(purpose=purpose)),
            Code.INVALID_ARGUMENT,
        )
        assert set(field_violations(error)) == {"purpose"}
    too_long = ask(today, today + 92 * DAY)
    error = await fails(statistics.GetStatistics(too_long), Code.INVALID_ARGUMENT)
    assert set(field_violations(error)) == {"end_date"}
    backwards = ask(today, today - DAY)
    error = await fails(statistics.GetStatistics(backwards), Code.INVALID_ARGUMENT)
    assert set(field_violations(error)) == {"end_date"}
    bad = spb.GetStatisticsRequest(
        purpose=pb.PURPOSE_STATISTICS, start_date="2026-W01-1", end_date="yesterday"
    )
    error = await fails(statistics.GetStatistics(bad), Code.INVALID_ARGUMENT)
    assert set(field_violations(error)) == {"start_date", "end_date"}
    # Both empty: the 30 days up to today.
    answer = await statistics.GetStatistics(spb.GetStatisticsRequest(purpose=pb.PURPOSE_STATISTICS))
    assert len(answer.days) == 30
    assert answer.days[-1].date == today.date().isoformat()
    assert answer.computed_at.seconds == int(today.timestamp())


async def test_the_minimum_cell_size_is_a_setting(
    server_settings: Settings, clock: FrozenClock
) -> None:
    settings = server_settings.model_copy(update={"statistics_min_cell_size": 3})
    async with (
        run_server(settings, clock=clock) as running,
        grpc.aio.insecure_channel(running.target) as channel,
    ):
        members = MemberServiceStub(channel)
        for _ in range(3):
            await sign_up(members, statistics=True)
        answer = await StatisticsServiceStub(channel).GetStatistics(ask(clock.now()))
    assert answer.minimum_cell_size == 3
    assert answer.members == 3


ANALYST = "spiffe://example.org/ns/bi/sa/analyst"
HELPDESK = "spiffe://example.org/ns/support/sa/helpdesk"
POLICY = f"""
trust_domain = "example.org"

[[caller]]
identity = "{ANALYST}"
methods = ["StatisticsService/GetStatistics"]
purposes = ["STATISTICS"]

[[caller]]
identity = "{HELPDESK}"
methods = ["MemberService/GetMember", "StatisticsService/GetStatistics"]
purposes = ["INQUIRY"]
"""


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    return TestPki.create(tmp_path_factory.mktemp("pki"))


async def test_the_caller_policy_must_allow_statistics(
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
        async with pki.channel(running.target, ANALYST) as channel:
            answer = await StatisticsServiceStub(channel).GetStatistics(ask(clock.now()))
            assert not answer.HasField("members")
        # Allowed the method but not the purpose STATISTICS: refused.
        async with pki.channel(running.target, HELPDESK) as channel:
            error = await fails(
                StatisticsServiceStub(channel).GetStatistics(ask(clock.now())),
                Code.PERMISSION_DENIED,
            )
            assert error_info(error).reason == "CALLER_NOT_ALLOWED"
            assert error_info(error).metadata["purpose"] == "STATISTICS"


# --- the consent work's model: policy versions and configured purposes ---------------------


async def test_an_outdated_statistics_grant_is_not_counted(
    members: MemberServiceStub,
    statistics: StatisticsServiceStub,
    channel: grpc.aio.Channel,
    server: RunningServer,
    clock: FrozenClock,
) -> None:
    signed = [await sign_up(members, statistics=True) for _ in range(12)]
    clock.advance(timedelta(minutes=1))
    # A version in force that materially changes STATISTICS: every grant predates it,
    # so reads would be CONSENT_OUTDATED, and nobody is counted until they consent again.
    await PolicyAdminServiceStub(channel).PublishPolicyVersion(
        cpb.PublishPolicyVersionRequest(
            version="2",
            effective_date=clock.now().date().isoformat(),
            text_sha256="5" * 64,
            changed_purposes=["STATISTICS"],
        )
    )
    answer = await statistics.GetStatistics(ask(clock.now()))
    assert not answer.HasField("members")
    assert answer.days[0].sign_ups == 12  # counted as they signed up, with a grant in force
    assert await counted_members(server, clock) == 0

    consent = ConsentServiceStub(channel)
    for member_id, request in signed[:11]:
        await consent.UpdateConsents(
            cpb.UpdateConsentsRequest(
                member_id=member_id,
                changes=[cpb.ConsentChange(purpose_key="STATISTICS", granted=True)],
            ),
            metadata=await member_session(members, request),
        )
    answer = await statistics.GetStatistics(ask(clock.now()))
    assert answer.members == 11
    assert consents(answer) == {"INQUIRY": 11}  # INQUIRY's grants are not outdated

    # The one left outdated withdraws: not a withdrawal of a consenting member.
    member_id, request = signed[11]
    await withdraw(members, request, member_id)
    day = clock.now().date()
    assert (await server.vault.parts.store.statistics(clock.now(), clock.now(), day, day)).days == (
        (day.isoformat(), 12, 0),
    )
    member_id, request = signed[0]
    await withdraw(members, request, member_id)
    assert (await server.vault.parts.store.statistics(clock.now(), clock.now(), day, day)).days == (
        (day.isoformat(), 12, 1),
    )


async def counted_members(server: RunningServer, clock: FrozenClock) -> int:
    day = clock.now().date()
    return (await server.vault.parts.store.statistics(clock.now(), clock.now(), day, day)).members


NEWSLETTER = """
[[purpose]]
key = "NEWSLETTER"
fields = ["email"]
consent = "opt-in"
legal_basis = "the member's separate consent to the newsletter (policy section 3)"

[[purpose]]
key = "LOYALTY"
fields = ["name"]
consent = "membership"
legal_basis = "the loyalty programme every member is part of"
"""


async def test_configured_opt_in_purposes_have_consent_rates(
    store_url: str, tmp_path: Path, clock: FrozenClock
) -> None:
    (tmp_path / "purposes.toml").write_text(NEWSLETTER)
    settings = embedded_settings(
        tmp_path / "data", database_url=store_url, purposes_file=tmp_path / "purposes.toml"
    )
    async with (
        run_server(settings, clock=clock) as running,
        grpc.aio.insecure_channel(running.target) as channel,
    ):
        members = MemberServiceStub(channel)
        for _ in range(12):
            request = sign_up_request(
                consents=[
                    pb.ConsentChoice(purpose=pb.PURPOSE_STATISTICS, granted=True),
                    pb.ConsentChoice(purpose_key="NEWSLETTER", granted=True),
                ]
            )
            await members.SignUp(request)
        answer = await StatisticsServiceStub(channel).GetStatistics(ask(clock.now()))
    assert answer.members == 12
    # Every opt-in purpose, the configured one included; not the membership ones.
    assert consents(answer) == {"INQUIRY": None, "NEWSLETTER": 12}  # INQUIRY: 0, suppressed
    newsletter = {c.purpose_key: c for c in answer.consents}["NEWSLETTER"]
    assert newsletter.purpose == pb.PURPOSE_UNSPECIFIED
