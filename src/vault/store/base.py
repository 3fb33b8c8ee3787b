"""The storage contract: what the vault asks of a database, and nothing more.

A store sees only ciphertexts, HMACs, wrapped keys and timestamps; it never
encrypts, decrypts or sees a plaintext. Each backend (``sqlite``, ``postgres``)
is one module implementing :class:`Store`, and both pass
``tests/test_store_contract.py``.

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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal, Protocol

# The encrypted member columns, in a fixed order. Names double as the field
# names bound into each ciphertext's associated data.
ENCRYPTED_FIELDS: tuple[str, ...] = ("login_id", "password_hash", "name", "email", "mobile_phone")
# Fields with a blind index (HMAC) for uniqueness and lookup.
INDEXED_FIELDS: tuple[str, ...] = ("login_id", "email")

KekState = Literal["active", "decrypt_only", "destroyed"]
IndexedField = Literal["login_id", "email"]


@dataclass(frozen=True, slots=True)
class KekVersionRow:
    version: int
    state: KekState
    created_at: datetime
    destroyed_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class IndexKeyRow:
    """The blind-index HMAC key, wrapped under a KEK version."""

    key_id: int
    kek_version: int
    wrapped_key: bytes
    created_at: datetime


@dataclass(frozen=True, slots=True)
class MemberKeyRow:
    """A member's data-encryption key, wrapped under a KEK version."""

    member_id: str
    dek_id: int
    kek_version: int
    wrapped_dek: bytes


@dataclass(frozen=True, slots=True)
class ConsentRow:
    purpose: str
    granted: bool
    policy_version: str
    recorded_at: datetime


@dataclass(frozen=True, slots=True)
class MemberRow:
    member_id: str
    created_at: datetime
    last_seen_at: datetime
    # Field name (one of ENCRYPTED_FIELDS) -> ciphertext. Every field is present;
    # an absent optional field is the encryption of an empty string, so a row
    # does not tell whether a member gave a mobile phone.
    ciphertexts: Mapping[str, bytes]
    # Field name (one of INDEXED_FIELDS) -> HMAC.
    blind_indexes: Mapping[str, bytes]
    key: MemberKeyRow
    # One per purpose, in purpose order. Read with the member (one round trip
    # for the hot GetMember path) and inserted with it.
    consents: tuple[ConsentRow, ...] = ()


@dataclass(frozen=True, slots=True)
class NewAccessEntry:
    at: datetime
    action_ct: bytes
    ip_ct: bytes


@dataclass(frozen=True, slots=True)
class AccessEntryRow:
    entry_id: int
    at: datetime
    action_ct: bytes
    ip_ct: bytes


@dataclass(frozen=True, slots=True)
class DestructionRecord:
    """Proof that a member was destroyed. Carries no personal data."""

    member_id: str
    destroyed_at: datetime
    reason: str
    # What was destroyed, e.g. {"member": 1, "member_keys": 1, "access_log": 12}.
    items: Mapping[str, int] = field(default_factory=dict)
    # The KEK versions that wrapped the destroyed DEKs: once each is destroyed,
    # backups holding the wrapped DEK are undecryptable too.
    kek_versions: tuple[int, ...] = ()
    # A withdrawal with retention: what the member entered was moved to the
    # separated storage until this time (a second record follows its destruction).
    retained_until: datetime | None = None


@dataclass(frozen=True, slots=True)
class KekUsage:
    """How many keys a KEK version still wraps."""

    version: int
    member_keys: int
    index_keys: int
    #: Withdrawn members' DEKs in the separated retention storage (KeyAdmin adds them).
    retained_keys: int = 0


@dataclass(frozen=True, slots=True)
class RetentionCheck:
    """A withdrawal into retention copied the member as read; the shred that follows
    must find the member exactly so, or the copy is stale (KeyChanged: read again).

    The copy's DEK is wrapped under ``kek_version``, which must still be the active
    version when the shred commits: a version can only be destroyed once it is no
    longer active, so the key guard, which counts retained keys, is sure to see it.
    """

    dek_id: int
    ciphertexts: Mapping[str, bytes]  # every ENCRYPTED_FIELDS ciphertext as read
    access_entry_ids: frozenset[int]
    kek_version: int
    retained_until: datetime


@dataclass(frozen=True, slots=True)
class RewrapUpdate:
    """A member DEK re-wrapped from one KEK version to another (same DEK, same id)."""

    member_id: str
    dek_id: int
    from_version: int
    to_version: int
    wrapped_dek: bytes


@dataclass(frozen=True, slots=True)
class KeyEvent:
    """A key operation, for the security team's audit trail. Never key bytes."""

    at: datetime
    actor: str
    operation: str
    kek_version: int | None = None
    member_id: str | None = None
    # Counts and outcomes, e.g. {"rewrapped": 1000}.
    details: Mapping[str, int | str | bool] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    """An e-mail to send, written in the same transaction as its cause.

    It names its recipient by member id only: the address (and any personal data
    in the text) is resolved at send time, so mail for a member shredded in
    between is dropped, and the outbox itself holds no personal data.
    """

    message_id: str  # stable across retries: the Message-ID header
    member_id: str
    kind: str  # e.g. "inactivity_notice", "password_changed"
    params: Mapping[str, str]  # template parameters without personal data (dates, counts)
    created_at: datetime
    attempts: int = 0
    next_attempt_at: datetime | None = None


#: What :meth:`Store.queue_recovery_mail` did: queued the mail, or wrote nothing
#: because the member is gone or already had its hour's recovery mails.
RecoveryMailOutcome = Literal["queued", "no_member", "limited"]


@dataclass(frozen=True, slots=True)
class NewPasswordReset:
    """A reset token's hash (32 bytes, SHA-256; never the token) and its expiry."""

    token_hash: bytes
    expires_at: datetime

    def __repr__(self) -> str:
        return f"<NewPasswordReset expires_at={self.expires_at.isoformat()}>"


# What a withdrawal keeps in the separated storage: what the member entered, less
# the password hash (no retention purpose needs it: data minimisation).
RETAINED_FIELDS: tuple[str, ...] = ("login_id", "name", "email", "mobile_phone")


@dataclass(frozen=True, slots=True)
class RetainedMember:
    """A withdrawn member's data in the separated storage, still ciphertext under the
    member's own DEK (re-wrapped under the KEK version active at the move)."""

    member_id: str
    retained_at: datetime
    destroy_after: datetime
    reason: str  # the retention rule's stated reason (its legal basis); no PII
    key: MemberKeyRow
    ciphertexts: Mapping[str, bytes]  # exactly RETAINED_FIELDS
    consents: tuple[ConsentRow, ...] = ()
    access_log: tuple[AccessEntryRow, ...] = ()
    #: Which withdrawal attempt wrote the copy: only that attempt may replace it.
    attempt: str = ""
    #: False until the vault's shred committed; an unconfirmed copy left by a crash
    #: in between is reconciled by the sidecar.
    confirmed: bool = False

    def __repr__(self) -> str:
        return f"<RetainedMember {self.member_id}>"


@dataclass(frozen=True, slots=True)
class RetainedSummary:
    """A retained member as the privacy officer's list shows it: no ciphertexts."""

    member_id: str
    retained_at: datetime
    destroy_after: datetime
    reason: str
    confirmed: bool
    kek_version: int
    access_entries: int


@dataclass(frozen=True, slots=True)
class RetentionEvent:
    """Who did what to retained data, and why (a disclosure, an early destruction)."""

    at: datetime
    actor: str
    operation: str
    member_id: str
    basis: str  # the stated legal basis or reason, as the officer gave it


class RetentionStore(Protocol):
    """The separated storage for withdrawn members' retained data (policy section 6):
    a database of its own, which no member API reads. Same conventions as Store.

    Its wrapped DEKs are under the vault's KEK versions, so key management re-wraps
    them (``member_keys_to_rewrap`` / ``apply_rewrap``, as on Store) and the destroy
    guard counts them (``kek_usage``).
    """

    async def close(self) -> None: ...

    async def migrate(self) -> list[int]: ...

    async def put_retained(self, member: RetainedMember, stale_before: datetime) -> bool:
        """Insert the copy unconfirmed, in one transaction. An unconfirmed copy of the
        same member is replaced if the same attempt wrote it (a retry after
        KeyChanged) or it was made before ``stale_before`` (a crash's leftover; the
        caller has just seen the member alive in the vault). False, with nothing
        changed, if a confirmed copy or another attempt's recent copy is there."""
        ...

    async def confirm_retained(self, member_id: str) -> bool:
        """Mark the copy confirmed (the vault's shred committed). False if none."""
        ...

    async def get_retained(self, member_id: str) -> RetainedMember | None: ...

    async def list_retained(
        self, limit: int, after_member_id: str | None = None
    ) -> list[RetainedSummary]:
        """Confirmed and unconfirmed copies by member id, after the cursor when given."""
        ...

    async def retained_due(self, now: datetime, limit: int) -> list[str]:
        """Confirmed copies whose destroy-after time is at or before ``now``, oldest
        first (indexed: a sweep costs what is due)."""
        ...

    async def unconfirmed_before(self, before: datetime, limit: int) -> list[str]:
        """Unconfirmed copies made before ``before`` (left by a crash)."""
        ...

    async def delete_retained(self, member_id: str, *, attempt: str | None = None) -> bool:
        """Destroy the copy (its wrapped DEK with it) in one transaction, then scrub
        what the backend can; False if there was none. With ``attempt``, only an
        unconfirmed copy that attempt wrote."""
        ...

    async def purge_access_log(self, before: datetime, limit: int) -> int:
        """As Store.purge_access_log: the 6-month rule holds in retention too."""
        ...

    async def count_access_log_before(self, before: datetime) -> int: ...

    async def kek_usage(self) -> list[KekUsage]:
        """Per KEK version holding retained DEKs: ``retained_keys`` counts them."""
        ...

    async def member_keys_to_rewrap(
        self, target_version: int, after_member_id: str | None, limit: int
    ) -> list[MemberKeyRow]: ...

    async def apply_rewrap(self, updates: Sequence[RewrapUpdate]) -> int: ...

    async def record_event(self, event: RetentionEvent) -> None: ...

    async def list_events(self, member_id: str | None = None) -> list[RetentionEvent]:
        """Oldest first."""
        ...


class Store(Protocol):
    """One database holding the vault. See the module docstring for conventions."""

    async def close(self) -> None: ...

    async def migrate(self) -> list[int]:
        """Apply pending migrations; return the versions applied now (idempotent)."""
        ...

    # --- key hierarchy -------------------------------------------------------
    async def list_kek_versions(self) -> list[KekVersionRow]:
        """Every KEK version, oldest first."""
        ...

    async def insert_kek_version(self, row: KekVersionRow) -> bool:
        """Add a version; False if that version number exists already."""
        ...

    async def get_index_key(self) -> IndexKeyRow | None: ...

    async def insert_index_key(self, row: IndexKeyRow) -> IndexKeyRow:
        """Store the index key unless one exists; return the one that is stored.

        Two processes bootstrapping at once both get the same key back.
        """
        ...

    async def rotate_kek(self, version: int, at: datetime) -> KekVersionRow:
        """In one transaction, demote the active version to decrypt_only and add
        ``version`` as the active one. PreconditionFailed if ``version`` exists."""
        ...

    async def destroy_kek_version(self, version: int, at: datetime) -> KekVersionRow:
        """Mark a version destroyed, guarded in the same transaction: NotFound if it
        does not exist; PreconditionFailed (saying why) if it is active or any member
        DEK or index key is still wrapped under it. Idempotent for a destroyed one."""
        ...

    async def kek_usage(self) -> list[KekUsage]:
        """Per version (every version, oldest first), the keys wrapped under it."""
        ...

    async def member_keys_to_rewrap(
        self, target_version: int, after_member_id: str | None, limit: int
    ) -> list[MemberKeyRow]:
        """Up to ``limit`` member keys not under ``target_version``, by member id,
        strictly after ``after_member_id`` when given (a resumable scan)."""
        ...

    async def apply_rewrap(self, updates: Sequence[RewrapUpdate]) -> int:
        """Store re-wrapped DEKs in one transaction, each only if the row still has
        the same dek_id and from_version (else it is skipped: someone else moved
        it). Returns how many rows were updated."""
        ...

    async def rewrap_index_key(
        self, key_id: int, from_version: int, to_version: int, wrapped_key: bytes
    ) -> bool:
        """Conditional like apply_rewrap; False if the key had already moved."""
        ...

    async def replace_member_key(
        self,
        member_id: str,
        old_dek_id: int,
        new_key: MemberKeyRow,
        ciphertexts: Mapping[str, bytes],
        access_log: Mapping[int, tuple[bytes, bytes]],
        *,
        old_ciphertexts: Mapping[str, bytes],
    ) -> bool:
        """Per-member DEK rotation, atomically: the new key row, every field
        ciphertext, and every access-log entry (entry_id -> (action_ct, ip_ct))
        re-encrypted. Only if the member still has ``old_dek_id``, exactly these
        access-log entries, and field ciphertexts equal to ``old_ciphertexts`` (what
        the caller re-encrypted: a field written meanwhile under the old DEK must not
        be overwritten by its stale value); False otherwise (retry with fresh data)."""
        ...

    async def record_key_event(self, event: KeyEvent) -> None: ...

    async def list_key_events(self, limit: int = 100) -> list[KeyEvent]:
        """Newest first."""
        ...

    # --- members ---------------------------------------------------------------
    async def insert_member(self, member: MemberRow) -> None:
        """Insert the member, its key and its consents in one transaction.
        PreconditionFailed if the key's KEK version has been destroyed meanwhile."""
        ...

    async def get_member(self, member_id: str) -> MemberRow | None:
        """The member with its key and consents."""
        ...

    async def find_member(self, index: IndexedField, hmac: bytes) -> MemberRow | None:
        """Look a member up by blind index."""
        ...

    async def update_member(
        self,
        member_id: str,
        ciphertexts: Mapping[str, bytes],
        blind_indexes: Mapping[str, bytes] | None = None,
        *,
        dek_id: int,
        notify: OutboxMessage | None = None,
    ) -> bool:
        """Replace the named ciphertexts (and blind indexes), encrypted under the
        member's DEK ``dek_id``. False if no such member; KeyChanged if the member's
        DEK has been rotated meanwhile (the ciphertexts would be unreadable).

        ``notify`` (for the same member) is enqueued in the same transaction: it
        is written exactly when the update is, never without it."""
        ...

    async def record_login(
        self,
        member_id: str,
        entry: NewAccessEntry,
        password_hash_ct: bytes | None = None,
        *,
        dek_id: int,
    ) -> bool:
        """Set last_seen_at to ``entry.at``, append ``entry`` to the access log and,
        when given, replace the password hash (a rehash). One transaction; False
        if no such member; KeyChanged as for update_member."""
        ...

    async def list_consents(self, member_id: str) -> list[ConsentRow]:
        """The member's consents, one per purpose, in purpose order."""
        ...

    # --- access log ------------------------------------------------------------
    async def append_access(self, member_id: str, entry: NewAccessEntry, *, dek_id: int) -> bool:
        """False if no such member; KeyChanged as for update_member."""
        ...

    async def list_access(
        self,
        member_id: str,
        limit: int,
        before: tuple[datetime, int] | None = None,
    ) -> list[AccessEntryRow]:
        """Entries newest first (by ``at``, then ``entry_id``), strictly older than
        the ``(at, entry_id)`` cursor when given."""
        ...

    # --- destruction -----------------------------------------------------------
    async def shred_member(
        self,
        member_id: str,
        destroyed_at: datetime,
        reason: str,
        *,
        last_seen_before: datetime | None = None,
        retention: RetentionCheck | None = None,
    ) -> DestructionRecord | None:
        """Crypto-shred: in one transaction delete the member's DEK rows, blind
        indexes, ciphertexts, consents, access log, pending mail and password
        reset tokens; leave a tombstone and a
        destruction record. Then scrub what the backend can (SQLite: WAL
        checkpoint). None if no such member (already shredded or never was), or if
        ``last_seen_before`` is given and the member connected at or after it (checked
        in the same transaction: an expiry never shreds a member who just logged in).

        With ``retention`` (a withdrawal whose data was copied to the retention
        store), the record carries ``retained_until``; KeyChanged, with nothing
        changed, if the member no longer matches the check (see RetentionCheck)."""
        ...

    async def record_destruction(
        self, record: DestructionRecord, *, unless: Sequence[str] = ()
    ) -> bool:
        """Add a destruction record for something destroyed elsewhere (the retained
        copy), unless the member already has one with the same reason or one of the
        ``unless`` reasons (the same destruction recorded by another path): False then."""
        ...

    async def is_destroyed(self, member_id: str) -> bool:
        """Whether a tombstone exists for the member."""
        ...

    async def list_destruction_records(
        self, member_id: str | None = None
    ) -> list[DestructionRecord]:
        """Destruction records, oldest first; only the member's when given."""
        ...

    # --- lifecycle (the sidecar) -------------------------------------------------
    async def acquire_lease(self, name: str, holder: str, now: datetime, ttl: timedelta) -> bool:
        """Take or renew the lease row ``name`` for ``holder`` until now + ttl, if it
        is free, expired, or already ``holder``'s. One portable conditional write
        (no advisory locks): of two sidecars, exactly one gets True."""
        ...

    async def release_lease(self, name: str, holder: str) -> None: ...

    async def members_due_for_notice(
        self, last_seen_before: datetime, limit: int
    ) -> list[tuple[str, datetime]]:
        """(member_id, last_seen_at) of members inactive since before the cutoff who
        have no pending inactivity notice, oldest first (indexed; the sweep's cost
        follows the due members, not the total)."""
        ...

    async def record_inactivity_notice(
        self, member_id: str, last_seen_at: datetime, message: OutboxMessage
    ) -> bool:
        """Mark the notice sent and enqueue its e-mail in one transaction, only if
        the member's last_seen_at is still ``last_seen_at`` (no login since) and no
        notice is pending. False otherwise."""
        ...

    async def members_due_for_expiry(
        self, last_seen_before: datetime, noticed_before: datetime, limit: int
    ) -> list[str]:
        """Members inactive since before ``last_seen_before`` whose notice went out
        before ``noticed_before`` (a login clears the notice), oldest first."""
        ...

    async def purge_access_log(self, before: datetime, limit: int) -> int:
        """Delete access-log entries older than ``before``; returns how many. Called in a
        loop until it returns less than ``limit``. Each call deletes at most ``limit``
        rows one by one in a short transaction; PostgreSQL first drops whole monthly
        partitions that lie entirely before ``before`` (their rows count too, so such a
        call can return more than ``limit``)."""
        ...

    async def count_access_log_before(self, before: datetime) -> int:
        """How many access-log entries are older than ``before`` (a dry run's count)."""
        ...

    # --- account recovery --------------------------------------------------------
    async def create_password_reset(
        self, token_hash: bytes, member_id: str, expires_at: datetime, message: OutboxMessage
    ) -> bool:
        """Store a reset token's hash (32 bytes, SHA-256; never the token) and enqueue
        its e-mail ``message`` (for the same member) in one transaction. False, with
        nothing written, if the member is gone."""
        ...

    async def consume_password_reset(self, token_hash: bytes, now: datetime) -> str | None:
        """Atomically mark the token used and return its member id; None (and no
        change) if it is unknown, already used, or expired at ``now``. Of two
        concurrent calls with one token, at most one gets the member id."""
        ...

    async def enqueue_outbox(self, message: OutboxMessage) -> bool:
        """Add a message unless its member is gone; False then."""
        ...

    async def due_outbox(self, now: datetime, limit: int) -> list[OutboxMessage]:
        """Messages whose next attempt is due, oldest first."""
        ...

    async def outbox_sent(self, message_id: str) -> None:
        """Remove a message that was delivered (or dropped)."""
        ...

    async def outbox_retry(
        self, message_id: str, attempts: int, next_attempt_at: datetime
    ) -> None: ...

    async def queue_recovery_mail(
        self,
        message: OutboxMessage,
        *,
        limit: int,
        since: datetime,
        reset: NewPasswordReset | None = None,
    ) -> RecoveryMailOutcome:
        """Enqueue an account-recovery mail (a login-ID reminder; with ``reset``, a
        password reset and its token's hash, in the same transaction) unless the
        member is gone (``"no_member"``) or already had ``limit`` recovery mails
        queued after ``since`` (``"limited"``); then nothing is written. The count
        and the insert are one atomic step: concurrent calls, from any replica,
        never queue more than ``limit`` (``limit`` >= 1; the count is per member,
        kept in the database, and holds only times)."""
        ...

    async def find_password_reset(self, token_hash: bytes, now: datetime) -> str | None:
        """The member id of a token that is unused and unexpired at ``now``, without
        using it (only :meth:`consume_password_reset` does that); None otherwise."""
        ...


async def whole_access_log(store: Store, member_id: str, page: int = 1000) -> list[AccessEntryRow]:
    """Every access-log entry of the member, newest first, read page by page."""
    entries: list[AccessEntryRow] = []
    cursor: tuple[datetime, int] | None = None
    while True:
        rows = await store.list_access(member_id, page, cursor)
        entries.extend(rows)
        if len(rows) < page:
            return entries
        cursor = (rows[-1].at, rows[-1].entry_id)
