"""DANGEROUS: raw AEAD, key wrapping and blind-index primitives.

Like ``cryptography.hazmat``: everything here is easy to misuse (a reused
nonce, a missing associated datum, a ciphertext moved to another row). Only the
vault's own modules import it; everyone else goes through ``vault.Vault``.

Ciphertext formats (all integers big-endian):

  field ciphertext  = 0x01 | dek_id (4) | nonce (12) | AES-256-GCM(ciphertext | tag)
  wrapped key       = 0x01 | kek_version (4) | nonce (12) | AES-256-GCM(key | tag)

The associated data binds the header, the owner and the purpose, each
length-prefixed so no two tuples encode alike:

  field AAD  = "pv.field" | header | len|member_id | len|field name
  wrap AAD   = "pv.wrap"  | header | len|context

so a ciphertext moved to another member, another column or another key version
fails to decrypt. Every failure raises the one opaque ``DecryptionError``.

Server-issued tokens (page tokens) are authenticated with a MAC key derived from
the blind-index key with HKDF-SHA256 under a purpose of their own, so no new key
material is stored and every replica derives the same key:

  mac key    = HKDF-SHA256(index key, salt none, info "pv.derive" | len|purpose)
  token tag  = HMAC-SHA256(mac key, data)[:16]
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import struct
from typing import NoReturn

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from vault.errors import DecryptionError

FORMAT_V1 = 1
KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
TOKEN_TAG_SIZE = 16  # HMAC-SHA256 truncated to 128 bits
_HEADER = struct.Struct(">BI")
_MIN_LEN = _HEADER.size + NONCE_SIZE + TAG_SIZE


class _KeyHandle:
    """Key material reached only through a handle (as Tink's KeysetHandle).

    ``repr`` shows the id alone; pickling and copying are refused, so key bytes
    cannot leak into logs, caches or tracebacks by accident.
    """

    __slots__ = ("key_id",)

    def __init__(self, key_id: int, material: bytes) -> None:
        if len(material) != KEY_SIZE:
            raise ValueError("keys are 32 bytes")
        self.key_id = key_id

    def __repr__(self) -> str:
        return f"<{type(self).__name__} id={self.key_id}>"

    def __reduce__(self) -> NoReturn:
        raise TypeError(f"{type(self).__name__} holds key material and cannot be pickled")

    def __copy__(self) -> NoReturn:
        raise TypeError(f"{type(self).__name__} holds key material and cannot be copied")

    def __deepcopy__(self, memo: object) -> NoReturn:
        self.__copy__()


class SecretKey(_KeyHandle):
    """An AES-256-GCM key (a KEK or a member's DEK)."""

    __slots__ = ("_aead",)

    def __init__(self, key_id: int, material: bytes) -> None:
        super().__init__(key_id, material)
        self._aead = AESGCM(material)


class IndexKey(_KeyHandle):
    """The HMAC-SHA256 key behind blind indexes."""

    __slots__ = ("_material",)

    def __init__(self, key_id: int, material: bytes) -> None:
        super().__init__(key_id, material)
        self._material = material


class MacKey(_KeyHandle):
    """An HMAC-SHA256 key that authenticates server-issued tokens (never stored:
    derived from the index key, see :func:`derive_mac_key`)."""

    __slots__ = ("_material",)

    def __init__(self, key_id: int, material: bytes) -> None:
        super().__init__(key_id, material)
        self._material = material


def new_key_material() -> bytes:
    return os.urandom(KEY_SIZE)


def _lp(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def _seal(key: SecretKey, header: bytes, aad: bytes, plaintext: bytes, nonce: bytes) -> bytes:
    if len(nonce) != NONCE_SIZE:
        raise ValueError("AES-GCM nonces are 12 bytes")
    return header + nonce + key._aead.encrypt(nonce, plaintext, aad)


def _open(key: SecretKey, blob: bytes, binding: bytes, expected_id: int, kind: str) -> bytes:
    # Every way a blob can be bad ends in the same DecryptionError.
    if len(blob) < _MIN_LEN:
        raise DecryptionError
    version, key_id = _HEADER.unpack_from(blob)
    if version != FORMAT_V1 or key_id != expected_id:
        raise DecryptionError
    header = blob[: _HEADER.size]
    nonce = blob[_HEADER.size : _HEADER.size + NONCE_SIZE]
    aad = _aad(kind, header, binding)
    try:
        return key._aead.decrypt(nonce, blob[_HEADER.size + NONCE_SIZE :], aad)
    except InvalidTag:
        raise DecryptionError from None


def _aad(kind: str, header: bytes, binding: bytes) -> bytes:
    return b"pv." + kind.encode() + header + binding


@functools.lru_cache(maxsize=256)
def _lp_name(name: str) -> bytes:
    # A field's name, length-prefixed: the same few names on every read (not data).
    return _lp(name.encode())


def _field_binding(member_id: str, field: str) -> bytes:
    return _lp(member_id.encode()) + _lp_name(field)


def seal_field(
    key: SecretKey, member_id: str, field: str, plaintext: bytes, *, nonce: bytes | None = None
) -> bytes:
    """Encrypt one field of one member. ``nonce`` is for test vectors only."""
    header = _HEADER.pack(FORMAT_V1, key.key_id)
    aad = _aad("field", header, _field_binding(member_id, field))
    return _seal(key, header, aad, plaintext, nonce or os.urandom(NONCE_SIZE))


def open_field(key: SecretKey, member_id: str, field: str, blob: bytes) -> bytes:
    return _open(key, blob, _field_binding(member_id, field), key.key_id, "field")


def wrap_associated_data(header: bytes, context: bytes) -> bytes:
    """The AAD a wrapped key binds; for providers that wrap inside an HSM."""
    return _aad("wrap", header, _lp(context))


def wrap_key(
    kek: SecretKey, material: bytes, context: bytes, *, nonce: bytes | None = None
) -> bytes:
    """Wrap a DEK or index key under a KEK; ``context`` names what is wrapped."""
    header = _HEADER.pack(FORMAT_V1, kek.key_id)
    aad = wrap_associated_data(header, context)
    return _seal(kek, header, aad, material, nonce or os.urandom(NONCE_SIZE))


def unwrap_key(kek: SecretKey, wrapped: bytes, context: bytes) -> bytes:
    material = _open(kek, wrapped, _lp(context), kek.key_id, "wrap")
    if len(material) != KEY_SIZE:
        raise DecryptionError
    return material


def wrapped_key_version(wrapped: bytes) -> int:
    """The KEK version named in a wrapped key's header (not authenticated until unwrapped)."""
    if len(wrapped) < _MIN_LEN:
        raise DecryptionError
    version, kek_version = _HEADER.unpack_from(wrapped)
    if version != FORMAT_V1:
        raise DecryptionError
    return int(kek_version)


def blind_index(key: IndexKey, domain: str, normalized_value: str) -> bytes:
    """HMAC-SHA256 over a domain-separated, already-normalized value."""
    return hmac.new(
        key._material, _lp(domain.encode()) + normalized_value.encode(), hashlib.sha256
    ).digest()


def derive_mac_key(key: IndexKey, purpose: str) -> MacKey:
    """A MAC key of its own for ``purpose`` (e.g. "page-token"), derived from the
    blind-index key: HKDF's extract step keys HMAC differently from blind_index, so
    no token tag can equal a blind index, and purposes are separated by ``info``."""
    hkdf = HKDF(
        algorithm=SHA256(), length=KEY_SIZE, salt=None, info=b"pv.derive" + _lp(purpose.encode())
    )
    return MacKey(key.key_id, hkdf.derive(key._material))


def keyed_digest(key: MacKey, data: bytes) -> bytes:
    """The full HMAC-SHA256 of ``data``: what is stored of a request or an IP (never
    a plain hash of it, which a dictionary would reverse)."""
    return hmac.new(key._material, data, hashlib.sha256).digest()


def token_tag(key: MacKey, data: bytes) -> bytes:
    """The tag a server-issued token carries over ``data`` (what it is bound to)."""
    return hmac.new(key._material, data, hashlib.sha256).digest()[:TOKEN_TAG_SIZE]


def token_tag_matches(key: MacKey, data: bytes, tag: bytes) -> bool:
    """Whether ``tag`` is the tag of ``data``, in time that does not depend on how
    much of it matches."""
    return hmac.compare_digest(token_tag(key, data), tag)
