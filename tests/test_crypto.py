"""The vault's crypto primitives: known-answer vectors, one test per malformed input,
key handles that keep their secrets, blind indexes and the DEK cache.

The vectors in ``tests/vectors`` were computed by ``tests/vectors/generate_vectors.py``
with ``cryptography``'s AESGCM and the byte layout documented in ``vault._hazmat``,
not with the vault's own code: they pin the documented format.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import json
import pickle
import struct
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from vault import _hazmat
from vault._hazmat import IndexKey, SecretKey
from vault.cache import DekCache
from vault.errors import DecryptionError

VECTORS = Path(__file__).parent / "vectors"
OPAQUE_MESSAGE = "data could not be decrypted"

MEMBER = "0d3c9b1e-5f4a-4e2b-9c8d-7a6b5c4d3e2f"
OTHER_MEMBER = "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"
KEY_BYTES = bytes(range(32))
KEK_BYTES = bytes(range(100, 132))
DEK_CONTEXT = f"dek|{MEMBER}|1".encode()


def _load(name: str) -> list[dict[str, Any]]:
    vectors: list[dict[str, Any]] = json.loads((VECTORS / name).read_text())
    assert vectors, f"{name} holds no vectors"
    return vectors


FIELD_VECTORS = _load("field_v1.json")
WRAP_VECTORS = _load("wrap_v1.json")


# --- known answers ---------------------------------------------------------------


@pytest.mark.parametrize("vector", FIELD_VECTORS, ids=lambda v: v["description"])
def test_seal_field_matches_vector(vector: dict[str, Any]) -> None:
    key = SecretKey(vector["key_id"], bytes.fromhex(vector["key"]))
    sealed = _hazmat.seal_field(
        key,
        vector["member_id"],
        vector["field"],
        bytes.fromhex(vector["plaintext"]),
        nonce=bytes.fromhex(vector["nonce"]),
    )
    assert sealed.hex() == vector["ciphertext"]


@pytest.mark.parametrize("vector", FIELD_VECTORS, ids=lambda v: v["description"])
def test_open_field_matches_vector(vector: dict[str, Any]) -> None:
    key = SecretKey(vector["key_id"], bytes.fromhex(vector["key"]))
    opened = _hazmat.open_field(
        key, vector["member_id"], vector["field"], bytes.fromhex(vector["ciphertext"])
    )
    assert opened == bytes.fromhex(vector["plaintext"])


@pytest.mark.parametrize("vector", WRAP_VECTORS, ids=lambda v: v["description"])
def test_wrap_key_matches_vector(vector: dict[str, Any]) -> None:
    kek = SecretKey(vector["kek_version"], bytes.fromhex(vector["kek"]))
    wrapped = _hazmat.wrap_key(
        kek,
        bytes.fromhex(vector["material"]),
        bytes.fromhex(vector["context"]),
        nonce=bytes.fromhex(vector["nonce"]),
    )
    assert wrapped.hex() == vector["wrapped"]


@pytest.mark.parametrize("vector", WRAP_VECTORS, ids=lambda v: v["description"])
def test_unwrap_key_matches_vector(vector: dict[str, Any]) -> None:
    kek = SecretKey(vector["kek_version"], bytes.fromhex(vector["kek"]))
    wrapped = bytes.fromhex(vector["wrapped"])
    assert _hazmat.unwrap_key(kek, wrapped, bytes.fromhex(vector["context"])) == bytes.fromhex(
        vector["material"]
    )
    assert _hazmat.wrapped_key_version(wrapped) == vector["kek_version"]


def test_random_nonces_differ_and_round_trip() -> None:
    key = SecretKey(1, KEY_BYTES)
    first = _hazmat.seal_field(key, MEMBER, "name", b"same")
    second = _hazmat.seal_field(key, MEMBER, "name", b"same")
    assert first != second
    assert _hazmat.open_field(key, MEMBER, "name", first) == b"same"
    assert _hazmat.open_field(key, MEMBER, "name", second) == b"same"


def test_nonce_of_wrong_length_is_a_caller_mistake() -> None:
    with pytest.raises(ValueError):
        _hazmat.seal_field(SecretKey(1, KEY_BYTES), MEMBER, "name", b"x", nonce=b"\0" * 8)


def test_key_of_wrong_length_is_a_caller_mistake() -> None:
    with pytest.raises(ValueError):
        SecretKey(1, KEY_BYTES[:16])


# --- malformed input: one opaque error for every way -----------------------------


def _field_key() -> SecretKey:
    return SecretKey(1, KEY_BYTES)


def _sealed(plaintext: bytes = b"alice@example.com") -> bytes:
    return _hazmat.seal_field(_field_key(), MEMBER, "email", plaintext, nonce=b"\x07" * 12)


def _flip(blob: bytes, index: int) -> bytes:
    changed = bytearray(blob)
    changed[index] ^= 0x01
    return bytes(changed)


def _assert_opaque(blob: bytes, member_id: str = MEMBER, field: str = "email") -> None:
    with pytest.raises(DecryptionError) as caught:
        _hazmat.open_field(_field_key(), member_id, field, blob)
    assert type(caught.value) is DecryptionError
    assert str(caught.value) == OPAQUE_MESSAGE
    # The error chains nothing a traceback could print (no InvalidTag, no struct.error).
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__ or caught.value.__context__ is None


HEADER = 5
NONCE_END = HEADER + 12


def test_the_unmodified_blob_opens() -> None:
    # The control for every test below: the only change is the one they make.
    assert _hazmat.open_field(_field_key(), MEMBER, "email", _sealed()) == b"alice@example.com"


def test_empty() -> None:
    _assert_opaque(b"")


def test_truncated_header() -> None:
    _assert_opaque(_sealed()[:3])


def test_header_only() -> None:
    _assert_opaque(_sealed()[:HEADER])


def test_truncated_nonce() -> None:
    _assert_opaque(_sealed()[: HEADER + 6])


def test_truncated_tag() -> None:
    _assert_opaque(_sealed()[:-1])


def test_truncated_tag_below_minimum_length() -> None:
    blob = _sealed(b"")
    assert len(blob) == HEADER + 12 + 16
    _assert_opaque(blob[:-4])


def test_wrong_format_byte() -> None:
    _assert_opaque(b"\x02" + _sealed()[1:])


def test_format_byte_zero() -> None:
    _assert_opaque(b"\x00" + _sealed()[1:])


def test_wrong_key_id_in_header() -> None:
    blob = _sealed()
    _assert_opaque(blob[:1] + struct.pack(">I", 2) + blob[HEADER:])


def test_sealed_under_a_key_with_another_id() -> None:
    # Same material, another id: the header names a key this one is not.
    blob = _hazmat.seal_field(SecretKey(9, KEY_BYTES), MEMBER, "email", b"x")
    _assert_opaque(blob)


def test_sealed_under_other_key_material() -> None:
    blob = _hazmat.seal_field(SecretKey(1, KEK_BYTES), MEMBER, "email", b"x")
    _assert_opaque(blob)


def test_flipped_bit_in_nonce() -> None:
    _assert_opaque(_flip(_sealed(), HEADER + 3))


def test_flipped_bit_in_ciphertext() -> None:
    _assert_opaque(_flip(_sealed(), NONCE_END + 2))


def test_flipped_bit_in_tag() -> None:
    _assert_opaque(_flip(_sealed(), -1))


def test_appended_byte() -> None:
    _assert_opaque(_sealed() + b"\x00")


def test_other_member_id() -> None:
    _assert_opaque(_sealed(), member_id=OTHER_MEMBER)


def test_other_field_name() -> None:
    _assert_opaque(_sealed(), field="name")


def test_length_prefixes_keep_member_and_field_apart() -> None:
    # Without length prefixes ("ab", "c") and ("a", "bc") would share an AAD.
    blob = _hazmat.seal_field(_field_key(), "ab", "c", b"x")
    _assert_opaque(blob, member_id="a", field="bc")


def _wrapped(kek: SecretKey | None = None) -> bytes:
    return _hazmat.wrap_key(kek or SecretKey(1, KEK_BYTES), KEY_BYTES, DEK_CONTEXT)


def _assert_unwrap_opaque(kek: SecretKey, wrapped: bytes, context: bytes = DEK_CONTEXT) -> None:
    with pytest.raises(DecryptionError) as caught:
        _hazmat.unwrap_key(kek, wrapped, context)
    assert type(caught.value) is DecryptionError
    assert str(caught.value) == OPAQUE_MESSAGE


def test_the_unmodified_wrapped_key_unwraps() -> None:
    assert _hazmat.unwrap_key(SecretKey(1, KEK_BYTES), _wrapped(), DEK_CONTEXT) == KEY_BYTES


def test_wrapped_key_with_other_context() -> None:
    _assert_unwrap_opaque(SecretKey(1, KEK_BYTES), _wrapped(), f"dek|{OTHER_MEMBER}|1".encode())


def test_wrapped_key_with_other_dek_id_in_context() -> None:
    _assert_unwrap_opaque(SecretKey(1, KEK_BYTES), _wrapped(), f"dek|{MEMBER}|2".encode())


def test_wrapped_key_under_another_kek_version() -> None:
    wrapped = _wrapped(SecretKey(1, KEK_BYTES))
    _assert_unwrap_opaque(SecretKey(2, bytes(reversed(KEK_BYTES))), wrapped)


def test_wrapped_key_with_header_rewritten_to_another_version() -> None:
    # Same KEK material under version 2: the header is authenticated, so relabelling fails.
    wrapped = _wrapped(SecretKey(1, KEK_BYTES))
    relabelled = wrapped[:1] + struct.pack(">I", 2) + wrapped[HEADER:]
    _assert_unwrap_opaque(SecretKey(2, KEK_BYTES), relabelled)


def test_field_ciphertext_is_not_a_wrapped_key() -> None:
    # Domain separation of the AAD: "pv.field" and "pv.wrap" never collide.
    kek = SecretKey(1, KEK_BYTES)
    as_field = _hazmat.seal_field(kek, "", "", KEY_BYTES)
    _assert_unwrap_opaque(kek, as_field, b"")


def test_wrapped_short_material_is_refused() -> None:
    # A validly sealed blob that does not hold a 32-byte key is no key.
    kek = SecretKey(1, KEK_BYTES)
    header = b"\x01" + struct.pack(">I", 1)
    nonce = b"\x01" * 12
    aad = b"pv.wrap" + header + struct.pack(">H", len(DEK_CONTEXT)) + DEK_CONTEXT
    blob = header + nonce + AESGCM(KEK_BYTES).encrypt(nonce, b"short", aad)
    _assert_unwrap_opaque(kek, blob)


def test_wrapped_key_version_of_malformed_blobs() -> None:
    for blob in (b"", _wrapped()[:10], b"\x02" + _wrapped()[1:]):
        with pytest.raises(DecryptionError) as caught:
            _hazmat.wrapped_key_version(blob)
        assert str(caught.value) == OPAQUE_MESSAGE


# --- key handles -------------------------------------------------------------------


def _secret_forms(material: bytes) -> list[str]:
    return [
        material.hex(),
        material.hex().upper(),
        base64.b64encode(material).decode(),
        base64.urlsafe_b64encode(material).decode(),
        repr(material),
        str(list(material)),
        material.decode("latin-1"),
    ]


@pytest.mark.parametrize("handle_type", [SecretKey, IndexKey])
def test_repr_shows_only_the_id(handle_type: type[SecretKey] | type[IndexKey]) -> None:
    material = bytes(range(200, 232))
    handle = handle_type(42, material)
    for text in (repr(handle), str(handle), f"{handle!r:>80}", repr([handle])):
        assert "42" in text
        for form in _secret_forms(material):
            assert form not in text
    assert repr(handle) == f"<{handle_type.__name__} id=42>"


@pytest.mark.parametrize("handle_type", [SecretKey, IndexKey])
def test_handles_cannot_be_pickled(handle_type: type[SecretKey] | type[IndexKey]) -> None:
    handle = handle_type(1, KEY_BYTES)
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        with pytest.raises(TypeError):
            pickle.dumps(handle, protocol=protocol)
    with pytest.raises(TypeError):
        pickle.dumps({"nested": [handle]})


@pytest.mark.parametrize("handle_type", [SecretKey, IndexKey])
def test_handles_cannot_be_copied(handle_type: type[SecretKey] | type[IndexKey]) -> None:
    handle = handle_type(1, KEY_BYTES)
    with pytest.raises(TypeError):
        copy.copy(handle)
    with pytest.raises(TypeError):
        copy.deepcopy(handle)
    with pytest.raises(TypeError):
        copy.deepcopy({"nested": handle})


def test_handles_have_no_instance_dict() -> None:
    # __slots__ only: nothing like vars(key) can dump the material.
    for handle in (SecretKey(1, KEY_BYTES), IndexKey(1, KEY_BYTES)):
        assert not hasattr(handle, "__dict__")


# --- blind indexes -----------------------------------------------------------------


def test_blind_index_known_answer() -> None:
    # HMAC-SHA256(key, len16(domain) | domain | value), computed here independently.
    key = bytes(range(32))
    expected = hmac.new(key, b"\x00\x05email" + b"alice@example.com", hashlib.sha256).digest()
    assert _hazmat.blind_index(IndexKey(1, key), "email", "alice@example.com") == expected


def test_blind_index_is_deterministic() -> None:
    key = IndexKey(1, KEY_BYTES)
    first = _hazmat.blind_index(key, "login_id", "alice")
    assert first == _hazmat.blind_index(IndexKey(1, KEY_BYTES), "login_id", "alice")
    assert len(first) == 32


def test_blind_index_is_domain_separated() -> None:
    key = IndexKey(1, KEY_BYTES)
    value = "alice@example.com"
    assert _hazmat.blind_index(key, "login_id", value) != _hazmat.blind_index(key, "email", value)
    # The length prefix keeps ("a", "bc") and ("ab", "c") apart.
    assert _hazmat.blind_index(key, "a", "bc") != _hazmat.blind_index(key, "ab", "c")


def test_blind_index_depends_on_the_key() -> None:
    value = "alice"
    assert _hazmat.blind_index(IndexKey(1, KEY_BYTES), "login_id", value) != _hazmat.blind_index(
        IndexKey(1, KEK_BYTES), "login_id", value
    )


def test_blind_index_distinguishes_values() -> None:
    key = IndexKey(1, KEY_BYTES)
    assert _hazmat.blind_index(key, "login_id", "alice") != _hazmat.blind_index(
        key, "login_id", "alicf"
    )


# --- the DEK cache -------------------------------------------------------------------


class FakeMonotonic:
    """An injected monotonic clock the test advances by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _dek(dek_id: int = 1) -> SecretKey:
    return SecretKey(dek_id, KEY_BYTES)


def test_cache_returns_what_was_put() -> None:
    cache = DekCache(max_size=4, ttl=60)
    key = _dek()
    cache.put(MEMBER, key)
    assert cache.get(MEMBER, 1) is key
    assert cache.get(OTHER_MEMBER, 1) is None


def test_cache_is_bounded_and_drops_the_least_recently_used() -> None:
    cache = DekCache(max_size=2, ttl=60)
    keys = {m: _dek() for m in ("m1", "m2", "m3")}
    cache.put("m1", keys["m1"])
    cache.put("m2", keys["m2"])
    assert cache.get("m1", 1) is keys["m1"]  # m1 is now the most recently used
    cache.put("m3", keys["m3"])
    assert len(cache) == 2
    assert cache.get("m2", 1) is None
    assert cache.get("m1", 1) is keys["m1"]
    assert cache.get("m3", 1) is keys["m3"]


def test_cache_of_size_zero_holds_nothing() -> None:
    cache = DekCache(max_size=0, ttl=60)
    cache.put(MEMBER, _dek())
    assert len(cache) == 0
    assert cache.get(MEMBER, 1) is None


def test_cache_entries_expire_after_ttl() -> None:
    clock = FakeMonotonic()
    cache = DekCache(max_size=4, ttl=30, monotonic=clock)
    key = _dek()
    cache.put(MEMBER, key)
    clock.now += 29.9
    assert cache.get(MEMBER, 1) is key
    clock.now += 0.1  # exactly ttl after the put
    assert cache.get(MEMBER, 1) is None
    assert len(cache) == 0


def test_cache_get_does_not_extend_ttl() -> None:
    clock = FakeMonotonic()
    cache = DekCache(max_size=4, ttl=30, monotonic=clock)
    cache.put(MEMBER, _dek())
    for _ in range(3):
        clock.now += 10
        cache.get(MEMBER, 1)
    assert cache.get(MEMBER, 1) is None


def test_cache_evict_removes_the_member() -> None:
    cache = DekCache(max_size=4, ttl=60)
    cache.put(MEMBER, _dek())
    cache.put(OTHER_MEMBER, _dek())
    cache.evict(MEMBER)
    cache.evict("never-cached")  # evicting an absent member is no error
    assert cache.get(MEMBER, 1) is None
    assert cache.get(OTHER_MEMBER, 1) is not None


def test_cache_misses_on_dek_id_mismatch() -> None:
    cache = DekCache(max_size=4, ttl=60)
    cache.put(MEMBER, _dek(1))
    # The member's key was rotated to dek 2: the stale dek 1 must not be served.
    assert cache.get(MEMBER, 2) is None
    assert len(cache) == 0
    cache.put(MEMBER, _dek(2))
    assert cache.get(MEMBER, 2) is not None
    assert cache.get(MEMBER, 1) is None


def test_cache_clear() -> None:
    cache = DekCache(max_size=4, ttl=60)
    cache.put(MEMBER, _dek())
    cache.clear()
    assert len(cache) == 0


def test_cache_refuses_negative_settings() -> None:
    with pytest.raises(ValueError):
        DekCache(max_size=-1)
    with pytest.raises(ValueError):
        DekCache(ttl=-1)
