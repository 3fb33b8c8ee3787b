"""The vault's safe surface: create, read, update, shred members.

Everything the service layer may do with personal data goes through
:class:`Vault`. It validates input, encrypts every field under the member's own
DEK, keeps blind indexes for lookup, and crypto-shreds on withdrawal. It knows
nothing of gRPC.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
import re
import secrets
import struct
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import structlog

from vault import _hazmat, ids, policy
from vault.bindings import INDEX_KEY_ID, access_field, dek_context, index_key_context
from vault.cache import DekCache
from vault.clock import Clock, from_micros, to_micros
from vault.errors import (
    AuthenticationFailed,
    Conflict,
    DecryptionError,
    FieldViolation,
    InvalidInput,
    KeyChanged,
    KeyUnavailable,
    NotFound,
    Overloaded,
    PreconditionFailed,
    PurposeNotAllowed,
)
from vault.keyadmin import KeyAdmin
from vault.keyring import Keyring
from vault.mail import (
    LOGIN_ID_REMINDER,
    PASSWORD_CHANGED,
    PASSWORD_RESET,
    SEALED_PREFIX,
    Recipient,
)
from vault.passwords import MAX_RETRY_AFTER, MIN_RETRY_AFTER, PasswordHasher, PasswordStats
from vault.policy import ConsentChoice, Purpose, Violations
from vault.providers.base import KeyProvider
from vault.retention import WITHDRAWAL, Retention, RetentionRule
from vault.store.base import (
    AccessEntryRow,
    ConsentRow,
    IndexedField,
    IndexKeyRow,
    KekVersionRow,
    KeyEvent,
    MemberKeyRow,
    MemberRow,
    NewAccessEntry,
    NewPasswordReset,
    OutboxMessage,
    RetentionStore,
    Store,
)

log = structlog.get_logger("vault")

KEY_CHANGE_RETRIES = 3
AFTER_ANSWER_DELAY = 0.05  # seconds
T = TypeVar("T")
FIRST_DEK_ID = 1
DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 20, 100
#: The longest page token accepted (the API's documented limit; ours are 44).
PAGE_TOKEN_MAX = 128
EXPORT_FORMAT = "privacy-vault-export/1"
#: The largest export document export_member returns in one piece (UTF-8 bytes):
#: well under gRPC's 4 MiB message limit. Larger ones are read with stream_member.
EXPORT_MAX_BYTES = 3 * 1024 * 1024
#: stream_member's pieces hold at most this many characters (so at most 256 KiB).
EXPORT_PIECE_CHARS = 64 * 1024
#: Access-log entries read (and decrypted) per query while exporting.
EXPORT_PAGE_ROWS = 1000
#: The longest a password reset token may live (issue 4: "expiring within 30 minutes").
MAX_PASSWORD_RESET_TTL = timedelta(minutes=30)
RESET_TOKEN_BYTES = 32  # 256 bits from the OS CSPRNG
#: The window of the per-member limit on recovery mails (recovery_mails_per_hour).
RECOVERY_MAIL_WINDOW = timedelta(hours=1)
_INVALID_TOKEN = FieldViolation("token", "is invalid or expired")
#: Called with a member id after that member is shredded, for copies outside the
#: database (the service's mail spool). A failure is logged; the shred stands.
ShredHook = Callable[[str], Awaitable[object]]


@dataclass(frozen=True, slots=True)
class VaultSettings:
    policy_version: str = "1"
    privacy_officer_contact: str = "the privacy officer (contact not configured)"
    dek_cache_size: int = 10_000
    dek_cache_ttl: float = 300.0
    password_reset_ttl: timedelta = MAX_PASSWORD_RESET_TTL
    #: What a withdrawal keeps in the separated storage, and for how long (default:
    #: nothing; the member is shredded at once).
    withdrawal_retention: RetentionRule = field(default_factory=RetentionRule)
    #: Login-ID reminders and reset mails one member may be sent in any hour: they
    #: are requested anonymously, so past this nothing more is queued (same answer).
    recovery_mails_per_hour: int = 5
    #: FindLoginId / StartPasswordReset work in flight after answering; past it
    #: those calls are refused (Overloaded) before anything is looked up.
    recovery_queue_limit: int = 64
    #: Password hashes and verifications admitted at once, running or waiting
    #: (open_vault builds the hasher with it); default: 8 per password worker.
    password_queue_limit: int | None = None

    def __post_init__(self) -> None:
        if not timedelta(0) < self.password_reset_ttl <= MAX_PASSWORD_RESET_TTL:
            raise ValueError("password_reset_ttl must be positive and at most 30 minutes")
        if self.recovery_mails_per_hour < 1 or self.recovery_queue_limit < 1:
            raise ValueError("recovery_mails_per_hour and recovery_queue_limit must be >= 1")
        if self.password_queue_limit is not None and self.password_queue_limit < 1:
            raise ValueError("password_queue_limit must be at least 1")


@dataclass(frozen=True, slots=True)
class NewMember:
    login_id: str
    password: str
    name: str
    email: str
    birth_date: str
    mobile_phone: str | None = None
    consents: Sequence[ConsentChoice] = ()

    def __repr__(self) -> str:
        return "<NewMember (personal data hidden)>"


@dataclass(frozen=True, slots=True)
class MemberChanges:
    """A correction: ``paths`` names the fields to change (a field mask)."""

    paths: frozenset[str]
    name: str | None = None
    email: str | None = None
    mobile_phone: str | None = None

    def __repr__(self) -> str:
        return f"<MemberChanges paths={sorted(self.paths)}>"


@dataclass(frozen=True, slots=True)
class MemberView:
    """A member as one purpose may see it: fields it does not allow are None."""

    member_id: str
    created_at: datetime
    last_seen_at: datetime
    login_id: str | None = None
    name: str | None = None
    email: str | None = None
    mobile_phone: str | None = None
    consents: tuple[ConsentRow, ...] = ()

    def __repr__(self) -> str:
        return f"<MemberView {self.member_id}>"


@dataclass(frozen=True, slots=True)
class AccessEntry:
    at: datetime
    action: str
    ip: str

    def __repr__(self) -> str:
        return f"<AccessEntry at={self.at.isoformat()}>"


@dataclass(frozen=True, slots=True)
class AccessPage:
    entries: tuple[AccessEntry, ...]
    next_page_token: str = ""


@dataclass(frozen=True, slots=True)
class WithdrawalOutcome:
    destroyed_at: datetime | None = None
    retained_until: datetime | None = None


class Vault:
    """Use :meth:`open`; the constructor takes already-bootstrapped parts."""

    def __init__(
        self,
        store: Store,
        provider: KeyProvider,
        hasher: PasswordHasher,
        clock: Clock,
        settings: VaultSettings,
        index_key: _hazmat.IndexKey,
        retained: RetentionStore | None = None,
    ) -> None:
        self._store = store
        self._provider = provider
        self._hasher = hasher
        self._clock = clock
        self._settings = settings
        self._index_key = index_key
        # Page tokens are authenticated under a key of their own, derived from the
        # index key: nothing new to store, and every replica derives the same key.
        self._page_token_key = _hazmat.derive_mac_key(index_key, "page-token")
        self._deks = DekCache(settings.dek_cache_size, settings.dek_cache_ttl)
        self._background: set[asyncio.Task[None]] = set()
        self._shred_hooks: list[ShredHook] = []
        #: Key management (rotation, re-wrap, destruction) for the security team.
        self.keys = KeyAdmin(store, provider, clock, self._deks, retained)
        #: Withdrawn members' data in the separated storage (policy section 6).
        self.retention = Retention(
            store,
            retained,
            provider,
            clock,
            self._deks,
            settings.withdrawal_retention,
            self._active_kek_version,
        )
        # Decrypted when the login ID is unknown, so that path does the same work.
        self._decoy_key = _hazmat.SecretKey(0, _hazmat.new_key_material())
        self._decoy_ct = _hazmat.seal_field(self._decoy_key, "decoy", "password_hash", b"x" * 97)
        # How long after-answer work takes (a running mean): a refused caller's wait.
        self._background_seconds = AFTER_ANSWER_DELAY

    def __repr__(self) -> str:
        return f"<Vault provider={self._provider.name}>"

    # --- lifecycle -------------------------------------------------------------
    @classmethod
    async def open(
        cls,
        store: Store,
        provider: KeyProvider,
        hasher: PasswordHasher,
        clock: Clock,
        settings: VaultSettings | None = None,
        retained: RetentionStore | None = None,
    ) -> Vault:
        """Migrate the store (and the retention store, when given), make sure the key
        hierarchy exists, and check that the provider's keys open this database
        (fail at start, not at the first request)."""
        await store.migrate()
        if retained is not None:
            await retained.migrate()
        now = clock.now()
        rows = await store.list_kek_versions()
        if not rows:
            await provider.create_version(1)
            if await store.insert_kek_version(KekVersionRow(1, "active", now)):
                await store.record_key_event(
                    KeyEvent(now, "bootstrap", "create_kek_version", 1, details={})
                )
            rows = await store.list_kek_versions()
        keyring = Keyring(rows)
        if not await provider.has_version(keyring.active):
            raise KeyUnavailable(
                f"the {provider.name} key provider does not hold the active KEK version "
                f"{keyring.active}"
            )
        stored = await store.get_index_key()
        if stored is None:
            material = _hazmat.new_key_material()
            wrapped = await provider.wrap(keyring.active, material, index_key_context(INDEX_KEY_ID))
            stored = await store.insert_index_key(
                IndexKeyRow(INDEX_KEY_ID, keyring.active, wrapped, now)
            )
        try:
            material = await provider.unwrap(
                stored.kek_version, stored.wrapped_key, index_key_context(stored.key_id)
            )
        except DecryptionError:
            raise KeyUnavailable(
                "the key provider's KEKs do not open this database (wrong key file?)"
            ) from None
        index_key = _hazmat.IndexKey(stored.key_id, material)
        return cls(store, provider, hasher, clock, settings or VaultSettings(), index_key, retained)

    async def close(self) -> None:
        await self.settle()
        self._deks.clear()
        if self.retention.store is not None:
            await self.retention.store.close()
        await self._store.close()
        await self._provider.close()
        self._hasher.close()

    @property
    def store(self) -> Store:
        """The store, for the lifecycle sidecar's sweeps (ciphertexts and ids only)."""
        return self._store

    @property
    def clock(self) -> Clock:
        return self._clock

    @property
    def password_stats(self) -> PasswordStats:
        """What the password hasher did so far (jobs admitted, refused, in flight)."""
        return self._hasher.stats

    # --- keys --------------------------------------------------------------------
    async def _dek(self, key_row: MemberKeyRow) -> _hazmat.SecretKey:
        key = self._deks.get(key_row.member_id, key_row.dek_id)
        if key is None:
            material = await self._provider.unwrap(
                key_row.kek_version,
                key_row.wrapped_dek,
                dek_context(key_row.member_id, key_row.dek_id),
            )
            key = _hazmat.SecretKey(key_row.dek_id, material)
            self._deks.put(key_row.member_id, key)
        return key

    def _index(self, domain: str, value: str) -> bytes:
        return _hazmat.blind_index(self._index_key, domain, value)

    def _login_index(self, login_id: str) -> bytes:
        return self._index("login_id", policy.login_id_index_value(login_id))

    def _email_index(self, email: str) -> bytes:
        return self._index("email", policy.email_index_value(email))

    # --- members -----------------------------------------------------------------
    async def sign_up(self, new: NewMember) -> str:
        v = Violations()
        login_id = policy.check_login_id(new.login_id, v)
        password = policy.check_password(new.password, v, login_id=new.login_id)
        name = policy.check_name(new.name, v)
        email = policy.check_email(new.email, v)
        mobile = policy.check_mobile_phone(new.mobile_phone, v) if new.mobile_phone else ""
        policy.check_birth_date(new.birth_date, self._clock.now().date(), v)
        consents = policy.check_consents(new.consents, v)
        v.raise_if_any()
        assert login_id
        assert password
        assert name
        assert email
        assert mobile is not None

        encoded_hash = await self._hasher.hash(password)
        member_id = ids.new_member_id()
        material = _hazmat.new_key_material()
        dek = _hazmat.SecretKey(FIRST_DEK_ID, material)
        plain = {
            "login_id": login_id,
            "password_hash": encoded_hash,
            "name": name,
            "email": email,
            "mobile_phone": mobile,
        }
        now = self._clock.now()
        ciphertexts = {
            f: _hazmat.seal_field(dek, member_id, f, value.encode()) for f, value in plain.items()
        }
        indexes = {"login_id": self._login_index(login_id), "email": self._email_index(email)}
        consent_rows = tuple(
            ConsentRow(p.value, granted, self._settings.policy_version, now)
            for p, granted in sorted(consents.items())
        )
        for attempt in range(KEY_CHANGE_RETRIES):
            # Read from the database each time: a rotation by any process applies
            # to the very next sign-up, with no restart.
            kek_version = await self._active_kek_version()
            wrapped = await self._provider.wrap(
                kek_version, material, dek_context(member_id, FIRST_DEK_ID)
            )
            try:
                await self._store.insert_member(
                    MemberRow(
                        member_id,
                        now,
                        now,
                        ciphertexts,
                        indexes,
                        MemberKeyRow(member_id, FIRST_DEK_ID, kek_version, wrapped),
                        consent_rows,
                    )
                )
                break
            except PreconditionFailed:
                # That version was rotated away and destroyed while we wrapped.
                if attempt == KEY_CHANGE_RETRIES - 1:
                    raise
        self._deks.put(member_id, dek)
        log.info("member_signed_up")
        return member_id

    async def authenticate(self, login_id: str, password: str, client_ip: str) -> str:
        v = Violations()
        checked_login = policy.check_login_id(login_id, v)
        if not password:
            v.add("password", "must not be empty")
        ip = policy.check_ip(client_ip, v, field="x-client-ip")
        v.raise_if_any()
        assert checked_login
        assert ip

        row = await self._store.find_member("login_id", self._login_index(checked_login))
        if row is None:
            # Same work as a wrong password: a decryption and a verification.
            _hazmat.open_field(self._decoy_key, "decoy", "password_hash", self._decoy_ct)
            await self._hasher.verify_decoy(password)
            raise AuthenticationFailed
        dek = await self._dek(row.key)
        encoded = self._open(dek, row, "password_hash")
        if not await self._hasher.verify(encoded, password):
            raise AuthenticationFailed
        rehash = None
        if self._hasher.needs_rehash(encoded):
            # Refused (Overloaded): the login stands; the upgrade waits for a later one.
            with contextlib.suppress(Overloaded):
                rehash = await self._hasher.hash(password)

        async def record(current: MemberRow, key: _hazmat.SecretKey) -> bool:
            mid = current.member_id
            return await self._store.record_login(
                mid,
                self._access_entry(key, mid, "authenticate", ip),
                None if rehash is None else self._seal(key, mid, "password_hash", rehash),
                dek_id=current.key.dek_id,
            )

        try:
            await self._under_current_key(row.member_id, record, first=(row, dek))
        except NotFound:
            raise AuthenticationFailed from None  # shredded between the lookup and now
        return row.member_id

    async def get_member(self, member_id: str, purpose: Purpose) -> MemberView:
        row = await self._row(member_id)
        if not policy.purpose_permitted(purpose, row.consents):
            raise PurposeNotAllowed(purpose.value)
        allowed = policy.ALLOWED_FIELDS[purpose]
        if not allowed:  # statistics: nothing to decrypt, no key needed
            return MemberView(
                row.member_id, row.created_at, row.last_seen_at, consents=row.consents
            )
        return await self._read_under_key(row, lambda r, dek: self._view(r, allowed, dek))

    async def update_member(self, member_id: str, changes: MemberChanges) -> MemberView:
        v = Violations()
        mid = policy.check_member_id(member_id, v)
        # One violation however many bad paths, and never the path itself: it is the
        # caller's text, and 7,000 of them made a trailer no client would accept.
        if changes.paths - {"name", "email", "mobile_phone"}:
            v.add(
                "update_mask",
                "names a field that cannot be updated; use name, email or mobile_phone",
            )
        if not changes.paths:
            v.add("update_mask", "must name at least one field")
        new_values: dict[str, str] = {}
        if "name" in changes.paths and (name := policy.check_name(changes.name or "", v)):
            new_values["name"] = name
        if "email" in changes.paths and (email := policy.check_email(changes.email or "", v)):
            new_values["email"] = email
        if "mobile_phone" in changes.paths:
            if changes.mobile_phone:
                if phone := policy.check_mobile_phone(changes.mobile_phone, v):
                    new_values["mobile_phone"] = phone
            else:
                new_values["mobile_phone"] = ""  # removing the optional item
        v.raise_if_any()
        assert mid

        indexes = (
            {"email": self._email_index(new_values["email"])} if "email" in new_values else None
        )

        async def write(row: MemberRow, key: _hazmat.SecretKey) -> bool:
            ciphertexts = {f: self._seal(key, mid, f, value) for f, value in new_values.items()}
            return await self._store.update_member(mid, ciphertexts, indexes, dek_id=row.key.dek_id)

        await self._under_current_key(mid, write)
        log.info("member_updated", fields=sorted(new_values))
        return await self.get_member(mid, Purpose.MEMBER_REQUEST)

    async def change_password(self, member_id: str, current: str, new: str) -> None:
        v = Violations()
        mid = policy.check_member_id(member_id, v)
        if not current:
            v.add("current_password", "must not be empty")
        policy.check_password(new, v, "new_password")
        v.raise_if_any()
        assert mid
        row = await self._row(mid)
        dek = await self._dek(row.key)
        login_id = self._open(dek, row, "login_id")
        if new.casefold() == login_id.casefold():
            raise InvalidInput([FieldViolation("new_password", "must differ from the login ID")])
        await self._check_password(dek, row, current)
        encoded = await self._hasher.hash(new)

        await self._store_password(mid, encoded, "change", first=(row, dek))
        log.info("member_password_changed")

    async def _store_password(
        self,
        member_id: str,
        encoded: str,
        via: str,
        first: tuple[MemberRow, _hazmat.SecretKey] | None = None,
    ) -> None:
        """Write the new password hash and, in the same transaction, the
        password_changed mail: the member hears of every change, and of no change
        that did not happen."""
        notice = self._message(member_id, PASSWORD_CHANGED, {"via": via})

        async def write(current: MemberRow, key: _hazmat.SecretKey) -> bool:
            ct = self._seal(key, member_id, "password_hash", encoded)
            return await self._store.update_member(
                member_id, {"password_hash": ct}, dek_id=current.key.dek_id, notify=notice
            )

        await self._under_current_key(member_id, write, first=first)

    def _message(self, member_id: str, kind: str, params: dict[str, str]) -> OutboxMessage:
        now = self._clock.now()
        return OutboxMessage(
            message_id=str(uuid.uuid4()),
            member_id=member_id,
            kind=kind,
            params={"at": now.isoformat(), **params},
            created_at=now,
        )

    # --- account recovery ------------------------------------------------------------
    # Unknown e-mails and login IDs get the same answer as known ones, in the same
    # time by construction: the request is validated, answered, and the lookup and
    # the mail happen afterwards in a background task (see _after_answer). The
    # background work is the same too: the same blind-index lookup, then the same
    # store call in a write transaction (for an unknown account with a random
    # member id it finds absent, so it writes nothing), so not even the database's
    # load tells.

    async def find_login_id(self, email: str) -> None:
        """Mail the login ID to ``email`` if a member has it; the same otherwise.

        The outbox message holds no login ID: the relay decrypts it at send time
        (resolve_recipient), so a shred in between leaves nothing to send."""
        v = Violations()
        checked = policy.check_email(email, v)
        v.raise_if_any()
        assert checked
        self._after_answer(lambda: self._find_login_id(checked))

    async def _find_login_id(self, checked: str) -> None:
        row = await self._store.find_member("email", self._email_index(checked))
        member_id = ids.new_member_id() if row is None else row.member_id
        # "no_member" for the decoy: nothing is written.
        outcome = await self._store.queue_recovery_mail(
            self._message(member_id, LOGIN_ID_REMINDER, {}),
            limit=self._settings.recovery_mails_per_hour,
            since=self._clock.now() - RECOVERY_MAIL_WINDOW,
        )
        self._log_recovery_mail(outcome, LOGIN_ID_REMINDER)
        log.info("login_id_reminder_requested")

    async def start_password_reset(self, *, login_id: str = "", email: str = "") -> None:
        """Mail a single-use reset token to the member named by login ID or e-mail
        (exactly one of them); the same answer, after the same work, if none is."""
        v = Violations()
        if bool(login_id) == bool(email):
            v.add("account", "must be exactly one of login_id and email")
            v.raise_if_any()
        if login_id:
            checked_login = policy.check_login_id(login_id, v)
            v.raise_if_any()
            assert checked_login
            lookup: tuple[IndexedField, bytes] = ("login_id", self._login_index(checked_login))
        else:
            checked_email = policy.check_email(email, v)
            v.raise_if_any()
            assert checked_email
            lookup = ("email", self._email_index(checked_email))
        self._after_answer(lambda: self._start_password_reset(*lookup))

    async def _start_password_reset(self, index: IndexedField, hmac: bytes) -> None:
        row = await self._store.find_member(index, hmac)

        token = secrets.token_urlsafe(RESET_TOKEN_BYTES)
        now = self._clock.now()
        expires_at = now + self._settings.password_reset_ttl
        message_id = str(uuid.uuid4())
        if row is None:
            member_id, key = ids.new_member_id(), self._decoy_key
        else:
            member_id, key = row.member_id, await self._dek(row.key)
        # The token must reach the mail, and the outbox is a database table. It is
        # not stored there in clear: it is sealed under the member's DEK, bound to
        # this message, and opened only by the relay at send time (a shred makes
        # it unreadable with the rest). password_resets holds only its SHA-256.
        # If the member's DEK is rotated before the mail goes out, the sealed token
        # cannot be opened and the mail is dropped; the member asks again.
        sealed = _hazmat.seal_field(
            key, member_id, _sealed_field(message_id, "token"), token.encode()
        )
        message = OutboxMessage(
            message_id=message_id,
            member_id=member_id,
            kind=PASSWORD_RESET,
            params={
                "expires_at": expires_at.isoformat(),
                SEALED_PREFIX + "token": base64.b64encode(sealed).decode(),
            },
            created_at=now,
        )
        # "no_member" for the decoy (no such member) or a member shredded meanwhile.
        outcome = await self._store.queue_recovery_mail(
            message,
            limit=self._settings.recovery_mails_per_hour,
            since=now - RECOVERY_MAIL_WINDOW,
            reset=NewPasswordReset(_token_hash(token), expires_at),
        )
        self._log_recovery_mail(outcome, PASSWORD_RESET)
        log.info("password_reset_requested")

    @staticmethod
    def _log_recovery_mail(outcome: str, kind: str) -> None:
        if outcome == "limited":
            # Nobody is told but the operator: the caller got the usual answer.
            log.warning("recovery_mail_limit_reached", kind=kind)

    async def complete_password_reset(self, token: str, new_password: str) -> None:
        """Set a new password with a token from start_password_reset. An unknown,
        used or expired token is one and the same error."""
        v = Violations()
        if not token:
            v.add(_INVALID_TOKEN.field, _INVALID_TOKEN.description)
        policy.check_password(new_password, v, "new_password")
        v.raise_if_any()
        # The token is looked up (not spent) before any argon2 work: a bogus token
        # costs one indexed read. Everything that can refuse the request runs
        # before the token is spent, so a refusal never burns it.
        token_hash = _token_hash(token)
        member_id = await self._store.find_password_reset(token_hash, self._clock.now())
        if member_id is None:
            raise InvalidInput([_INVALID_TOKEN])
        try:
            row = await self._row(member_id)
        except NotFound:  # shredded since the token was issued
            raise InvalidInput([_INVALID_TOKEN]) from None
        dek = await self._dek(row.key)
        if new_password.casefold() == self._open(dek, row, "login_id").casefold():
            raise InvalidInput([FieldViolation("new_password", "must differ from the login ID")])
        encoded = await self._hasher.hash(new_password)  # Overloaded leaves the token unspent
        # Spent atomically: of two calls with one token, at most one gets here.
        if await self._store.consume_password_reset(token_hash, self._clock.now()) != member_id:
            raise InvalidInput([_INVALID_TOKEN])
        try:
            await self._store_password(member_id, encoded, "reset", first=(row, dek))
        except NotFound:
            raise InvalidInput([_INVALID_TOKEN]) from None
        log.info("member_password_reset")

    async def withdraw(self, member_id: str, password: str) -> WithdrawalOutcome:
        v = Violations()
        mid = policy.check_member_id(member_id, v)
        if not password:
            v.add("password", "must not be empty")
        v.raise_if_any()
        assert mid
        row = await self._row(mid)
        await self._check_password(await self._dek(row.key), row, password)
        if self.retention.enabled:
            retained_until = await self.retention.withdraw(mid)
            await self._shredded(mid)  # the live member is shredded by the move
            return WithdrawalOutcome(retained_until=retained_until)
        return WithdrawalOutcome(destroyed_at=await self.shred(mid, reason=WITHDRAWAL))

    async def shred(
        self, member_id: str, reason: str, *, last_seen_before: datetime | None = None
    ) -> datetime:
        """Crypto-shred a member: the DEK row goes, so every ciphertext of theirs,
        wherever it is copied, is noise once the wrapping KEK version is destroyed.
        With ``last_seen_before``, only if the member has not connected since then
        (NotFound otherwise)."""
        for attempt in range(KEY_CHANGE_RETRIES):
            try:
                record = await self._store.shred_member(
                    member_id, self._clock.now(), reason, last_seen_before=last_seen_before
                )
                break
            except Conflict:
                # Rolled back whole in a conflict: the shred's own checks (the member
                # is there, not connected since) run again.
                if attempt == KEY_CHANGE_RETRIES - 1:
                    raise
        self._deks.evict(member_id)
        if record is None:
            raise NotFound
        log.info(
            "member_shredded",
            member_id=member_id,
            reason=reason,
            items=dict(record.items),
            kek_versions=list(record.kek_versions),
        )
        await self._shredded(member_id)
        return record.destroyed_at

    def add_shred_hook(self, hook: ShredHook) -> None:
        """Call ``hook(member_id)`` after each shred by this vault (see ShredHook)."""
        self._shred_hooks.append(hook)

    async def _shredded(self, member_id: str) -> None:
        for hook in self._shred_hooks:
            try:
                await hook(member_id)
            except Exception as exc:  # noqa: BLE001 - the shred has committed
                log.warning("shred_hook_failed", member_id=member_id, error=type(exc).__name__)

    async def resolve_recipient(
        self, member_id: str, message: OutboxMessage | None = None
    ) -> Recipient | None:
        """The member's e-mail address, name and login ID, decrypted now (the outbox
        relay's send-time lookup), and ``message``'s sealed params opened; None if
        the member is gone, so their mail is dropped, or if a sealed param no longer
        opens (the member's DEK was rotated since: that mail cannot be sent)."""
        wanted = frozenset({"name", "email", "login_id"})

        async def read(r: MemberRow, dek: _hazmat.SecretKey) -> tuple[MemberView, dict[str, str]]:
            opened: dict[str, str] = {}
            for name, value in (message.params if message is not None else {}).items():
                if name.startswith(SEALED_PREFIX):
                    assert message is not None
                    bare = name.removeprefix(SEALED_PREFIX)
                    opened[bare] = _hazmat.open_field(
                        dek,
                        r.member_id,
                        _sealed_field(message.message_id, bare),
                        base64.b64decode(value, validate=True),
                    ).decode()
            return await self._view(r, wanted, dek), opened

        try:
            row = await self._row(member_id)
            view, opened = await self._read_under_key(row, read)
        except NotFound:  # shredded, possibly between the lookup and the decryption
            return None
        except DecryptionError:
            if message is None:
                raise
            return None
        assert view.email is not None
        assert view.name is not None
        assert view.login_id is not None
        return Recipient(view.member_id, view.email, view.name, view.login_id, opened)

    async def export_member(self, member_id: str) -> str:
        """The member's whole record as a JSON document (section 7, right of access),
        in one string, for documents of up to EXPORT_MAX_BYTES. A larger one is
        PreconditionFailed (EXPORT_TOO_LARGE), found as soon as the limit is
        passed, without reading the rest: stream_member serves every size."""
        pieces: list[str] = []
        size = 0
        async with contextlib.aclosing(self.stream_member(member_id)) as stream:
            async for piece in stream:
                size += len(piece.encode())
                if size > EXPORT_MAX_BYTES:
                    raise PreconditionFailed(
                        "export",
                        f"the member's record is larger than {EXPORT_MAX_BYTES // (1024 * 1024)} "
                        "MiB, too large for one message; read it with StreamMemberData",
                        kind="EXPORT_TOO_LARGE",
                    )
                pieces.append(piece)
        return "".join(pieces)

    async def stream_member(self, member_id: str) -> AsyncGenerator[str, None]:
        """export_member's document for a member of any history size, in pieces of
        at most EXPORT_PIECE_CHARS characters that concatenate to the document.

        The access log is read EXPORT_PAGE_ROWS entries at a time by keyset (each
        page strictly older than the last), so memory stays bounded and entries
        recorded after the first page are not included. A per-member key rotation
        meanwhile is followed (the page is read again under the new key); a shred
        meanwhile ends the stream with NotFound rather than a truncated document."""
        row = await self._row(member_id)
        mid = row.member_id
        everything = policy.ALLOWED_FIELDS[Purpose.MEMBER_REQUEST]
        view = await self._read_under_key(row, lambda r, dek: self._view(r, everything, dek))
        head = {
            "format": EXPORT_FORMAT,
            "exported_at": self._clock.now().isoformat(),
            "policy_version": self._settings.policy_version,
            "privacy_officer": self._settings.privacy_officer_contact,
            "member": {
                "member_id": view.member_id,
                "login_id": view.login_id,
                "name": view.name,
                "email": view.email,
                "mobile_phone": view.mobile_phone or None,
                "password": "kept only as an encrypted argon2id hash; it cannot be exported",
                "created_at": view.created_at.isoformat(),
                "last_seen_at": view.last_seen_at.isoformat(),
            },
            "consents": [
                {
                    "purpose": c.purpose,
                    "granted": c.granted,
                    "policy_version": c.policy_version,
                    "recorded_at": c.recorded_at.isoformat(),
                }
                for c in row.consents
            ],
        }
        # The head pretty-printed, its closing brace replaced by the history, which
        # is written one entry per line as the pages come.
        text = json.dumps(head, ensure_ascii=False, indent=2)
        assert text.endswith("\n}")
        pending = [text[:-2], ',\n  "access_history": [']
        pending_chars = sum(map(len, pending))
        cursor: tuple[datetime, int] | None = None
        first = True

        async def read_page(
            r: MemberRow, dek: _hazmat.SecretKey
        ) -> tuple[MemberRow, list[AccessEntryRow], list[AccessEntry]]:
            rows = await self._store.list_access(mid, EXPORT_PAGE_ROWS, cursor)
            return r, rows, [self._open_access(dek, mid, x) for x in rows]

        while True:
            row, rows, entries = await self._read_under_key(row, read_page)
            for e in entries:
                line = json.dumps(
                    {"at": e.at.isoformat(), "action": e.action, "ip": e.ip}, ensure_ascii=False
                )
                pending.append(("\n    " if first else ",\n    ") + line)
                pending_chars += len(pending[-1])
                first = False
            if len(rows) < EXPORT_PAGE_ROWS:
                break
            cursor = (rows[-1].at, rows[-1].entry_id)
            if pending_chars >= EXPORT_PIECE_CHARS:
                joined = "".join(pending)
                whole = len(joined) - len(joined) % EXPORT_PIECE_CHARS
                for at in range(0, whole, EXPORT_PIECE_CHARS):
                    yield joined[at : at + EXPORT_PIECE_CHARS]
                pending = [joined[whole:]]
                pending_chars = len(pending[0])
        # A shred while the pages were read leaves a history that just stops:
        # never hand that out as the member's whole record.
        await self._row(mid)
        pending.append("]\n}" if first else "\n  ]\n}")
        joined = "".join(pending)
        for at in range(0, len(joined), EXPORT_PIECE_CHARS):
            yield joined[at : at + EXPORT_PIECE_CHARS]

    # --- access log ----------------------------------------------------------------
    def _access_entry(
        self, dek: _hazmat.SecretKey, member_id: str, action: str, ip: str
    ) -> NewAccessEntry:
        at = self._clock.now()
        return NewAccessEntry(
            at=at,
            action_ct=self._seal(dek, member_id, access_field("action", at), action),
            ip_ct=self._seal(dek, member_id, access_field("ip", at), ip),
        )

    def _open_access(
        self, dek: _hazmat.SecretKey, member_id: str, row: AccessEntryRow
    ) -> AccessEntry:
        action = _hazmat.open_field(dek, member_id, access_field("action", row.at), row.action_ct)
        ip = _hazmat.open_field(dek, member_id, access_field("ip", row.at), row.ip_ct)
        return AccessEntry(at=row.at, action=action.decode(), ip=ip.decode())

    async def record_access(self, member_id: str, action: str, ip: str) -> None:
        v = Violations()
        mid = policy.check_member_id(member_id, v)
        checked_action = policy.check_action(action, v)
        checked_ip = policy.check_ip(ip, v)
        v.raise_if_any()
        assert mid
        assert checked_action
        assert checked_ip

        async def write(row: MemberRow, key: _hazmat.SecretKey) -> bool:
            entry = self._access_entry(key, mid, checked_action, checked_ip)
            return await self._store.append_access(mid, entry, dek_id=row.key.dek_id)

        await self._under_current_key(mid, write)

    async def list_access(self, member_id: str, page_size: int, page_token: str) -> AccessPage:
        v = Violations()
        mid = policy.check_member_id(member_id, v)
        if page_size < 0:
            v.add("page_size", "must not be negative")
        cursor = None
        if page_token and mid:
            # Checked before anything reaches the database: only a token this
            # vault issued for this member's history opens to a cursor.
            cursor = _decode_page_token(self._page_token_key, mid, page_token)
        if page_token and cursor is None:
            v.add("page_token", "is not a token ListAccessHistory returned for this member")
        v.raise_if_any()
        assert mid
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)

        async def read(row: MemberRow, dek: _hazmat.SecretKey) -> AccessPage:
            # One extra row tells whether another page exists.
            rows = await self._store.list_access(mid, size + 1, cursor)
            entries = tuple(self._open_access(dek, mid, r) for r in rows[:size])
            token = (
                _encode_page_token(self._page_token_key, mid, rows[size - 1])
                if len(rows) > size
                else ""
            )
            return AccessPage(entries, token)

        return await self._read_under_key(await self._row(mid), read)

    # --- helpers -------------------------------------------------------------------
    def _after_answer(self, work: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run ``work()`` after the caller has its answer; failures are logged by type
        only (the work touches personal data). At most recovery_queue_limit such
        tasks are in flight: past it, Overloaded, raised before ``work`` looked
        anything up, so the refusal is the same whether the account exists."""
        if len(self._background) >= self._settings.recovery_queue_limit:
            wait = min(max(self._background_seconds, MIN_RETRY_AFTER), MAX_RETRY_AFTER)
            raise Overloaded(wait, "account_recovery")

        async def guarded() -> None:
            loop = asyncio.get_running_loop()
            started = loop.time()
            try:
                # Start once the answer is on its way: work scheduled at once would
                # run before gRPC sends the reply and make known accounts slower.
                await asyncio.sleep(AFTER_ANSWER_DELAY)
                await work()
            except Exception as exc:  # noqa: BLE001 - nobody awaits a background task
                log.error("background_work_failed", error=type(exc).__name__)  # noqa: TRY400
            finally:
                self._background_seconds += 0.1 * (loop.time() - started - self._background_seconds)

        task = asyncio.get_running_loop().create_task(guarded())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def settle(self) -> None:
        """Wait for work started after answering (tests, and a clean close)."""
        while self._background:
            await asyncio.gather(*self._background)

    async def _read_under_key(
        self,
        row: MemberRow,
        read: Callable[[MemberRow, _hazmat.SecretKey], Awaitable[T]],
    ) -> T:
        """Run a read with the member's DEK. A per-member key rotation (or a re-wrap
        and destroy) that commits between reading ``row`` and the rest makes the
        key and the data disagree: read the row again and retry, only then fail."""
        for attempt in range(KEY_CHANGE_RETRIES):
            try:
                return await read(row, await self._dek(row.key))
            except (DecryptionError, KeyUnavailable):
                fresh = await self._row(row.member_id)
                if fresh.key == row.key or attempt == KEY_CHANGE_RETRIES - 1:
                    raise
                self._deks.evict(row.member_id)
                row = fresh
        raise AssertionError("unreachable")

    async def _active_kek_version(self) -> int:
        return Keyring(await self._store.list_kek_versions()).active

    @staticmethod
    def _seal(key: _hazmat.SecretKey, member_id: str, field_name: str, value: str) -> bytes:
        return _hazmat.seal_field(key, member_id, field_name, value.encode())

    async def _under_current_key(
        self,
        member_id: str,
        write: Callable[[MemberRow, _hazmat.SecretKey], Awaitable[bool]],
        first: tuple[MemberRow, _hazmat.SecretKey] | None = None,
    ) -> None:
        """Run a write encrypted under the member's current DEK. A per-member key
        rotation in between makes the store refuse it (KeyChanged): read again,
        encrypt again. A write the database rolled back in a conflict with a
        concurrent transaction (Conflict: nothing of it was written) is run again
        the same way. False from ``write`` means the member is gone."""
        last: KeyChanged | Conflict = KeyChanged()
        for _ in range(KEY_CHANGE_RETRIES):
            if first is None:
                row = await self._row(member_id)
                current = (row, await self._dek(row.key))
            else:
                current, first = first, None
            try:
                if not await write(*current):
                    raise NotFound
                return
            except KeyChanged as exc:
                self._deks.evict(member_id)
                last = exc
            except Conflict as exc:
                last = exc
        raise last

    async def _row(self, member_id: str) -> MemberRow:
        v = Violations()
        mid = policy.check_member_id(member_id, v)
        v.raise_if_any()
        assert mid
        row = await self._store.get_member(mid)
        if row is None:
            raise NotFound
        return row

    @staticmethod
    def _open(dek: _hazmat.SecretKey, row: MemberRow, field_name: str) -> str:
        return _hazmat.open_field(
            dek, row.member_id, field_name, row.ciphertexts[field_name]
        ).decode()

    async def _check_password(self, dek: _hazmat.SecretKey, row: MemberRow, password: str) -> None:
        if not await self._hasher.verify(self._open(dek, row, "password_hash"), password):
            raise AuthenticationFailed

    async def _view(
        self, row: MemberRow, allowed: frozenset[str], dek: _hazmat.SecretKey
    ) -> MemberView:
        values: dict[str, str | None] = {}
        if allowed:
            for name in allowed:
                values[name] = self._open(dek, row, name)
            if values.get("mobile_phone") == "":
                values["mobile_phone"] = None
        return MemberView(
            member_id=row.member_id,
            created_at=row.created_at,
            last_seen_at=row.last_seen_at,
            consents=row.consents,
            **values,
        )


def _token_hash(token: str) -> bytes:
    """What password_resets stores: SHA-256 (a 256-bit random token needs no salt
    or slow hash; nobody can guess one to test against the table)."""
    return hashlib.sha256(token.encode()).digest()


def _sealed_field(message_id: str, name: str) -> str:
    """The field name bound into a sealed outbox param: this message, this param."""
    return f"outbox/{message_id}/{name}"


# Page tokens (ListAccessHistory). Opaque to callers and authenticated by us:
#   token = base64url(version 0x02 | at (int64 µs) | entry_id (int64) | tag (16))
#   tag   = HMAC(page-token key, "pv.page-token" | version | len|member_id
#                | len|listing | at | entry_id)[:16]
# so a token opens only for the member and the listing it was issued for (the
# page size is not bound: it may change between pages). Anything else -- the
# old unauthenticated "v1:" text tokens included -- is refused before SQL.
_PAGE_TOKEN_VERSION = 2
_PAGE_CURSOR = struct.Struct(">Bqq")
_PAGE_TOKEN_BYTES = _PAGE_CURSOR.size + _hazmat.TOKEN_TAG_SIZE
_PAGE_TOKEN_TEXT = re.compile(rf"[A-Za-z0-9_-]{{{-(-_PAGE_TOKEN_BYTES * 4 // 3)}}}")
_ACCESS_LISTING = b"access_history"
_MIN_MICROS, _MAX_MICROS = (
    to_micros(datetime.min.replace(tzinfo=UTC)),
    to_micros(datetime.max.replace(tzinfo=UTC)),
)
_MAX_ENTRY_ID = 2**63 - 1


def _page_token_data(member_id: str, cursor: bytes) -> bytes:
    return (
        b"pv.page-token"
        + struct.pack(">H", len(member_id))
        + member_id.encode()
        + struct.pack(">H", len(_ACCESS_LISTING))
        + _ACCESS_LISTING
        + cursor
    )


def _encode_page_token(key: _hazmat.MacKey, member_id: str, row: AccessEntryRow) -> str:
    cursor = _PAGE_CURSOR.pack(_PAGE_TOKEN_VERSION, to_micros(row.at), row.entry_id)
    tag = _hazmat.token_tag(key, _page_token_data(member_id, cursor))
    return base64.urlsafe_b64encode(cursor + tag).decode().rstrip("=")


def _decode_page_token(
    key: _hazmat.MacKey, member_id: str, token: str
) -> tuple[datetime, int] | None:
    """The (at, entry_id) cursor of a token issued for ``member_id``'s history, or
    None for anything else. The length and alphabet are checked before decoding,
    the tag (in constant time) before the cursor is read, and the cursor's values
    are range-checked after."""
    if len(token) > PAGE_TOKEN_MAX or not _PAGE_TOKEN_TEXT.fullmatch(token):
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (ValueError, binascii.Error):
        return None
    if len(raw) != _PAGE_TOKEN_BYTES:
        return None
    cursor, tag = raw[: _PAGE_CURSOR.size], raw[_PAGE_CURSOR.size :]
    if not _hazmat.token_tag_matches(key, _page_token_data(member_id, cursor), tag):
        return None
    version, micros, entry_id = _PAGE_CURSOR.unpack(cursor)
    if version != _PAGE_TOKEN_VERSION or not 0 < entry_id <= _MAX_ENTRY_ID:
        return None
    if not _MIN_MICROS <= micros <= _MAX_MICROS:
        return None
    return from_micros(micros), entry_id
