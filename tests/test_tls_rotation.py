"""Certificates rotate without a restart (issue 11, item 7): the server's certificate,
key and client CA are reloaded when their files change, replaced one by one or swapped
at once like a Kubernetes secret volume; a set that cannot be used is refused with a
log line and the last good one stays in force.

Real servers (in-process, and one ``privacy-vault serve`` process) over real TLS: what a
new connection is shown is read by a TLS handshake of our own
(``tls_support.presented_certificate``), and gRPC channels that trust only the old or
only the new CA show the same through gRPC itself. ``TLS_FILES_CHECK_SECONDS=0``: every
handshake checks the files, so a change is seen by the next connection, with no waiting.

Tests that only connect use SQLite; the one whose calls reach storage (a caller
identity after a CA change) runs on both backends."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_support import embedded_settings, error_info, sign_up_request
from process_support import ServerProcess, cli_env, free_port, run_cli
from structlog.testing import capture_logs
from tls_support import ClientCert, SecretVolume, TestPki, presented_certificate

from privacyvault.v1.member_pb2_grpc import MemberServiceStub
from service.config import Settings
from service.server import RunningServer, run_server
from service.server_certificates import TlsFilesInvalid
from vault import FrozenClock

PORTAL = "spiffe://example.org/ns/web/sa/portal"
STRANGER = "spiffe://example.org/ns/other/sa/unknown"
POLICY = f"""
trust_domain = "example.org"

[[caller]]
identity = "{PORTAL}"
methods = ["MemberService/SignUp"]
"""
# The names a secret volume from cert-manager holds (kubernetes.io/tls, plus the CA).
CERT, KEY, CA = "tls.crt", "tls.key", "ca.crt"


def fingerprint(certificate: x509.Certificate | bytes) -> str:
    if isinstance(certificate, bytes):
        certificate = x509.load_pem_x509_certificate(certificate)
    return certificate.fingerprint(hashes.SHA256()).hex()


class ServerFiles:
    """The server's three TLS files, in a plain directory (each file replaced by a
    rename, one after the other, as most tools do) or a Kubernetes secret volume."""

    def __init__(self, directory: Path, layout: str) -> None:
        self.volume = SecretVolume(directory) if layout == "secret-volume" else None
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.directory / name

    def write(self, files: dict[str, bytes]) -> None:
        if self.volume is not None:
            self.volume.write(files)
            return
        for name, content in files.items():
            staged = self.path(name + ".new")
            staged.write_bytes(content)
            os.replace(staged, self.path(name))

    def settings(self, check_every: float = 0) -> dict[str, Any]:
        return {
            "tls_cert_file": self.path(CERT),
            "tls_key_file": self.path(KEY),
            "tls_client_ca_file": self.path(CA),
            "tls_files_check_seconds": check_every,
        }


def tls_set(pki: TestPki, client_ca: TestPki) -> tuple[dict[str, bytes], bytes]:
    """A new server pair from ``pki`` with ``client_ca``'s certificate, as files; and
    the new certificate."""
    cert, key = pki.server_pair()
    return {CERT: cert, KEY: key, CA: client_ca.ca_pem}, cert


def mtls_channel(target: str, server_ca: TestPki, client: ClientCert) -> grpc.aio.Channel:
    """A channel with a connection of its own (no subchannel shared with another test
    channel) that trusts ``server_ca`` only and presents ``client``."""
    credentials = grpc.ssl_channel_credentials(server_ca.ca_pem, client.key, client.cert)
    return grpc.aio.secure_channel(
        target, credentials, options=[("grpc.use_local_subchannel_pool", 1)]
    )


async def health_check(target: str, server_ca: TestPki, client: ClientCert) -> grpc.StatusCode:
    """The code of a health check over a new connection (OK or the handshake's error)."""
    async with mtls_channel(target, server_ca, client) as ch:
        return await health_status(ch)


async def health_status(ch: grpc.aio.Channel) -> grpc.StatusCode:
    try:
        await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def presented(server: RunningServer, client: ClientCert) -> str:
    """The fingerprint of the certificate a new connection is shown."""
    return fingerprint(await asyncio.to_thread(presented_certificate, server.port, client))


@pytest.fixture
def first(tmp_path: Path) -> TestPki:
    return TestPki.create(tmp_path / "first-ca", name="first CA")


@pytest.fixture
def second(tmp_path: Path) -> TestPki:
    return TestPki.create(tmp_path / "second-ca", name="second CA")


def _pem_in(logs: list[dict[str, Any]]) -> bool:
    return any("BEGIN" in str(value) for entry in logs for value in entry.values())


# --- the server's certificate and key ---------------------------------------------------


@pytest.mark.parametrize("layout", ["replace", "secret-volume"])
async def test_a_new_pair_is_shown_to_new_connections_and_old_ones_keep_working(
    tmp_path: Path, first: TestPki, second: TestPki, clock: FrozenClock, layout: str
) -> None:
    files = ServerFiles(tmp_path / "tls", layout)
    first_set, first_cert = tls_set(first, client_ca=first)
    files.write(first_set)
    client = first.client(PORTAL)
    settings = embedded_settings(tmp_path / "data", **files.settings())
    async with run_server(settings, clock=clock) as server:
        assert await presented(server, client) == fingerprint(first_cert)
        before = mtls_channel(server.target, first, client)
        async with before:
            assert await health_status(before) == grpc.StatusCode.OK
            with capture_logs() as logs:
                files.write(first_set)  # the same content again: nothing to reload
                assert await presented(server, client) == fingerprint(first_cert)
            assert not [e for e in logs if e["event"] == "tls_files_loaded"]

            # A pair from another CA: only a client trusting that CA gets through now.
            second_set, second_cert = tls_set(second, client_ca=first)
            with capture_logs() as logs:
                files.write(second_set)
                assert await presented(server, client) == fingerprint(second_cert)
            loaded = [e for e in logs if e["event"] == "tls_files_loaded"]
            assert len(loaded) == 1
            assert loaded[0]["reloaded"] is True
            assert loaded[0]["fingerprint"] == fingerprint(second_cert)
            assert not _pem_in(logs)
            assert await health_check(server.target, second, client) == grpc.StatusCode.OK
            assert await health_check(server.target, first, client) == (grpc.StatusCode.UNAVAILABLE)
            # The connection made before the change keeps its certificate and works.
            assert await health_status(before) == grpc.StatusCode.OK


async def test_a_change_waits_for_the_check_interval(
    tmp_path: Path, first: TestPki, second: TestPki, clock: FrozenClock
) -> None:
    files = ServerFiles(tmp_path / "tls", "replace")
    first_set, first_cert = tls_set(first, client_ca=first)
    files.write(first_set)
    client = first.client(PORTAL)
    settings = embedded_settings(tmp_path / "data", **files.settings(check_every=300))
    async with run_server(settings, clock=clock) as server:
        files.write(tls_set(second, client_ca=first)[0])
        # The next check is 300 s away: the files are not even looked at before.
        assert await presented(server, client) == fingerprint(first_cert)
        assert await health_check(server.target, first, client) == grpc.StatusCode.OK


# --- a set that cannot be used -----------------------------------------------------------


def _mismatched(good: dict[str, bytes], other: TestPki) -> None:
    good[KEY] = other.server_pair()[1]  # the key of another certificate


def _half_written_certificate(good: dict[str, bytes], other: TestPki) -> None:
    good[CERT] = good[CERT][: len(good[CERT]) // 2]


def _key_not_pem(good: dict[str, bytes], other: TestPki) -> None:
    good[KEY] = b"not a key\n"


def _empty_client_ca(good: dict[str, bytes], other: TestPki) -> None:
    good[CA] = b""


BROKEN = {
    "key-of-another-certificate": (_mismatched, "is not the one of the certificate"),
    "half-written-certificate": (_half_written_certificate, "certificate file holds no PEM"),
    "key-not-pem": (_key_not_pem, "holds no unencrypted PEM private key"),
    "client-ca-empty": (_empty_client_ca, "client CA file holds no PEM"),
    "client-ca-missing": (None, "client CA file cannot be read (FileNotFoundError)"),
}


@pytest.mark.parametrize("case", BROKEN.values(), ids=BROKEN.keys())
async def test_a_broken_set_is_refused_and_the_last_good_one_stays_until_it_is_fixed(
    tmp_path: Path, first: TestPki, second: TestPki, clock: FrozenClock, case: Any
) -> None:
    breaks, error = case
    files = ServerFiles(tmp_path / "tls", "replace")
    first_set, first_cert = tls_set(first, client_ca=first)
    files.write(first_set)
    client = first.client(PORTAL)
    settings = embedded_settings(tmp_path / "data", **files.settings())
    async with run_server(settings, clock=clock) as server:
        good, good_cert = tls_set(first, client_ca=first)
        broken = dict(good)
        with capture_logs() as logs:
            if breaks is None:
                files.write({CERT: good[CERT], KEY: good[KEY]})
                files.path(CA).unlink()
            else:
                breaks(broken, second)
                files.write(broken)
            # Serving goes on with the last good set, connection after connection.
            assert await presented(server, client) == fingerprint(first_cert)
            assert await presented(server, client) == fingerprint(first_cert)
            assert await health_check(server.target, first, client) == grpc.StatusCode.OK
        refused = [e for e in logs if e["event"] == "tls_files_refused"]
        assert len(refused) == 1, logs  # once per change of the files, not per handshake
        assert error in refused[0]["error"]
        assert refused[0]["kept_fingerprint"] == fingerprint(first_cert)
        assert refused[0]["log_level"] == "error"
        assert not [e for e in logs if e["event"] == "tls_files_loaded"]
        assert not _pem_in(logs)

        files.write(good)  # fixed: the next connection gets it
        assert await presented(server, client) == fingerprint(good_cert)
        assert await health_check(server.target, first, client) == grpc.StatusCode.OK


async def test_a_set_that_cannot_be_used_refuses_the_start(
    tmp_path: Path, first: TestPki, second: TestPki, clock: FrozenClock
) -> None:
    files = ServerFiles(tmp_path / "tls", "replace")
    broken, _ = tls_set(first, client_ca=first)
    _mismatched(broken, second)
    files.write(broken)
    settings = embedded_settings(tmp_path / "data", **files.settings())
    with pytest.raises(TlsFilesInvalid, match="is not the one of the certificate"):
        async with run_server(settings, clock=clock):
            pass
    # The CLI says so in one line, exit code 2 (configuration), without key material.
    env = cli_env(
        tmp_path / "data",
        listen_address=f"127.0.0.1:{free_port()}",
        **{name: str(value) for name, value in files.settings().items()},
    )
    done = run_cli(["serve"], env, tmp_path)
    assert done.returncode == 2, done.stderr
    assert "cannot start: the private key is not the one of the certificate" in done.stderr
    assert "BEGIN" not in done.stderr + done.stdout


# --- the client CA --------------------------------------------------------------------------


async def test_a_new_client_ca_admits_its_clients_with_their_identity_and_not_the_old_ones(
    server_settings: Settings, tmp_path: Path, first: TestPki, second: TestPki, clock: FrozenClock
) -> None:
    files = ServerFiles(tmp_path / "tls", "replace")
    first_set, _ = tls_set(first, client_ca=first)
    files.write(first_set)
    policy = tmp_path / "callers.toml"
    policy.write_text(POLICY)
    settings = server_settings.model_copy(update=files.settings() | {"caller_policy_file": policy})
    old_client, new_client = first.client(PORTAL), second.client(PORTAL)
    async with run_server(settings, clock=clock) as server:
        before = mtls_channel(server.target, first, old_client)
        async with before:
            await MemberServiceStub(before).SignUp(sign_up_request(), timeout=10)
            assert await health_check(server.target, first, new_client) == (
                grpc.StatusCode.UNAVAILABLE
            )

            files.write({CA: second.ca_pem})
            # New connections: the new CA's clients are in, under their SPIFFE ID...
            async with mtls_channel(server.target, first, new_client) as ch:
                assert (await MemberServiceStub(ch).SignUp(sign_up_request(), timeout=10)).member_id
            stranger = second.client(STRANGER)
            async with mtls_channel(server.target, first, stranger) as ch:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await MemberServiceStub(ch).SignUp(sign_up_request(), timeout=10)
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert dict(error_info(caught.value).metadata)["identity"] == STRANGER
            # ... and the old CA's are not.
            assert await health_check(server.target, first, old_client) == (
                grpc.StatusCode.UNAVAILABLE
            )
            # The connection made before the change was accepted then, and stays.
            await MemberServiceStub(before).SignUp(sign_up_request(), timeout=10)


# --- the real process ---------------------------------------------------------------------


@contextlib.contextmanager
def serve_process(env: dict[str, str], tmp_path: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(env, tmp_path, tmp_path / "serve.log")
    try:
        yield server
    finally:
        server.close()


def test_serve_reloads_a_swapped_secret_volume(
    tmp_path: Path, first: TestPki, second: TestPki
) -> None:
    files = ServerFiles(tmp_path / "tls", "secret-volume")
    first_set, first_cert = tls_set(first, client_ca=first)
    files.write(first_set)
    client = first.client(PORTAL)
    env = cli_env(
        tmp_path / "data",
        listen_address=f"127.0.0.1:{free_port()}",
        log_format="json",
        **{name: str(value) for name, value in files.settings().items()},
    )
    with serve_process(env, tmp_path) as server:
        server.wait_serving(
            grpc.ssl_channel_credentials(first.ca_pem, client.key, client.cert)
        ).close()
        assert fingerprint(presented_certificate(server.port, client)) == fingerprint(first_cert)

        second_set, second_cert = tls_set(second, client_ca=second)
        files.write(second_set)
        new_client = second.client(PORTAL)
        assert fingerprint(presented_certificate(server.port, new_client)) == fingerprint(
            second_cert
        )
        # Over gRPC: the new CA on both sides.
        server.wait_serving(
            grpc.ssl_channel_credentials(second.ca_pem, new_client.key, new_client.cert)
        ).close()
        assert server.terminate()[0] == 0, server.log_text()
        loaded = [e for e in server.events() if e.get("event") == "tls_files_loaded"]
        assert [e["reloaded"] for e in loaded] == [False, True]
        assert loaded[1]["fingerprint"] == fingerprint(second_cert)
        assert "BEGIN" not in server.log_text()
