"""The rows and constants the storage contract speaks in (see :mod:`vault.store.base`)."""

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

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
    """A member's current answer for one purpose (the last event of its history)."""

    purpose: str
    granted: bool
    policy_version: str
    recorded_at: datetime
    #: When a policy version published after this answer, materially changing the
    #: purpose, takes effect (the earliest such); None if none. Computed by the read.
    reconsent_due_at: datetime | None = None


#: Who recorded a consent event: the member (their session, or their sign-up).
RECORDED_BY_MEMBER = "member"


@dataclass(frozen=True, slots=True)
class NewConsent:
    """One answer to record: the purpose's key and whether it is granted."""

    purpose: str
    granted: bool


@dataclass(frozen=True, slots=True)
class ConsentEventRow:
    """One event of a member's append-only consent history."""

    event_id: int
    purpose: str
    granted: bool
    policy_version: str
    recorded_at: datetime
    #: "member", or the identity that recorded it on the member's behalf.
    recorded_by: str
    #: The calling service the event came through ("local", "internal", a SPIFFE ID).
    caller: str


@dataclass(frozen=True, slots=True)
class RecipientRow:
    """A third party registered to receive members' data (policy section 4). No
    member data: the recipient's own name, contact and terms."""

    recipient_id: str
    legal_entity: str
    contact_email: str
    #: The catalogue purposes it may receive data for, and the fields it may receive.
    purposes: tuple[str, ...]
    fields: tuple[str, ...]
    legal_basis: str
    contract_reference: str
    registered_at: datetime
    registered_by: str


#: What a disclosure rests on: the member's consent to provision, a recorded legal
#: basis, or a correction notice (the corrected value sent to a past recipient).
DisclosureBasis = Literal["consent", "legal", "correction"]


@dataclass(frozen=True, slots=True)
class NewDisclosure:
    """A ledger entry to append. ``details_ct`` is sealed under the member's DEK
    (the caller and, for a legal basis, its reference and approver), bound to
    ``entry_id`` and ``at``; the rest names no one but the member by id.
    ``entry_id`` is a random UUID made before the insert (so the sealing can bind
    to it), unique across the ledger."""

    recipient_id: str
    purpose: str
    fields: tuple[str, ...]
    basis: DisclosureBasis
    at: datetime
    details_ct: bytes
    entry_id: str


@dataclass(frozen=True, slots=True)
class DisclosureRow:
    """One entry of a member's disclosure ledger, as stored."""

    disclosure_id: int
    recipient_id: str
    purpose: str
    fields: tuple[str, ...]
    basis: DisclosureBasis
    at: datetime
    details_ct: bytes
    #: The UUID the details are sealed to (NewDisclosure.entry_id).
    entry_id: str

    def __repr__(self) -> str:
        return f"<DisclosureRow {self.disclosure_id} {self.recipient_id}>"


@dataclass(frozen=True, slots=True)
class PolicyVersionRow:
    """A published privacy policy version."""

    version: str
    published_at: datetime
    #: From then on, consents predating publication to a changed purpose are outdated.
    effective_at: datetime
    text_sha256: str
    #: The purposes whose use it materially changes (keys), sorted.
    changed_purposes: tuple[str, ...]
    published_by: str
    caller: str = ""


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
    # The fields a pending correction freezes (policy section 7), read in the same
    # statement as the member: every read but the member's own is refused them.
    frozen: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class NewAccessEntry:
    at: datetime
    action_ct: bytes
    ip_ct: bytes
    #: Who called (vault.calls), sealed like the action; None: not known.
    caller_ct: bytes | None = None


@dataclass(frozen=True, slots=True)
class AccessEntryRow:
    entry_id: int
    at: datetime
    action_ct: bytes
    ip_ct: bytes
    #: None for entries recorded before callers were known (migration 0011).
    caller_ct: bytes | None = None


#: An access-log entry's ciphertexts re-sealed under a new DEK: (action, ip, caller).
ResealedAccess = tuple[bytes, bytes, bytes | None]


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


#: The fields a correction may name: those UpdateMember can correct.
CORRECTABLE_FIELDS: tuple[str, ...] = ("name", "email", "mobile_phone")
CorrectionState = Literal["pending", "applied", "closed"]
#: A field of a correction: still frozen, corrected by an update, or closed with it.
CorrectionFieldState = Literal["pending", "corrected", "closed"]


@dataclass(frozen=True, slots=True)
class CorrectionRow:
    """A requested correction (policy section 7). The note and the closing reason
    are sealed under the member's DEK; who asked and who resolved are caller
    identities or "member"."""

    correction_id: str
    member_id: str
    requested_at: datetime
    requested_by: str
    #: Field name -> its state, in CORRECTABLE_FIELDS order.
    fields: Mapping[str, CorrectionFieldState]
    state: CorrectionState = "pending"
    note_ct: bytes | None = None
    resolved_at: datetime | None = None
    resolved_by: str | None = None
    reason_ct: bytes | None = None

    def __repr__(self) -> str:
        return f"<CorrectionRow {self.correction_id} {self.state}>"


#: A correction's note and closing reason re-sealed under a new DEK: (note, reason).
ResealedCorrection = tuple[bytes | None, bytes | None]


@dataclass(frozen=True, slots=True)
class StatisticsCounts:
    """Raw counts over members who consent to statistics (unsuppressed: the vault
    suppresses small cells before anything leaves it)."""

    members: int
    active_members: int
    #: Purpose -> members (of those counted) who consent to it.
    consents: Mapping[str, int]
    #: (day as YYYY-MM-DD, sign-ups, withdrawals) for the days that have any.
    days: tuple[tuple[str, int, int], ...]


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
    #: The consent history's event ids as copied: an event since means copy again.
    consent_event_ids: frozenset[int] = frozenset()
    #: The disclosure ledger's entry ids as copied, likewise.
    disclosure_ids: frozenset[int] = frozenset()
    #: The member's corrections as the copy holds them (a request, an update or a
    #: closure since makes the copy stale).
    corrections: tuple[CorrectionRow, ...] = ()


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
    #: The calling service (vault.calls.current_caller) beside the actor.
    caller: str = ""


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
    #: The member's consent history (oldest first), as it stood at the move.
    consent_history: tuple[ConsentEventRow, ...] = ()
    #: The member's disclosure ledger (oldest first), still sealed, as at the move.
    disclosures: tuple[DisclosureRow, ...] = ()
    corrections: tuple[CorrectionRow, ...] = ()
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
