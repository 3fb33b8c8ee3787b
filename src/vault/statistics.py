"""User statistics (privacy policy section 3(3)): aggregates over consenting members,
small cells suppressed. No per-member read serves them.

Who is counted: only members who consent to STATISTICS.
- Members, members active in the last 30 days and consents per purpose count the
  live members whose consent to STATISTICS is a grant in force *now*: granted, and
  not outdated by a policy version in force that materially changed STATISTICS
  (vault.purposes.consent_outdated: a read for the purpose would be refused
  CONSENT_OUTDATED, so the member is not counted either until they consent again).
  A withdrawal of that consent takes them out of the very next answer.
- Consent rates are reported for every opt-in purpose of the catalogue (the
  configured ones included; not STATISTICS itself, nor the membership purposes,
  which every member grants by signing up), counting grants in force the same way.
- Sign-ups and withdrawals per day are counters (day, count), with no member id,
  bumped in the sign-up's and the withdrawal's own transaction when the member
  consents to STATISTICS *at that moment* (a grant in force): a member who signs
  up without consent and grants it later is not a sign-up of any day, one who
  withdraws after refusing it later (or with an outdated grant) is not a
  withdrawal. The counters outlive the shred; an
  inactivity expiry or a shred by the privacy officer is not a withdrawal.

Suppression (k-anonymity of the cells): every count under ``minimum_cell``
(default 10) is suppressed, zero included, so "nobody" and "one person" look the
same. Complementary suppression where a visible total would give a small cell
away by subtraction: "active" is also suppressed when total - active is between 1
and k - 1, and a purpose's consents when total - granted is (members who refused
it). The days carry no total, so no day can be recovered from the others.

What this does not stop (documented, not solved): differencing across time. Two
answers an hour apart whose member totals differ by 1 say someone consenting
joined or left in between; a caller allowed GetStatistics is trusted with that,
as the caller policy names it, and cells are only as fresh as the request.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, timedelta

from vault.clock import Clock
from vault.policy import Purpose, Violations
from vault.purposes import DEFAULT_CATALOGUE, OPT_IN, PurposeCatalogue
from vault.store.base import StatisticsStore


def rate_purposes(catalogue: PurposeCatalogue) -> tuple[str, ...]:
    """The purposes whose consent rates are reported, by key: every opt-in purpose of
    the catalogue (the configured ones included) but statistics itself (100% of
    those counted, by construction). Membership purposes are what signing up is, so
    their rate says nothing."""
    return tuple(
        s.key
        for s in catalogue.consentable()
        if s.consent == OPT_IN and s.key != Purpose.STATISTICS
    )


ACTIVE_WINDOW = timedelta(days=30)
DATE_MAX = 10  # YYYY-MM-DD
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


@dataclass(frozen=True, slots=True)
class StatisticsSettings:
    #: Counts under this are suppressed.
    minimum_cell: int = 10
    #: The longest date range one request may ask for, in days.
    max_days: int = 92

    def __post_init__(self) -> None:
        if not 2 <= self.minimum_cell <= 1000:
            raise ValueError("the minimum cell size must be between 2 and 1000")
        if not 1 <= self.max_days <= 3660:
            raise ValueError("the statistics date range must be 1 to 3660 days")


#: A count, or None where it is suppressed.
Cell = int | None


@dataclass(frozen=True, slots=True)
class DayCounts:
    day: date
    sign_ups: Cell
    withdrawals: Cell


@dataclass(frozen=True, slots=True)
class PurposeConsents:
    #: The purpose's catalogue key.
    purpose: str
    granted: Cell
    #: granted / members, when both are shown.
    rate: float | None


@dataclass(frozen=True, slots=True)
class StatisticsReport:
    computed_at: datetime
    minimum_cell: int
    members: Cell
    active_members: Cell
    days: tuple[DayCounts, ...]
    consents: tuple[PurposeConsents, ...]


def _day(value: str) -> date | None:
    if len(value) != DATE_MAX or not _DATE.fullmatch(value):
        return None  # fromisoformat alone also takes week dates ("2026-W01-1")
    try:
        return date.fromisoformat(value)
    except ValueError:
        return None


class Statistics:
    """Reached as ``vault.statistics``. Holds no gRPC and no SQL."""

    def __init__(
        self,
        store: StatisticsStore,
        clock: Clock,
        settings: StatisticsSettings,
        purposes: PurposeCatalogue = DEFAULT_CATALOGUE,
    ) -> None:
        self._store = store
        self._clock = clock
        self._settings = settings
        self._rated = rate_purposes(purposes)

    def __repr__(self) -> str:
        return f"<Statistics minimum_cell={self._settings.minimum_cell}>"

    def _range(self, start: str, end: str, today: date) -> tuple[date, date]:
        """The requested days (inclusive); both empty: the last 30 days to today."""
        v = Violations()
        limit = self._settings.max_days
        if not start and not end:
            return today - timedelta(days=29), today
        first, last = _day(start), _day(end)
        if first is None:
            v.add("start_date", "must be a date as YYYY-MM-DD")
        if last is None:
            v.add("end_date", "must be a date as YYYY-MM-DD")
        if first is not None and last is not None:
            if last < first:
                v.add("end_date", "must not be before start_date")
            elif (last - first).days + 1 > limit:
                v.add("end_date", f"the range may span at most {limit} days")
        v.raise_if_any()
        assert first is not None
        assert last is not None
        return first, last

    async def report(self, start_date: str = "", end_date: str = "") -> StatisticsReport:
        now = self._clock.now()
        first, last = self._range(start_date, end_date, now.date())
        counts = await self._store.statistics(now, now - ACTIVE_WINDOW, first, last)
        k = self._settings.minimum_cell

        def cell(count: int, total: int | None = None) -> Cell:
            if count < k:
                return None
            if total is not None and 0 < total - count < k:
                return None  # the rest of the total would be a small cell
            return count

        by_day = {d: (s, w) for d, s, w in counts.days}
        days = []
        # By offset: stepping past the last day would overflow at 9999-12-31.
        for offset in range((last - first).days + 1):
            day = first + timedelta(days=offset)
            sign_ups, withdrawals = by_day.get(day.isoformat(), (0, 0))
            days.append(DayCounts(day, cell(sign_ups), cell(withdrawals)))
        members = cell(counts.members)
        consents = []
        for purpose in self._rated:
            granted = cell(counts.consents.get(purpose, 0), counts.members)
            rate = None if granted is None or not members else granted / members
            consents.append(PurposeConsents(purpose, granted, rate))
        return StatisticsReport(
            computed_at=now,
            minimum_cell=k,
            members=members,
            active_members=cell(counts.active_members, counts.members),
            days=tuple(days),
            consents=tuple(consents),
        )
