"""The server as deployed: the real CLI in subprocesses (start, health, graceful
SIGTERM, restart on the same data, reflection, migrate, bad configuration), and the
in-process server's limits (request size, default deadline, request ids)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from process_support import SHUTDOWN_TIMEOUT, cli_env, run_cli, serving
from tls_support import TestPki

from privacyvault.v1 import member_pb2 as pb
from privacyvault.v1 import member_pb2_grpc
from service.config import Settings
from service.server import run_server
from vault import FrozenClock
from vault.passwords import usable_cpus

MEMBER_SERVICE = "privacyvault.v1.MemberService"


# --- the CLI in a subprocess -------------------------------------------------------------


SIGN_UP = pb.SignUpRequest(
    login_id="process.member",
    password="a long passphrase 1",
    name="Process Member",
    email="process.member@example.com",
    birth_date="1990-04-01",
)
CLIENT_IP = (("x-client-ip", "203.0.113.9"),)


@pytest.mark.parametrize("event_loop", ["default", "asyncio"])
def test_serve_starts_with_defaults_and_stops_gracefully_on_sigterm(
    tmp_path: Path, event_loop: str
) -> None:
    data_dir = tmp_path / "data"
    chosen = {} if event_loop == "default" else {"event_loop": event_loop}
    with serving(tmp_path, data_dir, "first", **chosen) as (server, channel):
        members = member_pb2_grpc.MemberServiceStub(channel)
        member_id = members.SignUp(SIGN_UP, timeout=10).member_id
        health = health_pb2_grpc.HealthStub(channel)
        named = health.Check(health_pb2.HealthCheckRequest(service=MEMBER_SERVICE), timeout=5)
        assert named.status == health_pb2.HealthCheckResponse.SERVING
        channel.close()
        code, took = server.terminate()
        assert code == 0, server.log_text()
        assert took < SHUTDOWN_TIMEOUT
        events = [e["event"] for e in server.events()]
        assert "server_started" in events
        assert events.index("shutdown_requested") < events.index("server_stopped")
        started = next(e for e in server.events() if e["event"] == "server_started")
        assert started["event_loop"] == ("uvloop" if event_loop == "default" else "asyncio")
        # The default pool: the CPUs this (child) process may use, as the test's own.
        assert started["password_workers"] == usable_cpus()
    key_file = data_dir / "kek.json"
    key_bytes = key_file.read_bytes()
    assert (data_dir / "vault.db").exists()

    with serving(tmp_path, data_dir, "second") as (server, channel):
        members = member_pb2_grpc.MemberServiceStub(channel)
        again = members.Authenticate(
            pb.AuthenticateRequest(login_id=SIGN_UP.login_id, password=SIGN_UP.password),
            metadata=CLIENT_IP,
            timeout=10,
        )
        assert again.member_id == member_id
        channel.close()
        assert server.terminate()[0] == 0
    # The same key file was reused, not replaced.
    assert key_file.read_bytes() == key_bytes


def _list_services(channel: grpc.Channel, version: str = "v1alpha") -> list[str]:
    """The services reflection lists, asked under ``grpc.reflection.<version>`` (v1's
    messages are v1alpha's on the wire)."""
    call = channel.stream_stream(
        f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    responses = call(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
    return [s.name for r in responses for s in r.list_services_response.service]


def test_reflection_is_on_in_the_embedded_environment(tmp_path: Path) -> None:
    with serving(tmp_path, tmp_path / "data", "embedded") as (_, channel):
        services = _list_services(channel)
        assert _list_services(channel, "v1") == services
    assert MEMBER_SERVICE in services
    assert "grpc.health.v1.Health" in services
    assert "grpc.reflection.v1.ServerReflection" in services


def _production_settings(tmp_path: Path) -> tuple[grpc.ChannelCredentials, dict[str, str]]:
    """What production needs to start (mTLS and a caller policy), and a client for it."""
    pki = TestPki.create(tmp_path / "pki")
    policy = tmp_path / "callers.toml"
    policy.write_text('trust_domain = "example.org"\n')
    client = pki.client("spiffe://example.org/ns/ops/sa/probe")
    return pki.credentials(client), pki.production_settings(policy)


def test_reflection_is_off_in_production(tmp_path: Path) -> None:
    credentials, settings = _production_settings(tmp_path)
    with serving(tmp_path, tmp_path / "data", "production", credentials, **settings) as (
        server,
        channel,
    ):
        for version in ("v1alpha", "v1"):
            with pytest.raises(grpc.RpcError) as caught:
                _list_services(channel, version)
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED  # type: ignore[attr-defined]
        started = [e for e in server.events() if e.get("event") == "server_started"]
        assert started
        assert started[0]["reflection"] is False


def test_migrate_applies_then_reports_up_to_date(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    env = cli_env(data_dir)
    first = run_cli(["migrate"], env, tmp_path)
    assert first.returncode == 0, first.stderr
    assert "applied migrations: [1" in first.stdout
    assert (data_dir / "vault.db").exists()
    second = run_cli(["migrate"], env, tmp_path)
    assert second.returncode == 0, second.stderr
    assert "database is up to date" in second.stdout


@pytest.mark.parametrize("command", ["serve", "migrate"])
def test_invalid_setting_exits_2_naming_the_variable(tmp_path: Path, command: str) -> None:
    env = cli_env(tmp_path / "data", listen_address="nonsense")
    result = run_cli([command], env, tmp_path)
    assert result.returncode == 2
    assert "PRIVACY_VAULT_LISTEN_ADDRESS" in result.stderr
    assert "nonsense" not in result.stderr + result.stdout
    assert not (tmp_path / "data").exists()


def test_invalid_setting_value_is_not_echoed(tmp_path: Path) -> None:
    # A value may be a secret (a URL with a password): name the variable only.
    secret = "hunter2-s3cret-value"
    env = cli_env(tmp_path / "data", database_pool_size=secret)
    result = run_cli(["serve"], env, tmp_path)
    assert result.returncode == 2
    assert "PRIVACY_VAULT_DATABASE_POOL_SIZE" in result.stderr
    assert secret not in result.stderr + result.stdout


def test_tls_file_settings_are_paths_not_file_sourced_values(tmp_path: Path) -> None:
    # PRIVACY_VAULT_TLS_CERT_FILE is a path, not "tls_cert from a file": a DER file
    # (not UTF-8) must not be read as a setting's text. `migrate` does not use TLS.
    der = tmp_path / "server.der"
    der.write_bytes(b"\x30\x82\x01\xff\x80\xfe binary certificate")
    env = cli_env(tmp_path / "data", tls_cert_file=str(der), tls_key_file=str(der))
    result = run_cli(["migrate"], env, tmp_path)
    assert result.returncode == 0, result.stderr[-500:]


# --- the in-process server's limits ---------------------------------------------------------


def _trailer(error: grpc.aio.AioRpcError, key: str) -> str | None:
    for k, value in error.trailing_metadata() or ():
        if k == key:
            return str(value)
    return None


async def test_request_over_max_request_bytes_is_refused(
    members: member_pb2_grpc.MemberServiceStub,
) -> None:
    # Just under 64 KiB reaches the servicer (and fails validation there) ...
    under = pb.SignUpRequest(login_id="size.member", name="n" * (60 * 1024))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await members.SignUp(under)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # ... just over it never does.
    over = pb.SignUpRequest(login_id="size.member", name="n" * (65 * 1024))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await members.SignUp(over)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_call_without_deadline_gets_the_default_deadline(
    server_settings: Settings, clock: FrozenClock
) -> None:
    settings = server_settings.model_copy(
        update={
            "default_deadline_seconds": 0.05,
            "argon2_time_cost": 10,
            "argon2_memory_cost": 65536,
        }
    )
    async with (
        run_server(settings, clock=clock) as running,
        grpc.aio.insecure_channel(running.target) as channel,
    ):
        members = member_pb2_grpc.MemberServiceStub(channel)
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await members.SignUp(SIGN_UP, metadata=(("x-request-id", "deadline-rid-1"),))
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 0.5  # well before the hash would finish
        assert _trailer(caught.value, "x-request-id") == "deadline-rid-1"
        # A caller's own deadline is honoured instead of the default.
        response = await members.SignUp(SIGN_UP, timeout=30)
        assert response.member_id


async def _error_of(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


async def test_every_error_carries_a_request_id(
    members: member_pb2_grpc.MemberServiceStub,
) -> None:
    member_id = (await members.SignUp(SIGN_UP)).member_id
    failing = {
        grpc.StatusCode.INVALID_ARGUMENT: lambda md: members.SignUp(
            pb.SignUpRequest(), metadata=md
        ),
        grpc.StatusCode.ALREADY_EXISTS: lambda md: members.SignUp(SIGN_UP, metadata=md),
        grpc.StatusCode.UNAUTHENTICATED: lambda md: members.Authenticate(
            pb.AuthenticateRequest(login_id=SIGN_UP.login_id, password="wrong password 9"),
            metadata=(*md, *CLIENT_IP),
        ),
        grpc.StatusCode.NOT_FOUND: lambda md: members.GetMember(
            pb.GetMemberRequest(
                member_id="00000000-0000-4000-8000-000000000000",
                purpose=pb.PURPOSE_IDENTIFICATION,
            ),
            metadata=md,
        ),
        grpc.StatusCode.PERMISSION_DENIED: lambda md: members.GetMember(
            pb.GetMemberRequest(member_id=member_id, purpose=pb.PURPOSE_INQUIRY), metadata=md
        ),
    }
    seen = set()
    for code, call in failing.items():
        error = await _error_of(call(()))
        assert error.code() == code
        generated = _trailer(error, "x-request-id")
        assert generated is not None, code
        assert len(generated) == 32
        assert all(c in "0123456789abcdef" for c in generated)
        seen.add(generated)

        sent = f"client-rid-{code.name.lower()}"
        echoed = await _error_of(call((("x-request-id", sent),)))
        assert echoed.code() == code
        assert _trailer(echoed, "x-request-id") == sent
    assert len(seen) == len(failing)  # a fresh id per call


async def test_request_id_is_capped(members: member_pb2_grpc.MemberServiceStub) -> None:
    long_id = "r" * 100
    error = await _error_of(
        members.SignUp(pb.SignUpRequest(), metadata=(("x-request-id", long_id),))
    )
    assert _trailer(error, "x-request-id") == "r" * 64
