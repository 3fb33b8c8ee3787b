"""``privacy-vault health``: a gRPC health check (grpc.health.v1) for any orchestrator.

Which address: ``--address``, else the plaintext health-only listener
(``PRIVACY_VAULT_HEALTH_LISTEN_ADDRESS``) when set, else ``PRIVACY_VAULT_LISTEN_ADDRESS``;
a wildcard host (0.0.0.0, ::) means this host's loopback.

Transport to the API listener (``--address`` included) follows the server's settings:
plaintext, TLS when ``PRIVACY_VAULT_TLS_CERT_FILE`` is set, mTLS when
``PRIVACY_VAULT_TLS_CLIENT_CA_FILE`` is also set. Settings of the check itself:

- ``PRIVACY_VAULT_HEALTH_CA_FILE``: the CA that signed the server's certificate;
  default the client CA (one trust bundle signs both, as with SPIFFE), else the
  server's own certificate (self-signed);
- ``PRIVACY_VAULT_HEALTH_CLIENT_CERT_FILE`` and ``..._KEY_FILE``: the certificate
  presented under mTLS; default the server's own pair (it lies beside the probe);
- ``PRIVACY_VAULT_HEALTH_SERVER_NAME``: the name the server's certificate is checked
  against; default its first DNS name.

One line of output, never a secret. Exit codes: 0 SERVING; 1 NOT_SERVING, UNKNOWN or
a service the server does not know; 2 unreachable, or misconfigured.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from enum import IntEnum
from pathlib import Path
from typing import Annotated

import grpc
import typer
from cryptography import x509
from grpc_health.v1 import health_pb2
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.cli_common import load_settings
from service.config import ENV_PREFIX, Settings

HELP_EPILOG = (
    "Exit codes: 0 SERVING; 1 NOT_SERVING, UNKNOWN or an unknown service; "
    "2 unreachable or misconfigured."
)


class HealthExit(IntEnum):
    SERVING = 0
    NOT_SERVING = 1
    UNREACHABLE = 2


class HealthCheckSettings(BaseSettings):
    """The check's own settings (``PRIVACY_VAULT_HEALTH_*``); all optional."""

    model_config = SettingsConfigDict(env_prefix=f"{ENV_PREFIX}HEALTH_", extra="ignore")

    ca_file: Path | None = None
    client_cert_file: Path | None = None
    client_key_file: Path | None = None
    server_name: str | None = None


def local_target(address: str) -> str:
    """``address`` with a wildcard host replaced by loopback (where a probe connects)."""
    host, _, port = address.rpartition(":")
    if host in ("0.0.0.0", "", "*"):  # noqa: S104 - recognised, not bound
        host = "127.0.0.1"
    elif host in ("::", "[::]"):
        host = "[::1]"
    return f"{host}:{port}"


def _first_dns_name(cert_pem: bytes) -> str | None:
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return None
    names = san.value.get_values_for_type(x509.DNSName)
    return names[0] if names else None


def channel_for(
    settings: Settings, check: HealthCheckSettings, target: str, *, tls: bool
) -> grpc.Channel:
    """A channel to ``target``: plaintext, or (m)TLS as the server is configured."""
    if not tls or settings.tls_cert_file is None:
        return grpc.insecure_channel(target)
    server_cert = settings.tls_cert_file.read_bytes()
    ca_file = check.ca_file or settings.tls_client_ca_file
    roots = ca_file.read_bytes() if ca_file else server_cert
    key = chain = None
    if settings.tls_client_ca_file is not None:
        if (check.client_cert_file is None) != (check.client_key_file is None):
            raise ValueError("PRIVACY_VAULT_HEALTH_CLIENT_CERT_FILE and ..._KEY_FILE go together")
        cert_file = check.client_cert_file or settings.tls_cert_file
        key_file = check.client_key_file or settings.tls_key_file
        assert key_file is not None  # Settings pairs the TLS certificate with its key
        chain, key = cert_file.read_bytes(), key_file.read_bytes()
    credentials = grpc.ssl_channel_credentials(roots, key, chain)
    name = check.server_name or _first_dns_name(server_cert)
    options = [("grpc.ssl_target_name_override", name)] if name else []
    return grpc.secure_channel(target, credentials, options=options)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """grpc core logs a failed handshake on fd 2 (GRPC_VERBOSITY is read at import,
    too early to set here): the check prints one line, its own."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def check_health(channel: grpc.Channel, service: str, timeout: float) -> tuple[HealthExit, str]:
    """(exit code, what the server said or why it could not)."""
    # The typed stubs declare no methods on HealthStub: the method, by its path.
    check = channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    try:
        reply = check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    except grpc.RpcError as exc:
        code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
        if code == grpc.StatusCode.NOT_FOUND:  # the server does not know the service
            return HealthExit.NOT_SERVING, "SERVICE_UNKNOWN"
        # Only the code: a transport's details may name files or peers.
        return HealthExit.UNREACHABLE, f"unreachable ({code.name})"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
    return (HealthExit.SERVING if serving else HealthExit.NOT_SERVING), status


def health(
    address: Annotated[
        str | None,
        typer.Option(
            help="host:port to check (default: the health listener if set, else the listen "
            "address), with the listen address's TLS settings.",
            show_default=False,
        ),
    ] = None,
    service: Annotated[
        str, typer.Option(help="The service to ask about; '' is the whole server.")
    ] = "",
    timeout: Annotated[
        float, typer.Option(min=0.1, max=60.0, help="Seconds to wait for the answer.")
    ] = 3.0,
) -> None:
    """Check the server's gRPC health (grpc.health.v1) and exit 0 only when SERVING."""
    settings = load_settings()  # invalid: one line naming the settings, exit 2
    if address is not None:
        target, tls = address, True
    elif settings.health_listen_address is not None:
        target, tls = settings.health_listen_address, False
    else:
        target, tls = settings.listen_address, True
    target = local_target(target)
    try:
        check = HealthCheckSettings()
        channel = channel_for(settings, check, target, tls=tls)
    except (ValueError, OSError) as exc:  # pydantic's ValidationError is a ValueError
        # The kind only: a message could quote a path or a value.
        typer.echo(f"misconfigured: TLS settings or files of the check ({type(exc).__name__})")
        raise typer.Exit(HealthExit.UNREACHABLE) from None
    with channel, _quiet_stderr():
        code, said = check_health(channel, service, timeout)
    typer.echo(f"{said} {target}" + (f" service={service}" if service else ""))
    raise typer.Exit(code)
