"""Certificates for tests and benchmarks, made on the spot with ``cryptography``: a
test CA, a server certificate for 127.0.0.1/localhost, and client certificates with
0, 1 or 2 URI SANs (SPIFFE IDs of any trust domain). Nothing is read from disk but
what is written here; bench/ imports this module too.

    pki = TestPki.create(tmp_path)
    settings = ...(tls_cert_file=pki.server_cert, tls_key_file=pki.server_key,
                   tls_client_ca_file=pki.ca_cert)
    async with pki.channel(target, "spiffe://example.org/ns/a/sa/b") as channel: ...
"""

from __future__ import annotations

import datetime
import ipaddress
import itertools
import os
import shutil
import socket
import ssl
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_VALID = datetime.timedelta(days=2)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


@dataclass(frozen=True)
class ClientCert:
    """A client's certificate and key, PEM."""

    cert: bytes
    key: bytes


@dataclass(frozen=True)
class TestPki:
    """A CA and a server certificate, as files (the server reads paths) and bytes."""

    directory: Path
    ca_key: ec.EllipticCurvePrivateKey
    ca: x509.Certificate

    __test__ = False  # not a test class, for pytest

    @classmethod
    def create(cls, directory: Path, name: str = "privacy-vault test CA") -> TestPki:
        directory.mkdir(parents=True, exist_ok=True)
        key = _key()
        now = datetime.datetime.now(datetime.UTC)
        ca = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + _VALID)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        pki = cls(directory, key, ca)
        pki.ca_cert.write_bytes(pki.ca_pem)
        cert, server_key = pki.server_pair()
        pki.server_cert.write_bytes(cert)
        pki.server_key.write_bytes(server_key)
        pki.server_key.chmod(0o600)
        return pki

    @property
    def ca_pem(self) -> bytes:
        return self.ca.public_bytes(serialization.Encoding.PEM)

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def server_cert(self) -> Path:
        return self.directory / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.directory / "server-key.pem"

    def production_settings(self, policy: Path) -> dict[str, str]:
        """What ``ENVIRONMENT=production`` needs to start, as CLI settings: this server
        certificate, this CA for client certificates, and the caller policy file."""
        return {
            "environment": "production",
            "tls_cert_file": str(self.server_cert),
            "tls_key_file": str(self.server_key),
            "tls_client_ca_file": str(self.ca_cert),
            "caller_policy_file": str(policy),
        }

    def _issue(
        self, common_name: str, sans: Sequence[x509.GeneralName], usage: x509.ObjectIdentifier
    ) -> tuple[bytes, bytes]:
        key = _key()
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + _VALID)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.ca_key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)

    def server_pair(self) -> tuple[bytes, bytes]:
        """A new server certificate (127.0.0.1 and localhost) and its key, PEM."""
        return self._issue(
            "localhost",
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
            ExtendedKeyUsageOID.SERVER_AUTH,
        )

    def client(self, *uris: str, common_name: str = "test client") -> ClientCert:
        """A client certificate naming ``uris`` in its URI SAN (none, one or several)."""
        sans = [x509.UniformResourceIdentifier(u) for u in uris]
        cert, key = self._issue(common_name, sans, ExtendedKeyUsageOID.CLIENT_AUTH)
        return ClientCert(cert, key)

    def credentials(self, client: ClientCert | None) -> grpc.ChannelCredentials:
        """Channel credentials trusting this CA, presenting ``client`` if given."""
        if client is None:
            return grpc.ssl_channel_credentials(self.ca_pem)
        return grpc.ssl_channel_credentials(self.ca_pem, client.key, client.cert)

    def channel(self, target: str, *uris: str) -> grpc.aio.Channel:
        """An aio channel to ``target`` (127.0.0.1:port) as a client naming ``uris``."""
        return grpc.aio.secure_channel(target, self.credentials(self.client(*uris)))


def presented_certificate(port: int, client: ClientCert | None = None) -> x509.Certificate:
    """The certificate the server on 127.0.0.1:``port`` presents to a new connection: a
    TLS handshake of its own (ALPN h2, as gRPC's), presenting ``client`` if given. It
    does not verify the server: the caller compares what came with what it expects.
    Blocking: from a test's event loop, run it in a thread."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    if client is not None:
        with tempfile.TemporaryDirectory() as directory:  # ssl loads a chain from files only
            cert, key = Path(directory, "client.pem"), Path(directory, "client-key.pem")
            cert.write_bytes(client.cert)
            key.write_bytes(client.key)
            context.load_cert_chain(cert, key)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


class SecretVolume:
    """A directory laid out like a Kubernetes secret volume, updated the way the kubelet
    does it (its AtomicWriter): each file is a symlink ``name -> ..data/name``, ``..data``
    a symlink to a directory of this version, and an update writes a new directory and
    swaps ``..data`` to it in one rename, so every file changes at once."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._versions = itertools.count(1)

    def path(self, name: str) -> Path:
        return self.directory / name

    def write(self, files: Mapping[str, bytes]) -> None:
        version = self.directory / f"..version_{next(self._versions)}"
        version.mkdir()
        for name, content in files.items():
            (version / name).write_bytes(content)
        data = self.directory / "..data"
        previous = data.resolve() if data.is_symlink() else None
        staged = self.directory / "..data_tmp"
        staged.symlink_to(version.name)
        os.replace(staged, data)
        for name in files:
            if not self.path(name).is_symlink():
                self.path(name).symlink_to(f"..data/{name}")
        if previous is not None:
            shutil.rmtree(previous)
