"""The vault's member types and settings (a member row is read by
:func:`vault.member_rows.load_member`).

Shared by the facade and the components it delegates to (recovery, export), so
none of them imports the facade.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import structlog

from vault import _hazmat, member_cipher, policy
from vault.login_guard import LoginGuardSettings
from vault.policy import ConsentChoice, Violations
from vault.purposes import DEFAULT_CATALOGUE, PurposeCatalogue
from vault.retention import RetentionRule
from vault.statistics import StatisticsSettings
from vault.store.base import ConsentRow, MemberRow

#: The vault's logger (the facade's, recovery's and export's events).
log = structlog.get_logger("vault")

#: The longest a password reset token may live (issue 4: "expiring within 30 minutes").
MAX_PASSWORD_RESET_TTL = timedelta(minutes=30)
#: Bounds on the member-session settings (a token is a bearer credential).
MAX_SESSION_LIFETIME = timedelta(days=30)
MAX_SESSIONS_PER_MEMBER = 1000
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
    #: A member session (vault.sessions) ends this long after its last use, and
    #: this long after the login whatever its use; a login past sessions_per_member
    #: live sessions ends the member's oldest.
    session_idle: timedelta = timedelta(minutes=15)
    session_lifetime: timedelta = timedelta(hours=12)
    sessions_per_member: int = 20
    #: Failure counters, lockouts and the per-IP throttle (vault.login_guard).
    login_guard: LoginGuardSettings = field(default_factory=LoginGuardSettings)
    #: The purposes reads may state (vault.purposes): the built-in ones by default.
    purposes: PurposeCatalogue = DEFAULT_CATALOGUE
    #: GetStatistics' minimum cell size and longest date range (vault.statistics).
    statistics: StatisticsSettings = field(default_factory=StatisticsSettings)

    def __post_init__(self) -> None:
        if not timedelta(0) < self.password_reset_ttl <= MAX_PASSWORD_RESET_TTL:
            raise ValueError("password_reset_ttl must be positive and at most 30 minutes")
        if self.recovery_mails_per_hour < 1 or self.recovery_queue_limit < 1:
            raise ValueError("recovery_mails_per_hour and recovery_queue_limit must be >= 1")
        if self.password_queue_limit is not None and self.password_queue_limit < 1:
            raise ValueError("password_queue_limit must be at least 1")
        if not timedelta(0) < self.session_idle <= self.session_lifetime <= MAX_SESSION_LIFETIME:
            raise ValueError("sessions need 0 < session_idle <= session_lifetime <= 30 days")
        if not 1 <= self.sessions_per_member <= MAX_SESSIONS_PER_MEMBER:
            raise ValueError("sessions_per_member must be between 1 and 1000")


@dataclass(frozen=True, slots=True)
class NewMember:
    login_id: str
    password: str
    name: str
    email: str
    birth_date: str
    mobile_phone: str | None = None
    consents: Sequence[ConsentChoice] = ()
    #: AIP-155: a retry with the same id gets the first answer ('' = not idempotent).
    request_id: str = ""

    def __repr__(self) -> str:
        return "<NewMember (personal data hidden)>"


@dataclass(frozen=True, slots=True)
class MemberChanges:
    """A correction: ``paths`` names the fields to change (a field mask)."""

    paths: frozenset[str]
    name: str | None = None
    email: str | None = None
    mobile_phone: str | None = None
    #: Required when ``email`` is in ``paths``: the e-mail is the recovery channel.
    current_password: str | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        return f"<MemberChanges paths={sorted(self.paths)}>"


def checked_changes(changes: MemberChanges, v: Violations) -> dict[str, str]:
    """The new values of a correction, checked (violations go into ``v``)."""
    # One violation however many bad paths, and never the path itself: it is the
    # caller's text, and 7,000 of them made a trailer no client would accept.
    if changes.paths - {"name", "email", "mobile_phone"}:
        v.add(
            "update_mask", "names a field that cannot be updated; use name, email or mobile_phone"
        )
    if not changes.paths:
        v.add("update_mask", "must name at least one field")
    new_values: dict[str, str] = {}
    if "name" in changes.paths and (name := policy.check_name(changes.name or "", v)):
        new_values["name"] = name
    if "email" in changes.paths:
        if email := policy.check_email(changes.email or "", v):
            new_values["email"] = email
        if not changes.current_password:
            v.add("current_password", "is required to change the e-mail address")
    if "mobile_phone" in changes.paths:
        if changes.mobile_phone:
            if phone := policy.check_mobile_phone(changes.mobile_phone, v):
                new_values["mobile_phone"] = phone
        else:
            new_values["mobile_phone"] = ""  # removing the optional item
    return new_values


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
    #: Purposes whose grant a policy version in force has made outdated.
    outdated_purposes: frozenset[str] = frozenset()

    def __repr__(self) -> str:
        return f"<MemberView {self.member_id}>"


@dataclass(frozen=True, slots=True)
class AccessEntry:
    at: datetime
    action: str
    ip: str
    #: Who recorded it (a calling service's identity, "local" or "internal"); "" for
    #: entries older than callers.
    caller: str = ""

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


open_member_field = member_cipher.open_row_field


async def member_view(
    row: MemberRow, allowed: frozenset[str], dek: _hazmat.SecretKey
) -> MemberView:
    """What ``allowed`` may see of the member (a coroutine: reads run under
    MemberKeys.read_under_key)."""
    values: dict[str, str | None] = {}
    if allowed:
        for name in allowed:
            values[name] = open_member_field(dek, row, name)
        if values.get("mobile_phone") == "":
            values["mobile_phone"] = None
    return MemberView(
        member_id=row.member_id,
        created_at=row.created_at,
        last_seen_at=row.last_seen_at,
        login_id=values.get("login_id"),
        name=values.get("name"),
        email=values.get("email"),
        mobile_phone=values.get("mobile_phone"),
        consents=row.consents,
    )


class BlindIndexes:
    """The blind indexes (HMACs under the index key) members are found by."""

    __slots__ = ("_key",)

    def __init__(self, key: _hazmat.IndexKey) -> None:
        self._key = key

    def login_id(self, login_id: str) -> bytes:
        return _hazmat.blind_index(self._key, "login_id", policy.login_id_index_value(login_id))

    def email(self, email: str) -> bytes:
        return _hazmat.blind_index(self._key, "email", policy.email_index_value(email))
