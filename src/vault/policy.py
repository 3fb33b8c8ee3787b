"""The privacy policy's rules as code: purposes, consent, minimum age, input checks.

Section numbers refer to ``privacy-policy.txt``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from enum import StrEnum

from email_validator import EmailNotValidError, validate_email

from vault import ids
from vault.errors import FieldViolation, InvalidInput

#: Section 8: members must be at least 14 years old.
MINIMUM_AGE = 14


class Purpose(StrEnum):
    """Why personal data is read (section 3)."""

    IDENTIFICATION = "IDENTIFICATION"
    ACCOUNT_RECOVERY = "ACCOUNT_RECOVERY"
    INQUIRY = "INQUIRY"
    MEMBER_REQUEST = "MEMBER_REQUEST"
    STATISTICS = "STATISTICS"


PII_FIELDS: tuple[str, ...] = ("login_id", "name", "email", "mobile_phone")

#: The fields each purpose may read (DESIGN.md, "Purposes").
ALLOWED_FIELDS: Mapping[Purpose, frozenset[str]] = {
    Purpose.IDENTIFICATION: frozenset({"login_id", "name", "email"}),
    Purpose.ACCOUNT_RECOVERY: frozenset({"login_id", "email"}),
    Purpose.INQUIRY: frozenset({"name", "email", "mobile_phone"}),
    Purpose.MEMBER_REQUEST: frozenset(PII_FIELDS),
    # Aggregates only (StatisticsService); GetMember refuses it.
    Purpose.STATISTICS: frozenset(),
}

#: Why GetMember refuses STATISTICS (section 3(3): aggregates only).
STATISTICS_READ = (
    "STATISTICS reads no member's data; use StatisticsService.GetStatistics for aggregates"
)

#: Section 3(1): sign-up and service (identifying, re-issuing a lost ID or
#: password) is what membership is; signing up is consenting to it, and
#: refusing it means the service cannot be provided.
REQUIRED_PURPOSES: frozenset[Purpose] = frozenset(
    {Purpose.IDENTIFICATION, Purpose.ACCOUNT_RECOVERY}
)
#: Sections 1(2), 3(2), 3(3): the member may refuse these; reading for them then
#: stops. They are opt-in: no recorded grant, no use.
OPTIONAL_PURPOSES: frozenset[Purpose] = frozenset({Purpose.INQUIRY, Purpose.STATISTICS})
#: Section 7: the member's own access right needs no consent.
CONSENT_FREE_PURPOSES: frozenset[Purpose] = frozenset({Purpose.MEMBER_REQUEST})


class Violations:
    """Collects every field violation of a request, so the caller sees them all at once."""

    def __init__(self) -> None:
        self._items: list[FieldViolation] = []

    def add(self, field: str, description: str) -> None:
        self._items.append(FieldViolation(field, description))

    def raise_if_any(self) -> None:
        if self._items:
            raise InvalidInput(self._items)


_LOGIN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{3,63}")
_ACTION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,63}")
_PHONE_SEPARATORS = re.compile(r"[\s().-]")
_PHONE = re.compile(r"\+?[0-9]{7,15}")
PASSWORD_MIN, PASSWORD_MAX = 8, 256
NAME_MAX = 100
# The most characters each value may have as sent (the API's documented field
# limits, protos/privacyvault/v1/*.proto). Checked before any regex, parser or
# normalisation sees the value, so an oversized one costs nothing.
LOGIN_ID_MAX = 64
EMAIL_MAX = 254  # RFC 5321's limit on a path
MOBILE_PHONE_MAX = 32  # 15 digits, '+' and separators
BIRTH_DATE_MAX = 10  # YYYY-MM-DD
MEMBER_ID_MAX = 45  # "urn:uuid:" and a UUID, the longest spelling uuid.UUID reads
ACTION_MAX = 64
#: The longest textual IP address: IPv6 with an embedded IPv4 address,
#: "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255".
IP_MAX = 45


def has_control(text: str) -> bool:
    """Whether ``text`` holds a control, format, surrogate, private or unassigned character."""
    return any(unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Cn") for c in text)


def check_login_id(value: str, v: Violations, field: str = "login_id") -> str | None:
    if len(value) > LOGIN_ID_MAX or not _LOGIN_ID.fullmatch(value):
        v.add(
            field,
            "must be 4-64 characters of letters, digits, '.', '_' or '-', "
            "starting with a letter or digit",
        )
        return None
    return value


def login_id_index_value(login_id: str) -> str:
    """Login IDs are unique regardless of case."""
    return login_id.casefold()


def check_password(
    value: str, v: Violations, field: str = "password", *, login_id: str = ""
) -> str | None:
    if not PASSWORD_MIN <= len(value) <= PASSWORD_MAX:
        v.add(field, f"must be {PASSWORD_MIN}-{PASSWORD_MAX} characters")
        return None
    if login_id and value.casefold() == login_id.casefold():
        v.add(field, "must differ from the login ID")
        return None
    return value


def check_name(value: str, v: Violations, field: str = "name") -> str | None:
    if len(value) > NAME_MAX:
        v.add(field, f"must be 1-{NAME_MAX} printable characters")
        return None
    name = unicodedata.normalize("NFC", value.strip())
    if not 1 <= len(name) <= NAME_MAX or has_control(name):
        v.add(field, f"must be 1-{NAME_MAX} printable characters")
        return None
    return name


def check_email(value: str, v: Violations, field: str = "email") -> str | None:
    if len(value) > EMAIL_MAX:
        v.add(field, f"must be a valid e-mail address of at most {EMAIL_MAX} characters")
        return None
    try:
        return validate_email(value.strip(), check_deliverability=False).normalized
    except EmailNotValidError:
        # The library's message quotes the address; say only what kind of problem.
        v.add(field, "must be a valid e-mail address")
        return None


def email_index_value(email: str) -> str:
    """E-mail addresses are unique regardless of case."""
    return email.casefold()


def check_mobile_phone(value: str, v: Violations, field: str = "mobile_phone") -> str | None:
    phone = _PHONE_SEPARATORS.sub("", value) if len(value) <= MOBILE_PHONE_MAX else ""
    if not _PHONE.fullmatch(phone):
        v.add(field, "must be a phone number of 7-15 digits, optionally starting with '+'")
        return None
    return phone


def check_birth_date(value: str, today: date, v: Violations, field: str = "birth_date") -> None:
    """Section 8. The birth date is checked here and never stored."""
    try:
        born = date.fromisoformat(value) if len(value) == BIRTH_DATE_MAX else None
    except ValueError:
        born = None
    if born is None:
        v.add(field, "must be a date as YYYY-MM-DD")
        return
    if born > today:
        v.add(field, "must not be in the future")
        return
    age = today.year - born.year - ((today.month, today.day) < (born.month, born.day))
    if age < MINIMUM_AGE:
        v.add(
            field, f"members must be at least {MINIMUM_AGE} years old (privacy policy, section 8)"
        )
    elif age > 150:
        v.add(field, "must be a plausible birth date")


def check_member_id(value: str, v: Violations, field: str = "member_id") -> str | None:
    canonical = ids.canonical_member_id(value) if len(value) <= MEMBER_ID_MAX else None
    if canonical is None:
        v.add(field, "must be a member ID as returned by SignUp")
    return canonical


def check_ip(value: str, v: Violations, field: str = "ip") -> str | None:
    """An IP address in the one form it is stored in: IPv4 dotted quad, or IPv6
    compressed in lower case; an IPv4-mapped IPv6 address becomes its IPv4 address.

    A zone id ("fe80::1%eth0") is refused: it is free text (Python accepts
    anything after the '%') and means nothing off the host that sent it. The
    length is checked before the value is parsed.
    """
    address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    if len(value) <= IP_MAX and "%" not in value:
        try:
            address = ipaddress.ip_address(value.strip())
        except ValueError:
            address = None
    if address is None:
        v.add(
            field, f"must be an IPv4 or IPv6 address without a zone id, at most {IP_MAX} characters"
        )
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address)


def check_action(value: str, v: Violations, field: str = "action") -> str | None:
    if len(value) > ACTION_MAX or not _ACTION.fullmatch(value):
        v.add(field, "must be 1-64 characters of letters, digits and '._:/-'")
        return None
    return value


@dataclass(frozen=True, slots=True)
class ConsentChoice:
    """A member's answer for one purpose (a catalogue key: a Purpose's value, or a
    configured purpose's key; see vault.purposes)."""

    purpose: str
    granted: bool
    #: The request field that named the purpose ("purpose" or "purpose_key"): where
    #: a violation of it is reported.
    named_by: str = dataclasses.field(default="purpose", compare=False)
