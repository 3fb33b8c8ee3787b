"""privacy-vault's vault: envelope-encrypted member data with crypto-shredding.

The safe surface is :class:`Vault` (opened with :func:`open_vault`); raw crypto
lives in the private ``vault._hazmat``. Nothing here knows of gRPC.
"""

from vault.bootstrap import KeyProviderSettings, migrate_database, open_vault
from vault.clock import Clock, FrozenClock, SystemClock
from vault.facade import (
    AccessEntry,
    AccessPage,
    MemberChanges,
    MemberView,
    NewMember,
    Vault,
    VaultSettings,
    WithdrawalOutcome,
)
from vault.passwords import CHEAPEST, OWASP, Argon2Profile, PasswordHasher
from vault.policy import ConsentChoice, Purpose
from vault.retention import RetentionRule
from vault.sessions import Login

__all__ = [
    "CHEAPEST",
    "OWASP",
    "AccessEntry",
    "AccessPage",
    "Argon2Profile",
    "Clock",
    "ConsentChoice",
    "FrozenClock",
    "KeyProviderSettings",
    "Login",
    "MemberChanges",
    "MemberView",
    "NewMember",
    "PasswordHasher",
    "Purpose",
    "RetentionRule",
    "SystemClock",
    "Vault",
    "VaultSettings",
    "WithdrawalOutcome",
    "migrate_database",
    "open_vault",
]
