"""The vault's safe surface: create, read, update, shred members.

Everything the service layer may do with personal data goes through
:class:`Vault`. It validates input, encrypts every field under the member's own
DEK (through :mod:`vault.member_cipher`, with keys from
:class:`~vault.member_keys.MemberKeys`), keeps blind indexes for lookup, and
crypto-shreds on withdrawal. Account recovery (:mod:`vault.recovery`) and export
(:mod:`vault.export`) are components of their own; all are wired together in
:mod:`vault.bootstrap`. It knows nothing of gRPC.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from datetime import datetime
from functools import partial

from vault import _hazmat, ids, member_cipher, policy
from vault.activity import Activity
from vault.calls import current_caller
from vault.clock import Clock
from vault.consents import Consents
from vault.corrections import BY_MEMBER, Corrections, refuse_frozen
from vault.disclosures import Disclosures
from vault.errors import (
    AlreadyExists,
    AuthenticationFailed,
    Conflict,
    DecryptionError,
    FieldViolation,
    InvalidInput,
    NotFound,
    Overloaded,
)
from vault.export import EXPORT_MAX_BYTES as EXPORT_MAX_BYTES
from vault.export import EXPORT_PIECE_CHARS as EXPORT_PIECE_CHARS
from vault.export import Export, open_access_entry
from vault.idempotency import RECORD_ACCESS, SIGN_UP, Idempotency, check_request_id
from vault.keyadmin import KeyAdmin
from vault.lifecycle import BatchHook, Lifecycle, LifecyclePolicy
from vault.login_guard import LOGIN_FAILED, LoginGuard
from vault.mail import SEALED_PREFIX, MailOutbox, Recipient
from vault.member_keys import KEY_CHANGE_RETRIES, MemberKeys
from vault.member_rows import load_member
from vault.members import AccessEntry as AccessEntry
from vault.members import (
    AccessPage,
    BlindIndexes,
    MemberChanges,
    MemberView,
    NewMember,
    ShredHook,
    VaultSettings,
    WithdrawalOutcome,
    checked_changes,
    log,
    member_view,
    open_member_field,
)
from vault.page_tokens import checked_page, decode_page_token, encode_page_token
from vault.passwords import PasswordHasher, PasswordStats
from vault.policy import Purpose, Violations
from vault.providers.base import KeyProvider
from vault.purposes import check_answers, consent_outdated
from vault.recovery import Recovery, email_changed_notice, sealed_field
from vault.retention import WITHDRAWAL, Retention
from vault.sessions import Login, MemberSessions
from vault.statistics import Statistics
from vault.store.base import (
    ConsentRow,
    LeaseStore,
    MemberKeyRow,
    MemberRow,
    OutboxMessage,
    RetentionStore,
    Store,
)

__all__ = [
    "AccessEntry",
    "AccessPage",
    "MemberChanges",
    "MemberView",
    "NewMember",
    "Vault",
    "VaultParts",
    "VaultSettings",
    "WithdrawalOutcome",
]

FIRST_DEK_ID = 1


@dataclass(frozen=True, slots=True)
class VaultParts:
    """The vault's components, wired by :func:`vault.bootstrap.wire_vault` (tests
    build a component of their own from these instead of reaching into a Vault)."""

    store: Store
    retained: RetentionStore | None
    provider: KeyProvider
    hasher: PasswordHasher
    clock: Clock
    settings: VaultSettings
    member_keys: MemberKeys
    indexes: BlindIndexes
    #: Authenticates ListAccessHistory's page tokens (derived from the index key).
    page_token_key: _hazmat.MacKey
    keys: KeyAdmin
    retention: Retention
    recovery: Recovery
    export: Export
    #: Requested corrections, which freeze the fields they name (policy section 7).
    corrections: Corrections
    #: Aggregates over members who consent to statistics (policy section 3(3)).
    statistics: Statistics
    sessions: MemberSessions
    #: Consent over time: answers, histories, policy versions (vault.consents).
    consents: Consents
    #: Third-party provision: the recipients registry and the ledger (vault.disclosures).
    disclosures: Disclosures
    #: Every password check, under the failure counters and the IP throttle.
    guard: LoginGuard
    idempotency: Idempotency
    #: What this vault did (counts for the service's metrics), shared by its components.
    activity: Activity

    def __repr__(self) -> str:
        return f"<VaultParts provider={self.provider.name}>"


class Vault:
    """Opened with :func:`vault.open_vault`; built from wired :class:`VaultParts`."""

    def __init__(self, parts: VaultParts) -> None:
        self.parts = parts
        self._store = parts.store
        self._provider = parts.provider
        self._hasher = parts.hasher
        self._clock = parts.clock
        self._settings = parts.settings
        self._member_keys = parts.member_keys
        self._indexes = parts.indexes
        self._page_token_key = parts.page_token_key
        self._recovery = parts.recovery
        self._export = parts.export
        self._guard, self._idempotency = parts.guard, parts.idempotency
        self._shred_hooks: list[ShredHook] = []
        #: Counts of what this vault did since it opened (vault.activity).
        self.activity = parts.activity
        #: Key management (rotation, re-wrap, destruction) for the security team.
        self.keys = parts.keys
        #: Withdrawn members' data in the separated storage (policy section 6).
        self.retention = parts.retention
        #: Member sessions: the member's own rights need one (vault.sessions).
        self.sessions = parts.sessions
        #: The member's consents over time and the policy versions (vault.consents).
        self.consents = parts.consents
        #: Provision to registered recipients, and the members' ledgers.
        self.disclosures = parts.disclosures
        self._purposes = parts.settings.purposes
        self.corrections = parts.corrections
        self.statistics = parts.statistics

    def __repr__(self) -> str:
        return f"<Vault provider={self._provider.name}>"

    # --- lifecycle -------------------------------------------------------------
    async def close(self) -> None:
        await self.settle()
        self._member_keys.clear()
        if self.parts.retained is not None:
            await self.parts.retained.close()
        await self._store.close()
        await self._provider.close()
        self._hasher.close()

    # --- the sidecar's parts: store slices, never the whole store -------------------------
    def lifecycle(
        self, policy: LifecyclePolicy | None = None, *, on_batch: BatchHook | None = None
    ) -> Lifecycle:
        """The lifecycle's steps over this vault (its shred) and its stores."""
        return Lifecycle(
            self._store,
            self.shred,
            self._clock,
            policy,
            retained=self.parts.retained,
            on_batch=on_batch,
            activity=self.activity,
            notices=self.disclosures.queue_correction_notices,
        )

    @property
    def leases(self) -> LeaseStore:
        """The lease the sidecars elect their leader by."""
        return self._store

    @property
    def outbox(self) -> MailOutbox:
        """The outbox the mail relay sends from (ids and sealed params only)."""
        return self._store

    @property
    def clock(self) -> Clock:
        return self._clock

    @property
    def password_stats(self) -> PasswordStats:
        """What the password hasher did so far (jobs admitted, refused, in flight)."""
        return self._hasher.stats

    # --- members -----------------------------------------------------------------
    async def sign_up(self, new: NewMember) -> str:
        plain, consents = self._checked_new_member(new)
        request = self._idempotency.request(SIGN_UP, new.request_id, _sign_up_fields(new))
        if (first := await self._idempotency.replay(request)) is not None:
            return first  # a retry: the first answer, nothing written again
        encoded_hash = await self._hasher.hash(plain["password_hash"])
        plain["password_hash"] = encoded_hash
        member_id = ids.new_member_id()
        material = _hazmat.new_key_material()
        dek = _hazmat.SecretKey(FIRST_DEK_ID, material)
        now = self._clock.now()
        ciphertexts = {
            f: member_cipher.seal(dek, member_id, f, value) for f, value in plain.items()
        }
        indexes = {
            "login_id": self._indexes.login_id(plain["login_id"]),
            "email": self._indexes.email(plain["email"]),
        }
        consent_rows = tuple(
            ConsentRow(key, granted, self._settings.policy_version, now)
            for key, granted in sorted(consents.items())
        )

        async def insert(key_row: MemberKeyRow) -> None:
            await self._store.insert_member(
                MemberRow(member_id, now, now, ciphertexts, indexes, key_row, consent_rows),
                self._idempotency.key(request, member_id),
                caller=current_caller(),
            )

        try:
            await self._member_keys.insert_under_active(member_id, FIRST_DEK_ID, material, insert)
        except AlreadyExists:
            # A concurrent retry of the same request won: its answer is ours.
            if (first := await self._idempotency.replay(request)) is not None:
                return first
            raise
        self._member_keys.cache_key(member_id, dek)
        # A new account starts with no failures (guesses at the ID before it existed).
        await self._store.clear_login_failures(indexes["login_id"])
        self.activity.sign_ups += 1
        log.info("member_signed_up")
        return member_id

    def _checked_new_member(self, new: NewMember) -> tuple[dict[str, str], dict[str, bool]]:
        """The sign-up's fields to encrypt (the password still plain) and its consents."""
        v = Violations()
        login_id = policy.check_login_id(new.login_id, v)
        password = policy.check_password(new.password, v, login_id=new.login_id)
        name = policy.check_name(new.name, v)
        email = policy.check_email(new.email, v)
        mobile = policy.check_mobile_phone(new.mobile_phone, v) if new.mobile_phone else ""
        policy.check_birth_date(new.birth_date, self._clock.now().date(), v)
        consents = check_answers(self._purposes, new.consents, v, "consents", sign_up=True)
        check_request_id(new.request_id, v)
        v.raise_if_any()
        assert login_id
        assert password
        assert name
        assert email
        assert mobile is not None
        return {
            "login_id": login_id,
            "password_hash": password,
            "name": name,
            "email": email,
            "mobile_phone": mobile,
        }, consents

    async def authenticate(
        self, login_id: str, password: str, client_ip: str, *, ip_field: str = "x-client-ip"
    ) -> Login:
        """Check the password; on success one transaction records the login and
        starts a session (its token is in the result)."""
        v = Violations()
        checked_login = policy.check_login_id(login_id, v)
        if not password:
            v.add("password", "must not be empty")
        ip = policy.check_ip(client_ip, v, field=ip_field)
        v.raise_if_any()
        assert checked_login
        assert ip

        login_hmac = self._indexes.login_id(checked_login)
        row = await self._store.find_member("login_id", login_hmac)
        # Unknown, wrong or locked: one error after the same work (vault.login_guard).
        found = None if row is None else (row, await self._member_keys.dek(row.key))
        encoded = await self._guard.check(login_hmac, found, password, ip, LOGIN_FAILED)
        assert found is not None  # check() refuses an unknown login ID
        row, dek = found
        rehash = None
        if self._hasher.needs_rehash(encoded):
            # Refused (Overloaded): the login stands; the upgrade waits for a later one.
            with contextlib.suppress(Overloaded):
                rehash = await self._hasher.hash(password)
        # Written only by the attempt that commits: a retry rolls it back with the rest.
        token, session = self.sessions.new(row.member_id)

        async def record(current: MemberRow, key: _hazmat.SecretKey) -> bool:
            mid = current.member_id
            return await self._store.record_login(
                mid,
                member_cipher.seal_access(key, mid, self._clock.now(), "authenticate", ip),
                None if rehash is None else member_cipher.seal(key, mid, "password_hash", rehash),
                dek_id=current.key.dek_id,
                session=session,
            )

        try:
            await self._member_keys.under_current_key(row.member_id, record, first=(row, dek))
        except NotFound:
            raise AuthenticationFailed from None  # shredded between the lookup and now
        return Login(row.member_id, token)

    async def get_member(
        self, member_id: str, purpose: str, *, purpose_field: str = "purpose"
    ) -> MemberView:
        """The member as ``purpose`` (a catalogue key) may see them. The consent check
        and the correction freeze read what the member row's own query brought (no
        cache, no second query): PurposeNotAllowed without a grant, ConsentOutdated
        for a grant a policy version in force has made outdated, CorrectionPending
        when a field the purpose reads is under a pending correction."""
        spec = self._purposes.get(purpose)
        if spec is None:
            raise InvalidInput([FieldViolation(purpose_field, "must name a purpose")])
        if spec.key == Purpose.STATISTICS:
            # Section 3(3): aggregates over consenting members, never one member.
            raise InvalidInput([FieldViolation(purpose_field, policy.STATISTICS_READ)])
        row = await load_member(self._store, member_id)
        now = self._clock.now()
        self._purposes.check_read(spec, row.consents, now)
        allowed = spec.fields
        # Section 7: fields under a pending correction are the member's own only. The
        # whole read is refused (not answered without them): a caller must not take
        # a partial answer for the member's data.
        if row.frozen and spec.key != Purpose.MEMBER_REQUEST:
            refuse_frozen(row, allowed)
        if not allowed:  # a configured purpose of no fields: nothing to decrypt
            view = MemberView(
                row.member_id, row.created_at, row.last_seen_at, consents=row.consents
            )
        else:
            view = await self._member_keys.read_under_key(
                row, lambda r, dek: member_view(r, allowed, dek)
            )
        if any(c.reconsent_due_at is not None for c in row.consents):  # rare: no cost else
            outdated = frozenset(c.purpose for c in row.consents if consent_outdated(c, now))
            view = dataclasses.replace(view, outdated_purposes=outdated)
        return view

    async def update_member(self, member_id: str, changes: MemberChanges) -> MemberView:
        """Correct the named fields; the answer is the MEMBER_REQUEST view (the caller
        holds the member's session). A new e-mail needs the current password, and a
        notice of the change goes to the old address (email_changed_notice)."""
        v = Violations()
        mid = policy.check_member_id(member_id, v)
        new_values = checked_changes(changes, v)
        v.raise_if_any()
        assert mid
        email = new_values.get("email")
        if email is not None:
            row = await load_member(self._store, mid)
            dek = await self._member_keys.dek(row.key)
            await self._check_password(dek, row, changes.current_password or "")
        indexes = {"email": self._indexes.email(email)} if email is not None else None
        now = self._clock.now()
        corrected: set[str] = set()

        async def write(row: MemberRow, key: _hazmat.SecretKey) -> bool:
            corrected.clear()
            corrected.update(row.frozen & new_values.keys())
            ciphertexts = {
                f: member_cipher.seal(key, mid, f, value) for f, value in new_values.items()
            }
            notice = None
            if email is not None:  # sealed from the row written over: the old address
                notice = email_changed_notice(key, row, self._clock.now())
            # Releases the pending corrections of these fields (the update is the
            # member's, by their session) in the same transaction; a correction
            # it completes is marked as owing its notices (section 7), which the
            # sidecar queues: nothing is lost if we stop right after the commit.
            return await self._store.update_member(
                mid,
                ciphertexts,
                indexes,
                dek_id=row.key.dek_id,
                notify=notice,
                corrected_at=now,
                corrected_by=BY_MEMBER,
            )

        await self._member_keys.under_current_key(mid, write)
        log.info("member_updated", fields=sorted(new_values), corrected=sorted(corrected))
        return await self.get_member(mid, Purpose.MEMBER_REQUEST)

    async def change_password(self, member_id: str, current: str, new: str) -> None:
        v = Violations()
        mid = policy.check_member_id(member_id, v)
        if not current:
            v.add("current_password", "must not be empty")
        policy.check_password(new, v, "new_password")
        v.raise_if_any()
        assert mid
        row = await load_member(self._store, mid)
        dek = await self._member_keys.dek(row.key)
        login_id = open_member_field(dek, row, "login_id")
        if new.casefold() == login_id.casefold():
            raise InvalidInput([FieldViolation("new_password", "must differ from the login ID")])
        await self._check_password(dek, row, current)
        encoded = await self._hasher.hash(new)

        # The member's sessions end in the write's own transaction.
        await self._recovery.store_password(mid, encoded, "change", first=(row, dek))
        log.info("member_password_changed")

    async def withdraw(self, member_id: str, password: str) -> WithdrawalOutcome:
        v = Violations()
        mid = policy.check_member_id(member_id, v)
        if not password:
            v.add("password", "must not be empty")
        v.raise_if_any()
        assert mid
        row = await load_member(self._store, mid)
        await self._check_password(await self._member_keys.dek(row.key), row, password)
        if self.retention.enabled:
            retained_until = await self.retention.withdraw(mid)
            self.activity.shredded(WITHDRAWAL)
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
                    member_id,
                    self._clock.now(),
                    reason,
                    last_seen_before=last_seen_before,
                    withdrawal=reason == WITHDRAWAL,  # counted in the statistics
                )
                break
            except Conflict:
                # Rolled back whole in a conflict: the shred's own checks (the member
                # is there, not connected since) run again.
                if attempt == KEY_CHANGE_RETRIES - 1:
                    raise
        self._member_keys.evict(member_id)
        if record is None:
            raise NotFound
        self.activity.shredded(reason)
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
                    opened[bare] = member_cipher.open_text(
                        dek,
                        r.member_id,
                        sealed_field(message.message_id, bare),
                        base64.b64decode(value, validate=True),
                    )
            return await member_view(r, wanted, dek), opened

        try:
            row = await load_member(self._store, member_id)
            view, opened = await self._member_keys.read_under_key(row, read)
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

    async def record_access(
        self, member_id: str, action: str, ip: str, request_id: str = ""
    ) -> None:
        v = Violations()
        mid = policy.check_member_id(member_id, v)
        checked_action = policy.check_action(action, v)
        checked_ip = policy.check_ip(ip, v)
        check_request_id(request_id, v)
        v.raise_if_any()
        assert mid
        assert checked_action
        assert checked_ip
        idem = self._idempotency
        request = idem.request(RECORD_ACCESS, request_id, [mid, checked_action, checked_ip])
        if await idem.replay(request) is not None:
            return  # a retry: recorded the first time

        async def write(row: MemberRow, key: _hazmat.SecretKey) -> bool:
            entry = member_cipher.seal_access(
                key, mid, self._clock.now(), checked_action, checked_ip
            )
            return await self._store.append_access(
                mid, entry, dek_id=row.key.dek_id, idempotency=idem.key(request, mid)
            )

        try:
            await self._member_keys.under_current_key(mid, write)
        except AlreadyExists:
            if await idem.replay(request) is None:  # a concurrent retry won
                raise

    async def list_access(self, member_id: str, page_size: int, page_token: str) -> AccessPage:
        v = Violations()
        mid = policy.check_member_id(member_id, v)
        opener = None if mid is None else partial(decode_page_token, self._page_token_key, mid)
        size, cursor = checked_page(page_size, page_token, opener, "ListAccessHistory", v)
        v.raise_if_any()
        assert mid

        async def read(row: MemberRow, dek: _hazmat.SecretKey) -> AccessPage:
            # One extra row tells whether another page exists.
            rows = await self._store.list_access(mid, size + 1, cursor)
            entries = tuple(open_access_entry(dek, mid, r) for r in rows[:size])
            token = (
                encode_page_token(self._page_token_key, mid, rows[size - 1])
                if len(rows) > size
                else ""
            )
            return AccessPage(entries, token)

        return await self._member_keys.read_under_key(await load_member(self._store, mid), read)

    # --- account recovery and export (components of their own) ----------------------
    async def find_login_id(self, email: str) -> None:
        """Mail the login ID to ``email`` if a member has it; the same otherwise."""
        await self._recovery.find_login_id(email)

    async def start_password_reset(self, *, login_id: str = "", email: str = "") -> None:
        """Mail a single-use reset token to the member named by login ID or e-mail."""
        await self._recovery.start_password_reset(login_id=login_id, email=email)

    async def complete_password_reset(self, token: str, new_password: str) -> None:
        """Set a new password with a token from start_password_reset; the member's
        sessions end and every lock lifts with the old password (one transaction)."""
        await self._recovery.complete_password_reset(token, new_password)

    async def settle(self) -> None:
        """Wait for work started after answering (tests, and a clean close)."""
        await self._recovery.settle()

    async def export_member(self, member_id: str) -> str:
        """The member's whole record as one JSON document (see vault.export)."""
        return await self._export.export_member(member_id)

    def stream_member(self, member_id: str) -> AsyncGenerator[str, None]:
        """export_member's document in pieces, for a member of any history size."""
        return self._export.stream_member(member_id)

    async def _check_password(self, dek: _hazmat.SecretKey, row: MemberRow, password: str) -> None:
        """Every password check but Authenticate's: it counts toward the same lock."""
        await self._guard.check(row.blind_indexes["login_id"], (row, dek), password)


def _sign_up_fields(new: NewMember) -> list[object]:
    """What a sign-up's request id is bound to: every field as sent."""
    consents = sorted((str(c.purpose), c.granted) for c in new.consents)
    return [
        new.login_id,
        new.password,
        new.name,
        new.email,
        new.birth_date,
        new.mobile_phone,
        consents,
    ]
