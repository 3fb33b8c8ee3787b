"""The server's certificate, private key and client CA, read from their files and
reloaded when the files change, without a restart.

cert-manager, SPIRE and Kubernetes secret volumes rotate a certificate by replacing
its files: a secret volume swaps its ``..data`` symlink to a new directory, so every
file changes at once; other writers replace one file after the other. grpc core asks
:meth:`ServerCertificates.fetch` for the TLS configuration before each new handshake
(``grpc.dynamic_ssl_server_credentials``), on one of its own threads. It stats the
files (through symlinks), at most every ``check_every`` seconds, and reads them only
when one of them changed.

A new set is used only when all of it parses and the private key is the certificate's
(checked here with ``cryptography``: grpc would take a mismatched pair and fail every
handshake). Anything else, such as a half-written file, the old key beside the new
certificate, or a missing client CA, is refused with one log line saying why (never
what the files hold), and the last good set stays in force; the next handshake after
the files are right picks them up. Connections already open keep the certificate they
were made with. At start a set that cannot be used refuses the start.

One credentials object per listening port: grpc hands a new configuration to the
port whose handshake fetched it, so two ports sharing one would not both see it.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import structlog
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from service.errors import ServiceError

log = structlog.get_logger("service.server_certificates")

#: A file larger than this is refused unread (a CA bundle of every public root is
#: about 200 KiB).
MAX_FILE_BYTES = 1024 * 1024

# Per file: device, inode, size, mtime and ctime (ns), or None when it cannot be stat'ed.
_FileSignature = tuple[int, int, int, int, int] | None


class TlsFilesInvalid(ServiceError):
    """TLS files that cannot be used; the message says which file and why, never
    what it holds."""


@dataclass(frozen=True)
class TlsFiles:
    """Where the server's TLS material is: certificate chain, its private key, and
    the CA that client certificates must chain to (None: no client certificates)."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None

    @property
    def paths(self) -> tuple[Path, ...]:
        return (self.cert_file, self.key_file, *filter(None, (self.client_ca_file,)))


@dataclass(frozen=True, repr=False)
class _Loaded:
    """A checked set, as grpc takes it. The key bytes are inside grpc's configuration
    only; what is kept here besides is public."""

    configuration: grpc.ServerCertificateConfiguration
    #: SHA-256 over the three files' content: a touched but unchanged set is no reload.
    digest: bytes
    #: SHA-256 of the leaf certificate (what `openssl x509 -fingerprint -sha256` shows).
    fingerprint: str
    not_after: str
    client_ca_certificates: int

    def log_fields(self) -> dict[str, object]:
        return {
            "fingerprint": self.fingerprint,
            "not_after": self.not_after,
            "client_ca_certificates": self.client_ca_certificates,
        }


def _read(path: Path, what: str) -> bytes:
    try:
        with path.open("rb") as file:
            data = file.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise TlsFilesInvalid(f"the {what} cannot be read ({type(exc).__name__})") from None
    if len(data) > MAX_FILE_BYTES:
        raise TlsFilesInvalid(f"the {what} is larger than {MAX_FILE_BYTES} bytes")
    return data


def _certificates(pem: bytes, what: str) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError:  # no certificate in it, or one that does not parse
        raise TlsFilesInvalid(f"the {what} holds no PEM certificates that all parse") from None


def _public_key_der(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _load(files: TlsFiles) -> _Loaded:
    """Read and check the set: every PEM parses, the private key is the leaf
    certificate's, the client CA (if any) holds a certificate. TlsFilesInvalid if not."""
    chain_pem = _read(files.cert_file, "certificate file")
    key_pem = _read(files.key_file, "private key file")
    ca_pem = None if files.client_ca_file is None else _read(files.client_ca_file, "client CA file")
    leaf = _certificates(chain_pem, "certificate file")[0]
    try:
        # Unencrypted only: grpc takes no password.
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise TlsFilesInvalid(
            "the private key file holds no unencrypted PEM private key that parses"
        ) from None
    if _public_key_der(key.public_key()) != _public_key_der(leaf.public_key()):
        raise TlsFilesInvalid("the private key is not the one of the certificate")
    ca_count = 0 if ca_pem is None else len(_certificates(ca_pem, "client CA file"))
    digest = hashlib.sha256()
    for part in (chain_pem, key_pem, ca_pem or b""):
        digest.update(hashlib.sha256(part).digest())
    return _Loaded(
        configuration=grpc.ssl_server_certificate_configuration(
            [(key_pem, chain_pem)], root_certificates=ca_pem
        ),
        digest=digest.digest(),
        fingerprint=leaf.fingerprint(hashes.SHA256()).hex(),
        not_after=leaf.not_valid_after_utc.isoformat(),
        client_ca_certificates=ca_count,
    )


def _signature(path: Path) -> _FileSignature:
    try:
        st = os.stat(path)  # follows symlinks: a swapped ..data is a new inode
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class ServerCertificates:
    """The TLS material in force, and grpc's credentials that ask it at each handshake."""

    def __init__(self, files: TlsFiles, *, check_every: float = 1.0) -> None:
        self.files = files
        self._check_every = check_every
        self._next_check = time.monotonic() + check_every
        # Taken before the read: a change while reading shows at the next check.
        self._seen = self._signatures()
        self._loaded = _load(files)  # at start a set that cannot be used is fatal
        self._lock = threading.Lock()
        log.info("tls_files_loaded", reloaded=False, **self._loaded.log_fields())

    def __repr__(self) -> str:
        return f"<ServerCertificates fingerprint={self._loaded.fingerprint[:16]}>"

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._loaded.configuration,
            # None is grpc's documented "no change"; types-grpcio's stub omits it.
            self.fetch,  # type: ignore[arg-type]
            require_client_authentication=self.files.client_ca_file is not None,
        )

    def _signatures(self) -> tuple[_FileSignature, ...]:
        return tuple(_signature(path) for path in self.files.paths)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """A new configuration if the files changed into a good set, else None (grpc
        keeps the one in force). Called by grpc core before each handshake."""
        now = time.monotonic()
        # Several handshakes at once: one checks, the others go on with what is in force.
        if now < self._next_check or not self._lock.acquire(blocking=False):
            return None
        try:
            self._next_check = now + self._check_every
            return self._reload_if_changed()
        except Exception as exc:  # noqa: BLE001 - on grpc's thread: never break a handshake
            # Its type only: an exception's text (or traceback) may quote the files.
            log.error("tls_files_check_failed", error_type=type(exc).__name__)  # noqa: TRY400
            return None
        finally:
            self._lock.release()

    def _reload_if_changed(self) -> grpc.ServerCertificateConfiguration | None:
        signatures = self._signatures()
        if signatures == self._seen:
            return None
        self._seen = signatures  # refused or not, logged once per change of the files
        try:
            loaded = _load(self.files)
        except TlsFilesInvalid as exc:
            log.error(  # noqa: TRY400 - the traceback would add nothing
                "tls_files_refused",
                error=exc.message,
                files=[str(path) for path in self.files.paths],
                kept_fingerprint=self._loaded.fingerprint,
            )
            return None
        if loaded.digest == self._loaded.digest:
            return None  # touched or copied again, not changed
        self._loaded = loaded
        log.info("tls_files_loaded", reloaded=True, **loaded.log_fields())
        return loaded.configuration
