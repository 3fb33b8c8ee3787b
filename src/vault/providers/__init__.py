"""Key providers hold the key-encryption keys (KEKs) and wrap data keys under them."""

from vault.providers.base import KeyProvider
from vault.providers.local import LocalKeyProvider

__all__ = ["KeyProvider", "LocalKeyProvider"]
