"""The purpose catalogue: which purposes exist, the fields each may read, the consent
each needs and its legal basis (privacy policy section 3).

The built-in purposes (:class:`vault.policy.Purpose`) are the default catalogue, so the
API's enum values keep their meaning. A deployment adds purposes in a TOML file
(``PRIVACY_VAULT_PURPOSES_FILE``, parsed by :func:`parse_catalogue`)::

    [[purpose]]
    key = "NEWSLETTER"
    fields = ["name", "email"]
    consent = "opt-in"          # or "membership"
    legal_basis = "the member's separate consent (policy section 3)"

A configured purpose is new to every existing member: section 3 asks for separate
consent, so whatever its kind, nothing is read for it before the member has a
recorded grant. That is why a configured purpose may not be of kind ``none``
(no consent needed) and may not redefine a built-in one.

Provision to a third party (section 4) is a purpose of its own per registered
recipient (:mod:`vault.disclosures`): ``PROVIDE_TO_<RECIPIENT ID>``, opt-in, the
recipient's fields, added to the catalogue by the registry (:func:`provision_spec`),
so the member grants, withdraws and is asked again about it like any opt-in
purpose. The prefix is reserved: a purposes file may not use it.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, Protocol

from vault.errors import ConsentOutdated, PurposeNotAllowed, PurposeRequiredForMembership
from vault.policy import (
    ALLOWED_FIELDS,
    CONSENT_FREE_PURPOSES,
    PII_FIELDS,
    REQUIRED_PURPOSES,
    ConsentChoice,
    Purpose,
    Violations,
)
from vault.store.rows import ConsentEventRow

ConsentKind = Literal["membership", "opt-in", "none"]
MEMBERSHIP: ConsentKind = "membership"
OPT_IN: ConsentKind = "opt-in"
NO_CONSENT: ConsentKind = "none"
_CONFIGURABLE_KINDS: tuple[ConsentKind, ...] = (OPT_IN, MEMBERSHIP)
#: Upper snake case, as the enum's names are (the API's purpose_key, max 64).
PURPOSE_KEY = re.compile(r"[A-Z][A-Z0-9_]{1,63}")
PURPOSE_KEY_MAX = 64
MAX_PURPOSES = 100
LEGAL_BASIS_MAX = 500
_ENTRY_KEYS = frozenset({"key", "fields", "consent", "legal_basis"})
#: The keys of provision purposes: the prefix and the recipient id in upper case.
PROVISION_PREFIX = "PROVIDE_TO_"

_BUILTIN_BASIS: Mapping[Purpose, str] = {
    Purpose.IDENTIFICATION: "membership: sign-up and service (policy sections 1(1), 3(1))",
    Purpose.ACCOUNT_RECOVERY: "membership: re-issuing a lost ID or password (section 3(1))",
    Purpose.INQUIRY: "the member's consent: answering inquiries (sections 1(2), 3(2))",
    Purpose.STATISTICS: "the member's consent: user statistics (sections 1(2), 3(3))",
    Purpose.MEMBER_REQUEST: "the member's own right of access (section 7)",
}


class PurposesInvalid(ValueError):
    """A purposes file that cannot be used; the message names the entry and the rule,
    never quoting the file."""


class ConsentFacts(Protocol):
    """What the read knows of one recorded consent (a ConsentRow)."""

    @property
    def purpose(self) -> str: ...
    @property
    def granted(self) -> bool: ...
    @property
    def reconsent_due_at(self) -> datetime | None: ...


@dataclass(frozen=True, slots=True)
class PurposeSpec:
    key: str
    fields: frozenset[str]
    consent: ConsentKind
    legal_basis: str
    builtin: bool = False


def consent_outdated(consent: ConsentFacts, now: datetime) -> bool:
    """Whether a grant predates a material change that now applies (policy versions):
    the member must consent again before the purpose reads anything."""
    due = consent.reconsent_due_at
    return consent.granted and due is not None and due <= now


class PurposeCatalogue:
    """Immutable: the purposes by key."""

    def __init__(self, specs: Iterable[PurposeSpec]) -> None:
        self._specs = {s.key: s for s in specs}

    def __repr__(self) -> str:
        return f"<PurposeCatalogue {len(self._specs)} purposes>"

    def __iter__(self) -> Iterator[PurposeSpec]:
        return iter(self._specs.values())

    def __len__(self) -> int:
        return len(self._specs)

    def get(self, key: str) -> PurposeSpec | None:
        return self._specs.get(key)

    def with_specs(self, specs: Iterable[PurposeSpec]) -> PurposeCatalogue:
        """This catalogue and ``specs`` (the registry's provision purposes)."""
        return PurposeCatalogue([*self, *specs])

    @property
    def keys(self) -> frozenset[str]:
        return frozenset(self._specs)

    def consentable(self) -> list[PurposeSpec]:
        """The purposes a member answers (membership and opt-in), in key order."""
        return sorted((s for s in self if s.consent != NO_CONSENT), key=lambda s: s.key)

    def check_read(
        self, spec: PurposeSpec, consents: Iterable[ConsentFacts], now: datetime
    ) -> None:
        """PurposeNotAllowed unless the member's consents allow reading for ``spec``;
        ConsentOutdated when the grant predates a material change in force."""
        if spec.consent == NO_CONSENT:
            return
        for consent in consents:
            if consent.purpose == spec.key:
                if not consent.granted:
                    raise PurposeNotAllowed(spec.key)
                if consent_outdated(consent, now):
                    raise ConsentOutdated(spec.key)
                return
        # No answer recorded: the built-in membership purposes are what signing up
        # was; anything else (opt-in, a configured purpose) needs a recorded grant.
        if not (spec.builtin and spec.consent == MEMBERSHIP):
            raise PurposeNotAllowed(spec.key)


def _builtin(purpose: Purpose) -> PurposeSpec:
    if purpose in CONSENT_FREE_PURPOSES:
        kind: ConsentKind = NO_CONSENT
    elif purpose in REQUIRED_PURPOSES:
        kind = MEMBERSHIP
    else:
        kind = OPT_IN
    return PurposeSpec(
        purpose.value, ALLOWED_FIELDS[purpose], kind, _BUILTIN_BASIS[purpose], builtin=True
    )


def provision_key(recipient_id: str) -> str:
    """The purpose a member grants to allow provision to a recipient (ids are
    lower-case, so the mapping is one-to-one)."""
    return PROVISION_PREFIX + recipient_id.upper()


def provision_spec(recipient_id: str, legal_entity: str, fields: Iterable[str]) -> PurposeSpec:
    """A registered recipient as an opt-in purpose: the member's consent to provision
    to it, of the fields it is registered to receive (policy section 4)."""
    return PurposeSpec(
        provision_key(recipient_id),
        frozenset(fields),
        OPT_IN,
        f"the member's consent to provision to {legal_entity} (policy section 4)"[:LEGAL_BASIS_MAX],
    )


BUILTIN_PURPOSES: tuple[PurposeSpec, ...] = tuple(_builtin(p) for p in Purpose)
DEFAULT_CATALOGUE = PurposeCatalogue(BUILTIN_PURPOSES)


def _entry(index: int, entry: object, taken: set[str]) -> PurposeSpec:
    where = f"purpose[{index}]"
    if not isinstance(entry, dict):
        raise PurposesInvalid(f"{where} must be a table ([[purpose]])")
    unknown = set(entry) - _ENTRY_KEYS
    if unknown:
        raise PurposesInvalid(
            f"{where}: {len(unknown)} unknown key(s); allowed: {', '.join(sorted(_ENTRY_KEYS))}"
        )
    key = entry.get("key")
    if not isinstance(key, str) or not PURPOSE_KEY.fullmatch(key):
        raise PurposesInvalid(
            f"{where}: key must be 2-64 characters of A-Z, 0-9 and '_', starting with a letter"
        )
    where = f"purpose[{index}] ({key})"
    if key.startswith(PROVISION_PREFIX):
        raise PurposesInvalid(
            f"{where}: keys starting {PROVISION_PREFIX} are the recipients registry's"
        )
    if key in taken:
        raise PurposesInvalid(f"{where}: the key is a built-in purpose's or given twice")
    fields = entry.get("fields")
    if (
        not isinstance(fields, list)
        or not all(isinstance(f, str) for f in fields)
        or not set(fields) <= set(PII_FIELDS)
        or len(set(fields)) != len(fields)
    ):
        raise PurposesInvalid(
            f"{where}: fields must be a list of distinct fields among {', '.join(PII_FIELDS)}"
        )
    consent = entry.get("consent")
    if consent not in _CONFIGURABLE_KINDS:
        raise PurposesInvalid(
            f"{where}: consent must be 'opt-in' or 'membership' (a purpose added by "
            "configuration always needs the member's consent, policy section 3)"
        )
    basis = entry.get("legal_basis")
    if not isinstance(basis, str) or not basis.strip() or len(basis) > LEGAL_BASIS_MAX:
        raise PurposesInvalid(f"{where}: legal_basis is required, 1-{LEGAL_BASIS_MAX} characters")
    kind: ConsentKind = OPT_IN if consent == OPT_IN else MEMBERSHIP
    return PurposeSpec(key, frozenset(fields), kind, basis.strip())


def parse_catalogue(text: str) -> PurposeCatalogue:
    """The built-in purposes plus the file's ``[[purpose]]`` entries."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PurposesInvalid(f"not valid TOML: {exc}") from None  # line and column only
    if set(data) - {"purpose"}:
        raise PurposesInvalid("unknown top-level key(s); allowed: [[purpose]]")
    entries = data.get("purpose", [])
    if not isinstance(entries, list):
        raise PurposesInvalid("purpose must be an array of tables ([[purpose]])")
    if len(entries) > MAX_PURPOSES:
        raise PurposesInvalid(f"at most {MAX_PURPOSES} purposes")
    taken = {s.key for s in BUILTIN_PURPOSES}
    specs = list(BUILTIN_PURPOSES)
    for index, entry in enumerate(entries):
        spec = _entry(index, entry, taken)
        taken.add(spec.key)
        specs.append(spec)
    return PurposeCatalogue(specs)


def check_answers(
    catalogue: PurposeCatalogue,
    choices: Iterable[ConsentChoice],
    v: Violations,
    field: str,
    *,
    sign_up: bool,
) -> dict[str, bool]:
    """A member's answers by purpose key, checked (violations go into ``v``): each
    names a catalogue purpose that takes consent, once. At sign-up a membership
    purpose cannot be refused and is implied; later it cannot be withdrawn alone
    (:class:`PurposeRequiredForMembership`: that is Withdraw)."""
    decided: dict[str, bool] = {}
    for i, choice in enumerate(choices):
        where = f"{field}[{i}].{choice.named_by}"
        spec = catalogue.get(choice.purpose)
        if spec is None:
            v.add(where, "must name a purpose of the catalogue")
        elif spec.consent == NO_CONSENT:
            v.add(where, f"{spec.key} is the member's right and needs no consent")
        elif spec.key in decided:
            v.add(where, f"{spec.key} is given more than once")
        elif spec.consent == MEMBERSHIP and not choice.granted:
            if not sign_up:
                raise PurposeRequiredForMembership(f"{field}[{i}].granted", spec.key)
            v.add(
                f"{field}[{i}].granted",
                f"{spec.key} is required to provide the service and cannot be "
                "refused at sign-up (privacy policy, sections 1 and 3)",
            )
        else:
            decided[spec.key] = choice.granted
    if sign_up:
        for spec in catalogue:
            if spec.consent == MEMBERSHIP:
                decided.setdefault(spec.key, True)
    return decided


def consent_event_json(event: ConsentEventRow) -> dict[str, object]:
    """One consent event as the export and the retained copy write it."""
    return {
        "purpose": event.purpose,
        "granted": event.granted,
        "policy_version": event.policy_version,
        "recorded_at": event.recorded_at.isoformat(),
        "recorded_by": event.recorded_by,
        "caller": event.caller,
    }
