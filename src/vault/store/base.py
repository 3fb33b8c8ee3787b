"""The storage contract: what the vault asks of a database, and nothing more.

A store sees only ciphertexts, HMACs, wrapped keys and timestamps; it never
encrypts, decrypts or sees a plaintext. Each backend (``sqlite``, ``postgres``)
is a package with one module per storage domain. Each domain has one narrow
Protocol in :mod:`vault.store.contracts` (``contracts/<domain>.py``) and one
contract test module run on both backends (``tests/test_store_<domain>.py``);
:class:`Store` is their sum, the whole vault database.

Conventions every backend keeps:
- datetimes in and out are timezone-aware UTC;
- member ids are canonical lowercase UUID strings;
- every method that changes more than one row does it in one transaction, so
  nothing is ever half-written;
- a unique violation on a blind index raises :class:`vault.errors.AlreadyExists`
  naming the field (``"login_id"`` or ``"email"``), never the value;
- an unreachable database raises :class:`vault.errors.StorageUnavailable`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

from vault.store.contracts.access_log import AccessLogStore
from vault.store.contracts.consents import ConsentStore
from vault.store.contracts.corrections import CorrectionStore, StatisticsStore
from vault.store.contracts.database import Database
from vault.store.contracts.destruction import DestructionStore
from vault.store.contracts.disclosures import DisclosureStore
from vault.store.contracts.idempotency import IdempotencyStore
from vault.store.contracts.inactivity import InactivityStore
from vault.store.contracts.keys import KeyStore
from vault.store.contracts.lease import LeaseStore
from vault.store.contracts.login_failures import LoginFailureStore
from vault.store.contracts.members import MemberStore
from vault.store.contracts.outbox import OutboxStore
from vault.store.contracts.passwords import PasswordStore
from vault.store.contracts.recovery import RecoveryStore
from vault.store.contracts.retention import RetentionStore
from vault.store.contracts.sessions import NewSession, SessionRow, SessionStore
from vault.store.rows import (
    CORRECTABLE_FIELDS,
    ENCRYPTED_FIELDS,
    INDEXED_FIELDS,
    RECORDED_BY_MEMBER,
    RETAINED_FIELDS,
    AccessEntryRow,
    ConsentEventRow,
    ConsentRow,
    CorrectionRow,
    DestructionRecord,
    DisclosureRow,
    IndexedField,
    IndexKeyRow,
    KekState,
    KekUsage,
    KekVersionRow,
    KeyEvent,
    MemberKeyRow,
    MemberRow,
    NewAccessEntry,
    NewConsent,
    NewDisclosure,
    NewPasswordReset,
    OutboxMessage,
    PolicyVersionRow,
    RecipientRow,
    RecoveryMailOutcome,
    ResealedCorrection,
    RetainedMember,
    RetainedSummary,
    RetentionCheck,
    RetentionEvent,
    RewrapUpdate,
    StatisticsCounts,
)

__all__ = [
    "CORRECTABLE_FIELDS",
    "ENCRYPTED_FIELDS",
    "INDEXED_FIELDS",
    "RECORDED_BY_MEMBER",
    "RETAINED_FIELDS",
    "AccessEntryRow",
    "AccessLogStore",
    "ConsentEventRow",
    "ConsentRow",
    "ConsentStore",
    "CorrectionRow",
    "CorrectionStore",
    "Database",
    "DestructionRecord",
    "DestructionStore",
    "DisclosureRow",
    "DisclosureStore",
    "IdempotencyStore",
    "InactivityStore",
    "IndexKeyRow",
    "IndexedField",
    "KekState",
    "KekUsage",
    "KekVersionRow",
    "KeyEvent",
    "KeyStore",
    "LeaseStore",
    "LoginFailureStore",
    "MemberKeyRow",
    "MemberRow",
    "MemberStore",
    "NewAccessEntry",
    "NewConsent",
    "NewDisclosure",
    "NewPasswordReset",
    "NewSession",
    "OutboxMessage",
    "OutboxStore",
    "PasswordStore",
    "PolicyVersionRow",
    "RecipientRow",
    "RecoveryMailOutcome",
    "RecoveryStore",
    "ResealedCorrection",
    "RetainedMember",
    "RetainedSummary",
    "RetentionCheck",
    "RetentionEvent",
    "RetentionStore",
    "RewrapUpdate",
    "SessionRow",
    "SessionStore",
    "StatisticsCounts",
    "StatisticsStore",
    "Store",
    "whole_access_log",
    "whole_consent_history",
    "whole_disclosure_ledger",
]


class Store(
    Database,
    KeyStore,
    MemberStore,
    ConsentStore,
    DisclosureStore,
    PasswordStore,
    AccessLogStore,
    DestructionStore,
    LeaseStore,
    InactivityStore,
    RecoveryStore,
    OutboxStore,
    SessionStore,
    LoginFailureStore,
    IdempotencyStore,
    CorrectionStore,
    StatisticsStore,
    Protocol,
):
    """One database holding the vault: every domain's Protocol. See the module
    docstring for conventions. A consumer that needs only some domains should ask
    for those Protocols instead."""


async def whole_access_log(
    store: AccessLogStore, member_id: str, page: int = 1000
) -> list[AccessEntryRow]:
    """Every access-log entry of the member, newest first, read page by page."""
    entries: list[AccessEntryRow] = []
    cursor: tuple[datetime, int] | None = None
    while True:
        rows = await store.list_access(member_id, page, cursor)
        entries.extend(rows)
        if len(rows) < page:
            return entries
        cursor = (rows[-1].at, rows[-1].entry_id)


async def whole_consent_history(
    store: ConsentStore, member_id: str, page: int = 1000
) -> list[ConsentEventRow]:
    """Every consent event of the member, oldest first, read page by page."""
    events: list[ConsentEventRow] = []
    before: int | None = None
    while True:
        rows = await store.list_consent_events(member_id, page, before)
        events.extend(rows)
        if len(rows) < page:
            return events[::-1]
        before = rows[-1].event_id


async def whole_disclosure_ledger(
    store: DisclosureStore, member_id: str, page: int = 1000
) -> list[DisclosureRow]:
    """Every disclosure of the member, oldest first, read page by page."""
    entries: list[DisclosureRow] = []
    before: int | None = None
    while True:
        rows = await store.list_disclosures(member_id, page, before)
        entries.extend(rows)
        if len(rows) < page:
            return entries[::-1]
        before = rows[-1].disclosure_id
