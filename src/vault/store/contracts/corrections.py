"""Corrections that freeze use (policy section 7) and the statistics counters
(section 3(3)): two small domains the member's own writes touch."""

from __future__ import annotations

from datetime import date, datetime
from typing import Protocol

from vault.store.rows import CorrectionRow, StatisticsCounts


class CorrectionStore(Protocol):
    """A member's requested corrections. A pending field of one is returned with the
    member by MemberStore.get_member / find_member (``MemberRow.frozen``), in the same
    statement; UpdateMember releases the fields it corrects in its own transaction
    (MemberStore.update_member's ``corrected``), and a shred deletes them all."""

    async def insert_correction(self, row: CorrectionRow, *, dek_id: int) -> bool:
        """Store a new pending correction (every field pending), its note sealed under
        the member's DEK ``dek_id``. False if no such member; KeyChanged if the DEK
        was rotated meanwhile (the note would not open)."""
        ...

    async def list_corrections(self, member_id: str) -> list[CorrectionRow]:
        """The member's corrections, oldest first (by requested_at, then id)."""
        ...

    async def list_corrections_page(
        self, member_id: str, limit: int, after: tuple[datetime, str] | None = None
    ) -> list[CorrectionRow]:
        """At most ``limit`` of the member's corrections in list_corrections' order,
        those after the one requested at ``after`` = (requested_at, correction_id)
        if given: a page of ListCorrections, which pages by the last one's pair."""
        ...

    async def close_correction(
        self,
        member_id: str,
        correction_id: str,
        at: datetime,
        by: str,
        reason_ct: bytes,
        *,
        dek_id: int,
    ) -> tuple[CorrectionRow, bool] | None:
        """Close a pending correction of the member: its still pending fields are
        released ("closed"), with ``reason_ct`` (sealed under DEK ``dek_id``), the
        time and who. Returns the correction as it is afterwards and whether this
        call closed it (False: it was no longer pending, and is unchanged); None if
        the member has no such correction. KeyChanged if the DEK was rotated
        meanwhile."""
        ...


class StatisticsStore(Protocol):
    """Counts over members who consent to statistics. Sign-ups and withdrawals per
    day are counters written by insert_member and a withdrawal's shred_member in
    their own transactions (by the consent as it stands at that moment), so they
    outlive the members."""

    async def statistics(
        self, at: datetime, active_since: datetime, first_day: date, last_day: date
    ) -> StatisticsCounts:
        """Live members whose consent to statistics is a grant in force at ``at``
        (granted, and not outdated by a policy version in force), those of them
        seen at or after ``active_since``, how many of them hold a grant in force
        for each purpose, and the days from ``first_day`` to ``last_day``
        (inclusive) that have counts."""
        ...
