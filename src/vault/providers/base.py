"""The key-provider Protocol: a KEK never leaves its provider.

The vault hands a provider key material to wrap and gets wrapped bytes back
(and the reverse). Where the KEKs live - a local file, an HSM, a cloud KMS - is
the provider's business. AWS KMS or Vault Transit fit the same shape.
"""

from __future__ import annotations

from typing import Protocol


class KeyProvider(Protocol):
    #: A short name for logs and status ("local", "pkcs11").
    name: str

    async def has_version(self, version: int) -> bool:
        """Whether material for this KEK version is available."""
        ...

    async def create_version(self, version: int) -> None:
        """Generate material for a new KEK version. Idempotent for an existing version."""
        ...

    async def wrap(self, version: int, material: bytes, context: bytes) -> bytes:
        """Wrap key material under a KEK version, binding ``context`` (what is wrapped)."""
        ...

    async def unwrap(self, version: int, wrapped: bytes, context: bytes) -> bytes:
        """Unwrap; every failure is :class:`vault.errors.DecryptionError`, a missing
        version :class:`vault.errors.KeyUnavailable`."""
        ...

    async def destroy_version(self, version: int) -> None:
        """Destroy a version's material, irreversibly. Idempotent. The vault calls
        this only after the store has refused nothing: no key is wrapped under it."""
        ...

    async def close(self) -> None: ...
