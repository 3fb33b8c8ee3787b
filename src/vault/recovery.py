"""Account recovery: FindLoginId, StartPasswordReset, CompletePasswordReset.

Unknown e-mails and login IDs get the same answer as known ones, in the same
time by construction: the request is validated, answered, and the lookup and
the mail happen afterwards in a background task (see :meth:`Recovery.after_answer`).
The background work is the same too: the same blind-index lookup, then the same
store call in a write transaction (for an unknown account with a random member
id it finds absent, so it writes nothing), so not even the database's load tells.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import secrets
import uuid
from collections.abc import Callable, Coroutine
from datetime import datetime, timedelta
from typing import Any, Protocol

from vault import _hazmat, ids, member_cipher, policy
from vault.clock import Clock
from vault.errors import FieldViolation, InvalidInput, NotFound, Overloaded
from vault.mail import (
    EMAIL_CHANGED,
    LOGIN_ID_REMINDER,
    PASSWORD_CHANGED,
    PASSWORD_RESET,
    SEALED_PREFIX,
    SEALED_RECIPIENT,
)
from vault.member_keys import MemberKeys
from vault.member_rows import load_member
from vault.members import BlindIndexes, VaultSettings, log, open_member_field
from vault.passwords import MAX_RETRY_AFTER, MIN_RETRY_AFTER, PasswordHasher
from vault.policy import Violations
from vault.store.base import (
    IndexedField,
    MemberRow,
    MemberStore,
    NewPasswordReset,
    OutboxMessage,
    PasswordStore,
    RecoveryStore,
)

AFTER_ANSWER_DELAY = 0.05  # seconds
RESET_TOKEN_BYTES = 32  # 256 bits from the OS CSPRNG
#: The window of the per-member limit on recovery mails (recovery_mails_per_hour).
RECOVERY_MAIL_WINDOW = timedelta(hours=1)
_INVALID_TOKEN = FieldViolation("token", "is invalid or expired")


class RecoveryStores(MemberStore, RecoveryStore, PasswordStore, Protocol):
    """The vault-database slice account recovery uses: members (lookup), reset
    tokens with the recovery-mail quota, and the password write (which ends the
    sessions and, for a reset, clears the failure counter in its transaction)."""


class Recovery:
    """Reached through the Vault's recovery methods; shares its member keys."""

    def __init__(
        self,
        store: RecoveryStores,
        keys: MemberKeys,
        hasher: PasswordHasher,
        clock: Clock,
        settings: VaultSettings,
        indexes: BlindIndexes,
        decoy_key: _hazmat.SecretKey,
    ) -> None:
        self._store = store
        self._keys = keys
        self._hasher = hasher
        self._clock = clock
        self._settings = settings
        self._indexes = indexes
        # Seals the reset token of an unknown account: the same work as a known one.
        self._decoy_key = decoy_key
        self._background: set[asyncio.Task[None]] = set()
        # How long after-answer work takes (a running mean): a refused caller's wait.
        self._background_seconds = AFTER_ANSWER_DELAY

    def __repr__(self) -> str:
        return f"<Recovery in_flight={len(self._background)}>"

    async def store_password(
        self,
        member_id: str,
        encoded: str,
        via: str,
        first: tuple[MemberRow, _hazmat.SecretKey] | None = None,
    ) -> None:
        """Write the new password hash and, in the same transaction, the
        password_changed mail (the member hears of every change, and of no change
        that did not happen) and the end of every session of the member: a crash
        cannot leave a session of the old password alive. A reset (``via`` "reset")
        also clears the failure counter there: the new password unlocks at once."""
        notice = self.message(member_id, PASSWORD_CHANGED, {"via": via})

        async def write(current: MemberRow, key: _hazmat.SecretKey) -> bool:
            ct = member_cipher.seal(key, member_id, "password_hash", encoded)
            return await self._store.write_password(
                member_id,
                ct,
                dek_id=current.key.dek_id,
                notify=notice,
                clear_failures=via == "reset",
            )

        await self._keys.under_current_key(member_id, write, first=first)

    def message(self, member_id: str, kind: str, params: dict[str, str]) -> OutboxMessage:
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
        self.after_answer(lambda: self._find_login_id(checked))

    async def _find_login_id(self, checked: str) -> None:
        row = await self._store.find_member("email", self._indexes.email(checked))
        member_id = ids.new_member_id() if row is None else row.member_id
        # "no_member" for the decoy: nothing is written.
        outcome = await self._store.queue_recovery_mail(
            self.message(member_id, LOGIN_ID_REMINDER, {}),
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
            lookup: tuple[IndexedField, bytes] = ("login_id", self._indexes.login_id(checked_login))
        else:
            checked_email = policy.check_email(email, v)
            v.raise_if_any()
            assert checked_email
            lookup = ("email", self._indexes.email(checked_email))
        self.after_answer(lambda: self._start_password_reset(*lookup))

    async def _start_password_reset(self, index: IndexedField, hmac: bytes) -> None:
        row = await self._store.find_member(index, hmac)

        token = secrets.token_urlsafe(RESET_TOKEN_BYTES)
        now = self._clock.now()
        expires_at = now + self._settings.password_reset_ttl
        message_id = str(uuid.uuid4())
        if row is None:
            member_id, key = ids.new_member_id(), self._decoy_key
        else:
            member_id, key = row.member_id, await self._keys.dek(row.key)
        # The token must reach the mail, and the outbox is a database table. It is
        # not stored there in clear: it is sealed under the member's DEK, bound to
        # this message, and opened only by the relay at send time (a shred makes
        # it unreadable with the rest). password_resets holds only its SHA-256.
        # If the member's DEK is rotated before the mail goes out, the sealed token
        # cannot be opened and the mail is dropped; the member asks again.
        sealed = member_cipher.seal(key, member_id, sealed_field(message_id, "token"), token)
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

    async def complete_password_reset(self, token: str, new_password: str) -> str:
        """Set a new password with a token from start_password_reset; the member's
        id. An unknown, used or expired token is one and the same error."""
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
            row = await load_member(self._store, member_id)
        except NotFound:  # shredded since the token was issued
            raise InvalidInput([_INVALID_TOKEN]) from None
        dek = await self._keys.dek(row.key)
        if new_password.casefold() == open_member_field(dek, row, "login_id").casefold():
            raise InvalidInput([FieldViolation("new_password", "must differ from the login ID")])
        encoded = await self._hasher.hash(new_password)  # Overloaded leaves the token unspent
        # Spent atomically: of two calls with one token, at most one gets here.
        if await self._store.consume_password_reset(token_hash, self._clock.now()) != member_id:
            raise InvalidInput([_INVALID_TOKEN])
        try:
            await self.store_password(member_id, encoded, "reset", first=(row, dek))
        except NotFound:
            raise InvalidInput([_INVALID_TOKEN]) from None
        log.info("member_password_reset")
        return member_id

    def after_answer(self, work: Callable[[], Coroutine[Any, Any, None]]) -> None:
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
                log.error("background_work_failed", error=type(exc).__name__)
            finally:
                self._background_seconds += 0.1 * (loop.time() - started - self._background_seconds)

        task = asyncio.get_running_loop().create_task(guarded())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def settle(self) -> None:
        """Wait for work started after answering (tests, and a clean close)."""
        while self._background:
            await asyncio.gather(*self._background)


def _token_hash(token: str) -> bytes:
    """What password_resets stores: SHA-256 (a 256-bit random token needs no salt
    or slow hash; nobody can guess one to test against the table)."""
    return hashlib.sha256(token.encode()).digest()


def sealed_field(message_id: str, name: str) -> str:
    """The field name bound into a sealed outbox param: this message, this param."""
    return f"outbox/{message_id}/{name}"


def email_changed_notice(key: _hazmat.SecretKey, row: MemberRow, now: datetime) -> OutboxMessage:
    """The notice that the member's e-mail address was changed, to the OLD address
    (read from ``row``, the member as it stands before the change, under ``key``).

    The relay can no longer find that address at send time, so it travels in the
    message, sealed under the member's DEK and bound to this message, like a reset
    token: the outbox holds no plaintext, a shred deletes the row and leaves any
    copy unreadable. It says when, never the new address."""
    message_id = str(uuid.uuid4())
    old = open_member_field(key, row, "email")
    sealed = member_cipher.seal(key, row.member_id, sealed_field(message_id, SEALED_RECIPIENT), old)
    return OutboxMessage(
        message_id=message_id,
        member_id=row.member_id,
        kind=EMAIL_CHANGED,
        params={
            "at": now.isoformat(),
            SEALED_PREFIX + SEALED_RECIPIENT: base64.b64encode(sealed).decode(),
        },
        created_at=now,
    )
