"""Prometheus metrics (issue 11, item 5): the server's endpoint and the sidecar's, each
scraped over real HTTP after real gRPC calls, on both backends.

The server runs in-process (its clock is the test's); the sidecar is the real
``privacy-vault sidecar`` process on the same database. Every scrape is checked for
the personal data the test sent: none of it may appear in any label or anywhere else.
"""

from __future__ import annotations

import asyncio
import socket
import time
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_support import CLIENT_IP, member_session, sign_up_request
from process_support import ServerProcess, cli_env, free_port
from prometheus_client.parser import text_string_to_metric_families

from privacyvault.v1 import member_pb2 as pb
from privacyvault.v1.member_pb2_grpc import MemberServiceStub
from service.config import Settings
from service.metrics import MetricsUnavailable
from service.server import run_server
from vault import FrozenClock

MEMBER = "privacyvault.v1.MemberService"
#: The caller policy of these tests: ``local`` (every caller without mTLS) may call
#: every member method, stating any purpose but ACCOUNT_RECOVERY.
POLICY = """trust_domain = "example.org"

[[caller]]
identity = "local"
methods = [{methods}]
purposes = ["IDENTIFICATION", "INQUIRY", "MEMBER_REQUEST", "STATISTICS"]
"""

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=15) as reply:
        assert reply.status == 200
        text: str = reply.read().decode()
        return text


async def scraped(port: int) -> tuple[str, Samples]:
    """The page and its samples. Off the event loop: the database-backed gauges are
    read on it while the scrape waits."""
    text = await asyncio.to_thread(scrape, port)
    samples = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    return text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample ``name`` with exactly ``labels`` (0 when there is none yet)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def rpc(method: str, grpc_type: str = "unary", service: str = MEMBER) -> dict[str, str]:
    return {"grpc_type": grpc_type, "grpc_service": service, "grpc_method": method}


def assert_no_personal_data(text: str, values: Iterator[str] | list[str]) -> None:
    for secret in values:
        assert secret not in text, "personal data in the metrics"


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    service = pb.DESCRIPTOR.services_by_name["MemberService"]
    methods = ", ".join(f'"MemberService/{m.name}"' for m in service.methods)
    path = tmp_path / "callers.toml"
    path.write_text(POLICY.format(methods=methods))
    return path


async def test_metrics_are_off_unless_an_address_is_set(server_settings: Settings) -> None:
    async with run_server(server_settings) as running:
        assert running.metrics_port is None


async def test_a_metrics_address_in_use_refuses_the_start(server_settings: Settings) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        settings = server_settings.model_copy(update={"metrics_address": address})
        with pytest.raises(MetricsUnavailable, match=f"{address} cannot be listened on"):
            async with run_server(settings):
                pytest.fail("the server started")


async def test_the_server_counts_calls_by_code_and_domain_events_without_personal_data(
    server_settings: Settings, clock: FrozenClock, policy_file: Path
) -> None:
    settings = server_settings.model_copy(
        update={"metrics_address": "127.0.0.1:0", "caller_policy_file": policy_file}
    )
    async with (
        run_server(settings, clock=clock) as server,
        grpc.aio.insecure_channel(server.target) as channel,
    ):
        assert server.metrics_port is not None
        members = MemberServiceStub(channel)
        _, before = await scraped(server.metrics_port)
        assert value(before, "grpc_server_started_total", **rpc("SignUp")) == 0
        assert value(before, "privacy_vault_sign_ups_total") == 0

        first = sign_up_request(
            consents=[pb.ConsentChoice(purpose=pb.PURPOSE_INQUIRY, granted=False)]
        )
        second = sign_up_request()
        first_id = (await members.SignUp(first)).member_id
        second_id = (await members.SignUp(second)).member_id
        wrong = pb.AuthenticateRequest(login_id=first.login_id, password="not the password 1")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await members.Authenticate(wrong, metadata=CLIENT_IP)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        await members.GetMember(
            pb.GetMemberRequest(member_id=first_id, purpose=pb.PURPOSE_IDENTIFICATION)
        )
        # The caller policy refuses the purpose; the member refused consent to another.
        for purpose, code in (
            (pb.PURPOSE_ACCOUNT_RECOVERY, grpc.StatusCode.PERMISSION_DENIED),
            (pb.PURPOSE_INQUIRY, grpc.StatusCode.PERMISSION_DENIED),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await members.GetMember(pb.GetMemberRequest(member_id=first_id, purpose=purpose))
            assert denied.value.code() == code
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await members.GetMember(
                pb.GetMemberRequest(member_id=str(uuid.uuid4()), purpose=pb.PURPOSE_IDENTIFICATION)
            )
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        first_session = await member_session(members, first)
        pieces = [
            piece
            async for piece in members.StreamMemberData(
                pb.StreamMemberDataRequest(member_id=first_id), metadata=first_session
            )
        ]
        session = await member_session(members, second)
        await members.Withdraw(
            pb.WithdrawRequest(member_id=second_id, password=second.password), metadata=session
        )
        health = health_pb2_grpc.HealthStub(channel)
        await health.Check(health_pb2.HealthCheckRequest(service=""))

        text, after = await scraped(server.metrics_port)

    assert value(after, "grpc_server_started_total", **rpc("SignUp")) == 2
    assert value(after, "grpc_server_handled_total", **rpc("SignUp"), grpc_code="OK") == 2
    assert value(after, "grpc_server_handling_seconds_count", **rpc("SignUp")) == 2
    assert value(after, "grpc_server_msg_received_total", **rpc("SignUp")) == 2
    assert value(after, "grpc_server_msg_sent_total", **rpc("SignUp")) == 2
    auth = rpc("Authenticate")
    assert value(after, "grpc_server_started_total", **auth) == 3
    assert value(after, "grpc_server_handled_total", **auth, grpc_code="Unauthenticated") == 1
    assert value(after, "grpc_server_handled_total", **auth, grpc_code="OK") == 2
    assert value(after, "grpc_server_msg_received_total", **auth) == 3
    assert value(after, "grpc_server_msg_sent_total", **auth) == 2
    get = rpc("GetMember")
    assert value(after, "grpc_server_started_total", **get) == 4
    assert value(after, "grpc_server_handled_total", **get, grpc_code="OK") == 1
    assert value(after, "grpc_server_handled_total", **get, grpc_code="PermissionDenied") == 2
    assert value(after, "grpc_server_handled_total", **get, grpc_code="NotFound") == 1
    assert value(after, "grpc_server_handling_seconds_count", **get) == 4
    stream = rpc("StreamMemberData", "server_stream")
    assert value(after, "grpc_server_handled_total", **stream, grpc_code="OK") == 1
    assert value(after, "grpc_server_msg_received_total", **stream) == 1
    assert value(after, "grpc_server_msg_sent_total", **stream) == len(pieces) > 0
    check = rpc("Check", service="grpc.health.v1.Health")
    assert value(after, "grpc_server_handled_total", **check, grpc_code="OK") == 1

    assert value(after, "privacy_vault_sign_ups_total") == 2
    assert value(after, "privacy_vault_login_failures_total") == 1
    assert value(after, "privacy_vault_login_lockouts_total") == 0
    assert value(after, "privacy_vault_shreds_total", reason="withdrawal") == 1
    denial = {"caller": "local", "method": "MemberService/GetMember"}
    assert (
        value(
            after,
            "privacy_vault_policy_denials_total",
            **denial,
            purpose="ACCOUNT_RECOVERY",
            reason="caller_policy",
        )
        == 1
    )
    assert (
        value(
            after,
            "privacy_vault_policy_denials_total",
            **denial,
            purpose="INQUIRY",
            reason="consent",
        )
        == 1
    )
    # The sidecar is not in this process: no database-backed gauges here.
    assert "privacy_vault_kek_versions" not in text
    assert_no_personal_data(
        text,
        [
            first_id,
            second_id,
            *(r.login_id for r in (first, second)),
            *(r.email for r in (first, second)),
            *(r.name for r in (first, second)),
            CLIENT_IP[0][1],
        ],
    )


async def test_a_lockout_is_counted_once_when_it_starts(
    server_settings: Settings, clock: FrozenClock
) -> None:
    settings = server_settings.model_copy(
        update={"metrics_address": "127.0.0.1:0", "login_lock_after": 2}
    )
    async with (
        run_server(settings, clock=clock) as server,
        grpc.aio.insecure_channel(server.target) as channel,
    ):
        assert server.metrics_port is not None
        members = MemberServiceStub(channel)
        request = sign_up_request()
        await members.SignUp(request)
        wrong = pb.AuthenticateRequest(login_id=request.login_id, password="wrong password 123")
        for _ in range(3):  # the second locks the account; the third is refused in the lock
            with pytest.raises(grpc.aio.AioRpcError):
                await members.Authenticate(wrong, metadata=CLIENT_IP)
        _, samples = await scraped(server.metrics_port)
    assert value(samples, "privacy_vault_login_failures_total") == 3
    assert value(samples, "privacy_vault_login_lockouts_total") == 1


# --- the sidecar's own endpoint --------------------------------------------------------


async def _first_round(port: int, sidecar: ServerProcess) -> tuple[str, Samples]:
    """The sidecar's page once its first round is done."""
    deadline = time.monotonic() + 30
    while True:
        assert sidecar.process.poll() is None, sidecar.log_text()
        try:
            text, samples = await scraped(port)
            if value(samples, "privacy_vault_sidecar_rounds_total", outcome="done") >= 1:
                return text, samples
        except OSError:
            pass  # not listening yet
        assert time.monotonic() < deadline, sidecar.log_text()
        await asyncio.sleep(0.2)


async def test_the_sidecar_serves_its_rounds_and_the_database_gauges(
    server_settings: Settings, store_url: str, tmp_path: Path
) -> None:
    # Members last seen 100 days ago; the sidecar's notice is due after 90 (120 - 30).
    clock = FrozenClock(datetime.now(UTC) - timedelta(days=100))
    port = free_port()
    env = cli_env(
        server_settings.data_dir,
        database_url=store_url,
        metrics_address=f"127.0.0.1:{port}",
        metrics_refresh_seconds="0",
        inactivity_days="120",
        inactivity_notice_days="30",
        sidecar_interval_seconds="3600",
    )
    async with (
        run_server(server_settings, clock=clock) as server,
        grpc.aio.insecure_channel(server.target) as channel,
    ):
        members = MemberServiceStub(channel)
        requests = [sign_up_request(), sign_up_request()]
        ids = [(await members.SignUp(r)).member_id for r in requests]
        sidecar = ServerProcess(env, tmp_path, tmp_path / "sidecar.log", ("sidecar",))
        try:
            text, first = await _first_round(port, sidecar)
            assert value(first, "privacy_vault_lifecycle_processed_total", step="notices") == 2
            assert value(first, "privacy_vault_mail_total", outcome="sent") == 2
            assert value(first, "privacy_vault_sidecar_round_seconds_count") == 1
            assert value(first, "privacy_vault_sidecar_lease_held") == 1
            assert value(first, "privacy_vault_outbox_messages") == 0
            assert value(first, "privacy_vault_lifecycle_due", step="notices") == 0
            assert value(first, "privacy_vault_lifecycle_due", step="shredded") == 0
            assert value(first, "privacy_vault_kek_versions", state="active") == 1
            member_keys = {"version": "1", "state": "active", "kind": "member"}
            assert value(first, "privacy_vault_kek_version_keys", **member_keys) == 2
            assert value(first, "privacy_vault_rewrap_pending_keys") == 0

            # Another member due for a notice, and a rotation: the gauges follow.
            third = sign_up_request()
            requests.append(third)
            ids.append((await members.SignUp(third)).member_id)
            await server.vault.keys.rotate("metrics test")
            later_text, later = await scraped(port)
        finally:
            try:
                code, _ = sidecar.terminate()
            finally:
                sidecar.close()
    assert code == 0, sidecar.log_text()
    assert value(later, "privacy_vault_lifecycle_due", step="notices") == 1
    assert value(later, "privacy_vault_kek_versions", state="active") == 1
    assert value(later, "privacy_vault_kek_versions", state="decrypt_only") == 1
    assert value(later, "privacy_vault_kek_active_version") == 2
    old_keys = {"version": "1", "state": "decrypt_only"}
    assert value(later, "privacy_vault_kek_version_keys", **old_keys, kind="member") == 3
    assert value(later, "privacy_vault_kek_version_keys", **old_keys, kind="index") == 1
    assert value(later, "privacy_vault_rewrap_pending_keys") == 4
    # The sidecar answers no RPC, and counts nothing that happened in the server.
    assert value(later, "privacy_vault_sign_ups_total") == 0
    assert "grpc_server_started_total{" not in later_text
    for page in (text, later_text):
        assert_no_personal_data(
            page,
            [
                *ids,
                *(r.login_id for r in requests),
                *(r.email for r in requests),
                *(r.name for r in requests),
            ],
        )
