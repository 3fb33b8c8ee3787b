"""Consent over time (policy sections 1(2), 3): the member's answers per purpose, their
append-only history, and the privacy officer's policy versions.

The current answer per purpose is what the member read aggregates in its own query
(see the backends' member read), so a withdrawal applies to the very next read on
every replica; nothing here caches an answer.

When a policy version applies. A version is published now and takes effect on its
effective date (00:00 UTC). It makes outdated every grant, to a purpose it
materially changes, that was recorded *before its publication*: from the effective
date on, reads for that purpose are refused (ConsentOutdated) until the member
answers again. An answer recorded after publication was given with the new text
available (it is recorded under the new version), so it stays valid. Between
publication and the effective date nothing is blocked; the members concerned are
mailed at publication (the sidecar) so they can answer in time. A refusal or a
withdrawal is never outdated: there is nothing to ask again.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from functools import partial
from typing import Protocol

from vault import _hazmat, policy
from vault.calls import current_caller
from vault.clock import Clock
from vault.errors import NotFound
from vault.mail import POLICY_CHANGED
from vault.member_rows import load_member
from vault.members import VaultSettings, log
from vault.page_tokens import CONSENT_LISTING, checked_page, decode_page_token, encode_cursor
from vault.policy import ConsentChoice, Violations
from vault.purposes import (
    MEMBERSHIP,
    NO_CONSENT,
    OPT_IN,
    PurposeCatalogue,
    PurposeSpec,
    check_answers,
    consent_outdated,
    provision_spec,
)
from vault.store.base import (
    RECORDED_BY_MEMBER,
    ConsentEventRow,
    ConsentStore,
    DisclosureStore,
    MemberStore,
    NewConsent,
    OutboxMessage,
    PolicyVersionRow,
    whole_consent_history,
)

MAX_CHANGES = 32
__all__ = [
    "ConsentEventRow",
    "ConsentHistoryPage",
    "ConsentState",
    "Consents",
    "PolicyVersionRow",
    "policy_notice",
]

#: How far ahead an effective date may be.
MAX_EFFECTIVE_AHEAD = timedelta(days=5 * 366)
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
# Notice message ids: one per (version, member), so a notice is never queued twice.
_NOTICE_NAMESPACE = uuid.UUID("0b6f4f3e-6c55-4d0e-9b1e-6a1f0c2d7e51")


@dataclass(frozen=True, slots=True)
class ConsentState:
    """A member's answer for one purpose that takes consent, as GetConsents shows it."""

    purpose: PurposeSpec
    #: Whether the purpose may read: granted and not outdated (a membership purpose
    #: without an answer recorded counts as granted: signing up was the answer).
    granted: bool
    #: Whether the member answered at all.
    answered: bool
    policy_version: str = ""
    recorded_at: datetime | None = None
    #: A grant that predates a material change in force: the member must answer again.
    outdated: bool = False
    #: When a material change published after the answer takes (or took) effect.
    reconsent_due_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class ConsentHistoryPage:
    events: tuple[ConsentEventRow, ...]
    next_page_token: str = ""


class ConsentStores(MemberStore, ConsentStore, DisclosureStore, Protocol):
    """The vault-database slice consents use: the member read, the histories, and
    the recipients registry (each recipient is a provision purpose)."""


def notice_id(version: str, member_id: str) -> str:
    return str(uuid.uuid5(_NOTICE_NAMESPACE, f"{version}\0{member_id}"))


def policy_notice(version: PolicyVersionRow, member_id: str, now: datetime) -> OutboxMessage:
    """The e-mail telling a member a version changes purposes they consented to."""
    return OutboxMessage(
        message_id=notice_id(version.version, member_id),
        member_id=member_id,
        kind=POLICY_CHANGED,
        params={
            "version": version.version,
            "effective_at": version.effective_at.isoformat(),
            "purposes": ",".join(version.changed_purposes),
        },
        created_at=now,
    )


class Consents:
    """Reached as ``Vault.consents``."""

    def __init__(
        self,
        store: ConsentStores,
        clock: Clock,
        settings: VaultSettings,
        page_token_key: _hazmat.MacKey,
    ) -> None:
        self._store = store
        self._clock = clock
        self._settings = settings
        self._catalogue = settings.purposes
        self._page_token_key = page_token_key

    def __repr__(self) -> str:
        return "<Consents>"

    async def catalogue(self) -> PurposeCatalogue:
        """The configured catalogue and a provision purpose per registered recipient
        (vault.disclosures), read now: a recipient registered on another replica
        is answerable at once."""
        recipients = await self._store.list_recipients()
        return self._catalogue.with_specs(
            provision_spec(r.recipient_id, r.legal_entity, r.fields) for r in recipients
        )

    async def current(self, member_id: str) -> list[ConsentState]:
        """Every purpose that takes consent, with the member's answer (one read)."""
        row = await load_member(self._store, member_id)
        now = self._clock.now()
        answers = {c.purpose: c for c in row.consents}
        states = []
        for spec in (await self.catalogue()).consentable():
            answer = answers.get(spec.key)
            if answer is None:
                implied = spec.builtin and spec.consent == MEMBERSHIP
                states.append(ConsentState(spec, granted=implied, answered=False))
                continue
            outdated = consent_outdated(answer, now)
            states.append(
                ConsentState(
                    spec,
                    granted=answer.granted and not outdated,
                    answered=True,
                    policy_version=answer.policy_version,
                    recorded_at=answer.recorded_at,
                    outdated=outdated,
                    reconsent_due_at=answer.reconsent_due_at if answer.granted else None,
                )
            )
        return states

    async def update(self, member_id: str, choices: Sequence[ConsentChoice]) -> list[ConsentState]:
        """Record the member's answers (their session was checked by the caller): one
        event each, under the version in force. A membership purpose cannot be
        withdrawn alone (PurposeRequiredForMembership: that is Withdraw)."""
        v = Violations()
        mid = policy.check_member_id(member_id, v)
        if not choices:
            v.add("changes", "must name at least one purpose")
        answers = check_answers(await self.catalogue(), choices, v, "changes", sign_up=False)
        v.raise_if_any()
        assert mid
        recorded = await self._store.record_consents(
            mid,
            [NewConsent(key, granted) for key, granted in answers.items()],
            self._clock.now(),
            recorded_by=RECORDED_BY_MEMBER,
            caller=current_caller(),
            default_version=self._settings.policy_version,
        )
        if recorded is None:
            raise NotFound
        log.info(
            "consents_updated",
            member_id=mid,
            granted=sorted(k for k, g in answers.items() if g),
            withdrawn=sorted(k for k, g in answers.items() if not g),
        )
        return await self.current(mid)

    async def history(self, member_id: str, page_size: int, page_token: str) -> ConsentHistoryPage:
        """The member's consent events, newest first, a page at a time."""
        v = Violations()
        mid = policy.check_member_id(member_id, v)
        opener = (
            None
            if mid is None
            else partial(decode_page_token, self._page_token_key, mid, listing=CONSENT_LISTING)
        )
        size, cursor = checked_page(page_size, page_token, opener, "ListConsentHistory", v)
        v.raise_if_any()
        assert mid
        await load_member(self._store, mid)  # NotFound for a member that is gone
        rows = await self._store.list_consent_events(
            mid, size + 1, None if cursor is None else cursor[1]
        )
        token = ""
        if len(rows) > size:
            last = rows[size - 1]
            token = encode_cursor(
                self._page_token_key, mid, last.recorded_at, last.event_id, CONSENT_LISTING
            )
        return ConsentHistoryPage(tuple(rows[:size]), token)

    async def whole_history(self, member_id: str) -> list[ConsentEventRow]:
        """Every event of the member, oldest first (the export; the retention copy)."""
        return await whole_consent_history(self._store, member_id)

    # --- the privacy officer's policy versions --------------------------------------
    async def publish(
        self,
        version: str,
        effective_date: str,
        text_sha256: str,
        changed_purposes: Sequence[str],
        actor: str,
    ) -> PolicyVersionRow:
        """Publish a policy version now, taking effect on ``effective_date`` (see the
        module docstring). Only opt-in purposes can be asked again: a membership
        purpose's change is a change of membership itself (the member's answer to it
        is to stay or to Withdraw), and a purpose needing no consent has no answer."""
        now = self._clock.now()
        v = Violations()
        if not _VERSION.fullmatch(version):
            v.add("version", "must be 1-32 characters of letters, digits and '._-'")
        effective = _effective_at(effective_date, now, v)
        if not _SHA256.fullmatch(text_sha256):
            v.add("text_sha256", "must be the SHA-256 of the text, 64 lower-case hex digits")
        if len(changed_purposes) > MAX_CHANGES:
            v.add("changed_purposes", f"must name at most {MAX_CHANGES} purposes")
        seen: set[str] = set()
        catalogue = await self.catalogue()
        for i, key in enumerate(changed_purposes[:MAX_CHANGES]):
            where = f"changed_purposes[{i}]"
            spec = catalogue.get(key)
            if spec is None:
                v.add(where, "must name a purpose of the catalogue")
            elif spec.consent == NO_CONSENT:
                v.add(where, f"{key} needs no consent: there is no answer to ask again")
            elif spec.consent != OPT_IN:
                v.add(where, f"{key} is part of membership: only opt-in purposes are asked again")
            elif key in seen:
                v.add(where, f"{key} is named more than once")
            seen.add(key)
        v.raise_if_any()
        assert effective is not None
        row = PolicyVersionRow(
            version=version,
            published_at=now,
            effective_at=effective,
            text_sha256=text_sha256,
            changed_purposes=tuple(sorted(seen)),
            published_by=actor,
            caller=current_caller(),
        )
        await self._store.publish_policy_version(row)
        log.info(
            "policy_version_published",
            version=version,
            effective_at=effective.isoformat(),
            changed_purposes=list(row.changed_purposes),
            actor=actor,
        )
        return row

    async def versions(self) -> list[PolicyVersionRow]:
        return await self._store.list_policy_versions()


def _effective_at(value: str, now: datetime, v: Violations) -> datetime | None:
    """00:00 UTC of a YYYY-MM-DD date, not before today (no version applies
    retroactively) and at most about five years ahead."""
    try:
        day = date.fromisoformat(value) if len(value) == 10 else None
    except ValueError:
        day = None
    if day is None:
        v.add("effective_date", "must be a date as YYYY-MM-DD")
        return None
    at = datetime.combine(day, time(0), tzinfo=UTC)
    if day < now.astimezone(UTC).date():
        v.add(
            "effective_date", "must not be before today (UTC): a version cannot apply retroactively"
        )
        return None
    if at > now + MAX_EFFECTIVE_AHEAD:
        v.add("effective_date", "must be within five years")
        return None
    return at
