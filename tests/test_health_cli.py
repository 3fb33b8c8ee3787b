"""``privacy-vault health`` against real servers: plaintext, the health-only listener,
TLS and mTLS (certificates made here), an unknown service, NOT_SERVING, nothing
listening, a bad configuration. The command runs in a subprocess (the real CLI); the
server runs in-process, so the command is awaited in a thread."""

from __future__ import annotations

import asyncio
import ipaddress
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_support import embedded_settings
from process_support import cli_env, free_port, run_cli

from privacyvault.v1 import member_pb2 as pb
from privacyvault.v1 import member_pb2_grpc
from service.server import RunningServer, run_server

MEMBER_SERVICE = "privacyvault.v1.MemberService"


async def health(tmp_path: Path, *args: str, **settings: str) -> subprocess.CompletedProcess[str]:
    env = cli_env(tmp_path / "data", **settings)
    return await asyncio.to_thread(run_cli, ["health", *args], env, tmp_path)


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


# --- plaintext ------------------------------------------------------------------------------


async def test_serving_server_exits_0(server: RunningServer, tmp_path: Path) -> None:
    result = await health(tmp_path, listen_address=server.target)
    assert result.returncode == 0
    assert one_line(result) == f"SERVING {server.target}"


async def test_a_named_service_and_an_unknown_one(server: RunningServer, tmp_path: Path) -> None:
    known = await health(tmp_path, "--service", MEMBER_SERVICE, listen_address=server.target)
    assert known.returncode == 0, known.stdout
    assert one_line(known) == f"SERVING {server.target} service={MEMBER_SERVICE}"
    unknown = await health(tmp_path, "--service", "no.Such", listen_address=server.target)
    assert unknown.returncode == 1
    assert one_line(unknown).startswith("SERVICE_UNKNOWN ")


async def test_not_serving_exits_1(server: RunningServer, tmp_path: Path) -> None:
    await server.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    result = await health(tmp_path, listen_address=server.target)
    assert result.returncode == 1
    assert one_line(result) == f"NOT_SERVING {server.target}"


async def test_nothing_listening_exits_2(tmp_path: Path) -> None:
    target = f"127.0.0.1:{free_port()}"
    result = await health(tmp_path, "--timeout", "0.5", listen_address=target)
    assert result.returncode == 2
    assert one_line(result) == f"unreachable (UNAVAILABLE) {target}"


async def test_address_option_and_wildcard_host(server: RunningServer, tmp_path: Path) -> None:
    # The listen address's wildcard host means this host's loopback; --address wins.
    # A listen address beyond loopback is a valid setting only with a caller policy
    # (issue 10); the check reads the setting, not the policy.
    policy = tmp_path / "callers.toml"
    policy.write_text('trust_domain = "example.org"\n')
    wildcard = await health(
        tmp_path, listen_address=f"0.0.0.0:{server.port}", caller_policy_file=str(policy)
    )
    assert wildcard.returncode == 0, wildcard.stdout
    assert one_line(wildcard) == f"SERVING 127.0.0.1:{server.port}"
    chosen = await health(
        tmp_path, "--address", server.target, listen_address=f"127.0.0.1:{free_port()}"
    )
    assert chosen.returncode == 0, chosen.stdout


async def test_bad_configuration_exits_2_naming_the_setting(tmp_path: Path) -> None:
    result = await health(tmp_path, listen_address="no-port", admin_token="x")
    assert result.returncode == 2
    line = one_line(result)
    assert "PRIVACY_VAULT_LISTEN_ADDRESS" in line
    assert "no-port" not in line


# --- the plaintext health-only listener -------------------------------------------------------


@pytest.fixture
async def health_port_server(tmp_path: Path) -> AsyncIterator[tuple[RunningServer, str]]:
    address = f"127.0.0.1:{free_port()}"
    settings = embedded_settings(tmp_path / "server", health_listen_address=address)
    async with run_server(settings) as running:
        yield running, address


async def test_health_listener_serves_health_only(
    health_port_server: tuple[RunningServer, str], tmp_path: Path
) -> None:
    running, address = health_port_server
    result = await health(tmp_path, listen_address=running.target, health_listen_address=address)
    assert result.returncode == 0, result.stdout
    assert one_line(result) == f"SERVING {address}"
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=MEMBER_SERVICE), timeout=5
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await member_pb2_grpc.MemberServiceStub(channel).GetMember(
                pb.GetMemberRequest(member_id="m", purpose=pb.PURPOSE_INQUIRY), timeout=5
            )
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
    # A draining server says NOT_SERVING on the health listener too.
    await running.health.enter_graceful_shutdown()
    draining = await health(tmp_path, listen_address=running.target, health_listen_address=address)
    assert draining.returncode == 1
    assert one_line(draining) == f"NOT_SERVING {address}"


def test_health_listen_address_must_be_host_port(tmp_path: Path) -> None:
    env = cli_env(tmp_path / "data", health_listen_address="50052")
    result = run_cli(["health"], env, tmp_path)
    assert result.returncode == 2
    assert "PRIVACY_VAULT_HEALTH_LISTEN_ADDRESS (must be host:port)" in one_line(result)


# --- TLS and mTLS ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[str, ec.EllipticCurvePrivateKey] | None,
    sans: list[x509.GeneralName],
) -> x509.Certificate:
    now = datetime.now(UTC)
    issuer_name, issuer_key = issuer or (subject, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_pki(directory: Path) -> Pki:
    """A CA; a server certificate for the DNS name ``privacy-vault.test`` only (so the
    check must take the name from it); a client certificate with a SPIFFE ID; and an
    unrelated CA."""
    directory.mkdir()
    paths = {n: directory / f"{n}.pem" for n in Pki.__dataclass_fields__}
    ca_key = ec.generate_private_key(ec.SECP256R1())
    paths["ca"].write_bytes(
        _certificate("test CA", ca_key, None, []).public_bytes(serialization.Encoding.PEM)
    )
    for who, sans in (
        ("server", [x509.DNSName("privacy-vault.test")]),
        ("client", [x509.UniformResourceIdentifier("spiffe://test.example/probe")]),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate(who, key, ("test CA", ca_key), sans)
        paths[f"{who}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(paths[f"{who}_key"], key)
    other_key = ec.generate_private_key(ec.SECP256R1())
    other = _certificate(
        "other CA", other_key, None, [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    )
    paths["other_ca"].write_bytes(other.public_bytes(serialization.Encoding.PEM))
    return Pki(**paths)


@pytest.fixture
async def mtls_server(tmp_path: Path) -> AsyncIterator[tuple[RunningServer, Pki]]:
    pki = make_pki(tmp_path / "pki")
    settings = embedded_settings(
        tmp_path / "server",
        tls_cert_file=pki.server_cert,
        tls_key_file=pki.server_key,
        tls_client_ca_file=pki.ca,
    )
    async with run_server(settings) as running:
        yield running, pki


def tls_settings(running: RunningServer, pki: Pki) -> dict[str, str]:
    return {
        "listen_address": running.target,
        "tls_cert_file": str(pki.server_cert),
        "tls_key_file": str(pki.server_key),
        "tls_client_ca_file": str(pki.ca),
    }


async def test_mtls_with_the_servers_own_pair(
    mtls_server: tuple[RunningServer, Pki], tmp_path: Path
) -> None:
    running, pki = mtls_server
    result = await health(tmp_path, **tls_settings(running, pki))
    assert result.returncode == 0, result.stdout + result.stderr
    assert one_line(result) == f"SERVING {running.target}"


async def test_mtls_with_a_client_certificate_of_its_own(
    mtls_server: tuple[RunningServer, Pki], tmp_path: Path
) -> None:
    running, pki = mtls_server
    result = await health(
        tmp_path,
        **tls_settings(running, pki),
        health_client_cert_file=str(pki.client_cert),
        health_client_key_file=str(pki.client_key),
        health_ca_file=str(pki.ca),
        health_server_name="privacy-vault.test",
    )
    assert result.returncode == 0, result.stdout + result.stderr


async def test_mtls_refusals_exit_2_without_paths(
    mtls_server: tuple[RunningServer, Pki], tmp_path: Path
) -> None:
    running, pki = mtls_server
    settings = tls_settings(running, pki)
    # The server's certificate does not chain to the CA the check trusts.
    wrong_ca = await health(tmp_path, **settings, health_ca_file=str(pki.other_ca))
    assert wrong_ca.returncode == 2
    assert one_line(wrong_ca) == f"unreachable (UNAVAILABLE) {running.target}"
    # Plaintext to a TLS port.
    plain = await health(tmp_path, listen_address=running.target)
    assert plain.returncode == 2
    # A client certificate without its key.
    half = await health(tmp_path, **settings, health_client_cert_file=str(pki.client_cert))
    assert half.returncode == 2
    assert one_line(half).startswith("misconfigured: ")
    # A missing file.
    missing = await health(tmp_path, **settings, health_ca_file=str(tmp_path / "nope.pem"))
    assert missing.returncode == 2
    for result in (wrong_ca, half, missing):
        assert str(tmp_path) not in result.stdout + result.stderr
