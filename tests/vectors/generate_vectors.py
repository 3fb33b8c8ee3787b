"""Regenerate field_v1.json and wrap_v1.json from the format in ``vault._hazmat``'s docstring.

Independent of the vault's code on purpose: it uses only ``cryptography``'s
AESGCM and the byte layout as documented, so the vectors check the documented
format rather than the implementation against itself.

    field ciphertext = 0x01 | dek_id (4, BE) | nonce (12) | AES-256-GCM(ciphertext | tag)
    field AAD        = "pv.field" | header | len16|member_id | len16|field name
    wrapped key      = 0x01 | kek_version (4, BE) | nonce (12) | AES-256-GCM(key | tag)
    wrap AAD         = "pv.wrap" | header | len16|context

Run: .venv/bin/python tests/vectors/generate_vectors.py
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

HERE = Path(__file__).parent


def _bytes(label: str, n: int) -> bytes:
    """Fixed, reproducible 'random' bytes (no RNG, so reruns give the same file)."""
    return hashlib.sha256(label.encode()).digest()[:n]


def _lp(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def _header(key_id: int) -> bytes:
    return bytes([0x01]) + struct.pack(">I", key_id)


def field_vector(
    label: str, key_id: int, member_id: str, field: str, plaintext: bytes
) -> dict[str, Any]:
    key, nonce = _bytes(f"{label}/key", 32), _bytes(f"{label}/nonce", 12)
    header = _header(key_id)
    aad = b"pv.field" + header + _lp(member_id.encode()) + _lp(field.encode())
    sealed = AESGCM(key).encrypt(nonce, plaintext, aad)
    return {
        "description": label,
        "key": key.hex(),
        "key_id": key_id,
        "nonce": nonce.hex(),
        "member_id": member_id,
        "field": field,
        "plaintext": plaintext.hex(),
        "ciphertext": (header + nonce + sealed).hex(),
    }


def wrap_vector(label: str, kek_version: int, context: bytes) -> dict[str, Any]:
    kek, nonce = _bytes(f"{label}/kek", 32), _bytes(f"{label}/nonce", 12)
    material = _bytes(f"{label}/material", 32)
    header = _header(kek_version)
    aad = b"pv.wrap" + header + _lp(context)
    sealed = AESGCM(kek).encrypt(nonce, material, aad)
    return {
        "description": label,
        "kek": kek.hex(),
        "kek_version": kek_version,
        "nonce": nonce.hex(),
        "context": context.hex(),
        "material": material.hex(),
        "wrapped": (header + nonce + sealed).hex(),
    }


MEMBER = "6f1c2a7e-3b9d-4c51-8e2f-0a1b2c3d4e5f"


def main() -> None:
    fields = [
        field_vector("ascii login id", 1, MEMBER, "login_id", b"alice.kim-01"),
        field_vector("empty plaintext", 1, MEMBER, "mobile_phone", b""),
        field_vector("korean name", 7, MEMBER, "name", "김하늘".encode()),
        field_vector("large dek id", 0x12345678, MEMBER, "email", b"alice@example.com"),
        field_vector("max dek id", 0xFFFFFFFF, MEMBER, "password_hash", b"$argon2id$v=19$x"),
        field_vector(
            "access entry field", 2, MEMBER, "access.action@1781524800000000", b"authenticate"
        ),
        field_vector("long plaintext", 3, MEMBER, "name", bytes(range(256)) * 3),
        field_vector("empty member and field", 1, "", "", b"edge"),
    ]
    wraps = [
        wrap_vector("member dek", 1, f"dek|{MEMBER}|1".encode()),
        wrap_vector("index key", 1, b"index-key|1"),
        wrap_vector("rotated kek", 42, f"dek|{MEMBER}|3".encode()),
        wrap_vector("empty context", 0xFFFFFFFF, b""),
    ]
    for name, vectors in (("field_v1.json", fields), ("wrap_v1.json", wraps)):
        (HERE / name).write_text(json.dumps(vectors, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
