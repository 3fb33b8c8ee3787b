"""Corrections and statistics (see :mod:`vault.store.contracts.corrections`),
once for both backends. The statements the member's own writes run inside their
transactions (releasing corrected fields, counting a sign-up or a withdrawal)
are here too, and imported by those writes."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from datetime import UTC, date, datetime
from typing import Any

from vault.errors import PreconditionFailed
from vault.store._common import check_limit, require_aware
from vault.store.rows import (
    CORRECTABLE_FIELDS,
    CorrectionFieldState,
    CorrectionRow,
    CorrectionState,
    ResealedCorrection,
    StatisticsCounts,
)
from vault.store.sql import guards
from vault.store.sql.dialect import Dialect, both, each
from vault.store.sql.executor import ForeignKeyViolation, MemberGone, SqlExecutor, Tx

_INSERT = both(
    "INSERT INTO corrections (correction_id, member_id, requested_at, requested_by, note_ct, "
    "state) VALUES ($1, $2, $3, $4, $5, 'pending')"
)
_INSERT_FIELD = both(
    "INSERT INTO correction_fields (correction_id, member_id, field, state) "
    "VALUES ($1, $2, $3, 'pending')"
)
# A member's corrections, pending and in all: counted under the member's row lock.
_TALLY = both(
    "SELECT count(*), coalesce(sum(CASE WHEN state = 'pending' THEN 1 ELSE 0 END), 0) "
    "FROM corrections WHERE member_id = $1"
)
#: Bounds on one member's corrections, so no caller can grow a member's record (and
#: its export and retention copy) without end: pending ones at a time, and
#: all kept (the record of the member's right exercised stays until the shred).
MAX_PENDING_CORRECTIONS = 20
MAX_CORRECTIONS = 500
_COLUMNS = (
    "correction_id, requested_at, requested_by, note_ct, state, resolved_at, resolved_by, reason_ct"
)
_OLDEST = "ORDER BY requested_at, correction_id"
_LIST = both(f"SELECT {_COLUMNS} FROM corrections WHERE member_id = $1 {_OLDEST}")
_PAGE = both(f"SELECT {_COLUMNS} FROM corrections WHERE member_id = $1 {_OLDEST} LIMIT $2")
_PAGE_AFTER = both(
    f"SELECT {_COLUMNS} FROM corrections WHERE member_id = $1 "
    f"AND (requested_at, correction_id) > ($2, $3) {_OLDEST} LIMIT $4"
)
_LIST_FIELDS = both(
    "SELECT correction_id, field, state FROM correction_fields WHERE member_id = $1"
)
# A page's fields: those of the corrections from its first to its last, by the page's own
# order (one statement text whatever the page size, unlike an IN list: asyncpg caches
# prepared statements by text). A correction added inside that range meanwhile is not in
# the page's rows, and correction_rows ignores its fields.
_PAGE_FIELDS = both(
    "SELECT f.correction_id, f.field, f.state FROM correction_fields f "
    "JOIN corrections c ON c.member_id = f.member_id AND c.correction_id = f.correction_id "
    "WHERE f.member_id = $1 AND (c.requested_at, c.correction_id) >= ($2, $3) "
    "AND (c.requested_at, c.correction_id) <= ($4, $5)"
)
# Read under the member's row lock by a withdrawal's check, in the same order.
_LOCK_LIST = both(f"SELECT {_COLUMNS} FROM corrections WHERE member_id = $1 " + "{update}")
_ONE = both(f"SELECT {_COLUMNS} FROM corrections WHERE member_id = $1 AND correction_id = $2")
_CLOSE_FIELDS = both(
    "UPDATE correction_fields SET state = 'closed', released_at = $3 "
    "WHERE member_id = $1 AND correction_id = $2 AND state = 'pending'"
)
_CLOSE = both(
    "UPDATE corrections SET state = 'closed', resolved_at = $3, resolved_by = $4, "
    "reason_ct = $5 WHERE member_id = $1 AND correction_id = $2 AND state = 'pending'"
)
# UpdateMember: the corrected fields are released, then every correction of the
# member left with no pending field is applied; if the member has ledger entries,
# it owes their recipients notices (policy section 7), which the sidecar queues.
_APPLY = both(
    "UPDATE corrections SET state = 'applied', resolved_at = $2, resolved_by = $3, "
    "notices_due = EXISTS (SELECT 1 FROM disclosures AS x WHERE x.member_id = $1) "
    "WHERE member_id = $1 AND state = 'pending' AND NOT EXISTS (SELECT 1 FROM "
    "correction_fields AS f WHERE f.correction_id = corrections.correction_id "
    "AND f.state = 'pending')"
)
_COUNT = (
    "INSERT INTO statistics_days (day, sign_ups, withdrawals) VALUES ($1, {first}) "
    "ON CONFLICT (day) DO UPDATE SET {column} = statistics_days.{column} + 1"
)
_COUNT_SIGN_UP = both(_COUNT.format(first="1, 0", column="sign_ups"))
_COUNT_WITHDRAWAL = both(_COUNT.format(first="0, 1", column="withdrawals"))
STATISTICS_PURPOSE = "STATISTICS"


def _effective(d: Dialect, alias: str, now: str) -> str:
    """``alias`` (a consents row) is a grant in force at ``now``: granted, and not
    outdated by a material change of its purpose published after it and in force
    (vault.purposes.consent_outdated, which makes the member read refuse it)."""
    return (
        f"{d.flag(f'{alias}.granted')} AND NOT EXISTS (SELECT 1 FROM policy_changes AS p "
        f"WHERE p.purpose = {alias}.purpose AND p.published_at > {alias}.recorded_at "
        f"AND p.effective_at <= {now})"
    )


_CONSENTS_TO_STATISTICS = each(
    lambda d: (
        "SELECT 1 FROM consents AS s WHERE s.member_id = $1 "
        f"AND s.purpose = '{STATISTICS_PURPOSE}' AND {_effective(d, 's', '$2')}"
    )
)
# Who is counted: a live member whose consent to statistics is a grant in force.
_MEMBERS = each(
    lambda d: (
        "SELECT count(*), coalesce(sum(CASE WHEN m.last_seen_at >= $1 THEN 1 ELSE 0 END), 0) "
        "FROM consents AS s JOIN members AS m ON m.member_id = s.member_id "
        f"WHERE s.purpose = '{STATISTICS_PURPOSE}' AND {_effective(d, 's', '$2')}"
    )
)
# Of those, the grants in force per purpose (the vault picks the purposes it reports).
_PURPOSES = each(
    lambda d: (
        "SELECT o.purpose, count(*) FROM consents AS s "
        "JOIN consents AS o ON o.member_id = s.member_id "
        f"WHERE s.purpose = '{STATISTICS_PURPOSE}' AND {_effective(d, 's', '$1')} "
        f"AND {_effective(d, 'o', '$1')} GROUP BY o.purpose ORDER BY o.purpose"
    )
)
_DAYS = both(
    "SELECT day, sign_ups, withdrawals FROM statistics_days "
    "WHERE day >= $1 AND day <= $2 ORDER BY day"
)


def _fields(names: Collection[str]) -> list[str]:
    if not names or not set(names) <= set(CORRECTABLE_FIELDS):
        raise ValueError("a correction names one or more of name, email, mobile_phone")
    return [f for f in CORRECTABLE_FIELDS if f in names]


def _optional(value: Any) -> bytes | None:
    return None if value is None else bytes(value)


def correction_rows(
    d: Dialect, member_id: str, rows: Sequence[Sequence[Any]], fields: Sequence[Sequence[Any]]
) -> list[CorrectionRow]:
    """CorrectionRows from _COLUMNS rows and their (correction_id, field, state) rows."""
    by_correction: dict[str, dict[str, CorrectionFieldState]] = {}
    for correction_id, name, state in fields:
        by_correction.setdefault(str(correction_id), {})[str(name)] = state
    result = []
    for cid, at, by, note, state, resolved_at, resolved_by, reason in rows:
        named = by_correction.get(str(cid), {})
        ordered = {f: named[f] for f in CORRECTABLE_FIELDS if f in named}
        result.append(
            CorrectionRow(
                correction_id=str(cid),
                member_id=member_id,
                requested_at=d.from_time(at),
                requested_by=str(by),
                fields=ordered,
                state=_state(state),
                note_ct=_optional(note),
                resolved_at=None if resolved_at is None else d.from_time(resolved_at),
                resolved_by=None if resolved_by is None else str(resolved_by),
                reason_ct=_optional(reason),
            )
        )
    return result


def _state(value: Any) -> CorrectionState:
    if value not in ("pending", "applied", "closed"):
        raise ValueError("unknown correction state")
    state: CorrectionState = value
    return state


async def locked_corrections(tx: Tx, d: Dialect, key: Any) -> list[CorrectionRow]:
    """Inside a write that holds the member's row lock: the member's corrections,
    locked, as list_corrections returns them (a withdrawal's check compares them)."""
    rows = await tx.fetch(_LOCK_LIST[d.name], key)
    if rows:
        rows = sorted(rows, key=lambda r: (r[1], str(r[0])))
    return correction_rows(d, str(key), rows, await tx.fetch(_LIST_FIELDS[d.name], key))


async def release_corrected(
    tx: Tx, d: Dialect, key: Any, fields: Collection[str], at: datetime, by: str
) -> None:
    """Inside UpdateMember's transaction: ``fields`` were corrected, so their pending
    correction fields are released, and the corrections left with none applied."""
    names = [f for f in CORRECTABLE_FIELDS if f in fields]
    if not names:
        return
    marks = ", ".join(f"${i}" for i in range(3, 3 + len(names)))
    release = d.sql(
        "UPDATE correction_fields SET state = 'corrected', released_at = $2 "
        f"WHERE member_id = $1 AND state = 'pending' AND field IN ({marks})"
    )
    when = d.time(at)
    if await tx.run(release, key, when, *names):
        await tx.run(_APPLY[d.name], key, when, by)


async def count_sign_up(tx: Tx, d: Dialect, day: date) -> None:
    """Inside a sign-up's transaction, for a member who consents to statistics."""
    await tx.run(_COUNT_SIGN_UP[d.name], day.isoformat())


async def count_withdrawal(tx: Tx, d: Dialect, key: Any, at: datetime) -> None:
    """Inside a withdrawal's shred, before the consents go: counted (on ``at``'s UTC
    day) if the member's consent to statistics is a grant in force at this moment."""
    if await tx.fetchval(_CONSENTS_TO_STATISTICS[d.name], key, d.time(at)) is not None:
        await tx.run(_COUNT_WITHDRAWAL[d.name], at.astimezone(UTC).date().isoformat())


class SqlCorrections(SqlExecutor):
    """Requesting, listing and closing corrections."""

    async def insert_correction(self, row: CorrectionRow, *, dek_id: int) -> bool:
        d = self._dialect
        key = d.member_id(row.member_id)
        names = _fields(row.fields)
        at = d.time(require_aware(row.requested_at))
        note = _optional(row.note_ct)

        async def body(tx: Tx) -> bool:
            # The row lock orders concurrent requests, so the bounds below hold.
            if not await tx.fetchval(guards.LOCK_MEMBER_ROW[d.name], key):
                return False
            await guards.check_dek(tx, d, key, dek_id)
            tally = await tx.fetchrow(_TALLY[d.name], key)
            assert tally is not None  # an aggregate always answers one row
            total, pending = tally
            if pending >= MAX_PENDING_CORRECTIONS or total >= MAX_CORRECTIONS:
                raise PreconditionFailed(
                    "member_id",
                    f"a member may have {MAX_PENDING_CORRECTIONS} pending corrections and "
                    f"{MAX_CORRECTIONS} in all: resolve or close one first",
                    kind="TOO_MANY_CORRECTIONS",
                )
            await tx.run(_INSERT[d.name], row.correction_id, key, at, row.requested_by, note)
            await tx.run_many(_INSERT_FIELD[d.name], [(row.correction_id, key, f) for f in names])
            return True

        try:
            return await self._in_transaction(body)
        except (MemberGone, ForeignKeyViolation):
            return False

    async def list_corrections(self, member_id: str) -> list[CorrectionRow]:
        d = self._dialect
        key = d.member_id(member_id)
        rows = await self._fetch(_LIST[d.name], key)
        fields = await self._fetch(_LIST_FIELDS[d.name], key) if rows else []
        return correction_rows(d, str(key), rows, fields)

    async def list_corrections_page(
        self, member_id: str, limit: int, after: tuple[datetime, str] | None = None
    ) -> list[CorrectionRow]:
        d = self._dialect
        key, limit = d.member_id(member_id), check_limit(limit)
        if after is None:
            rows = await self._fetch(_PAGE[d.name], key, limit)
        else:
            when = d.time(require_aware(after[0]))
            rows = await self._fetch(_PAGE_AFTER[d.name], key, when, str(after[1]), limit)
        if not rows:
            return []
        # Only the page's fields: at most limit corrections' (3 each).
        first, last = rows[0], rows[-1]
        fields = await self._fetch(_PAGE_FIELDS[d.name], key, first[1], first[0], last[1], last[0])
        return correction_rows(d, str(key), rows, fields)

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
        d = self._dialect
        key = d.member_id(member_id)
        when = d.time(require_aware(at))

        async def body(tx: Tx) -> tuple[CorrectionRow, bool] | None:
            # The lock order: the member row first, then its key, then its own rows.
            if not await tx.fetchval(guards.LOCK_MEMBER_ROW[d.name], key):
                return None
            await guards.check_dek(tx, d, key, dek_id)
            closed = bool(
                await tx.run(_CLOSE[d.name], key, correction_id, when, by, bytes(reason_ct))
            )
            if closed:
                await tx.run(_CLOSE_FIELDS[d.name], key, correction_id, when)
            found = await tx.fetchrow(_ONE[d.name], key, correction_id)
            if found is None:
                return None
            fields = [f for f in await tx.fetch(_LIST_FIELDS[d.name], key) if f[0] == correction_id]
            return correction_rows(d, str(key), [found], fields)[0], closed

        try:
            return await self._in_transaction(body)
        except MemberGone:
            return None


class SqlStatistics(SqlExecutor):
    """The counts GetStatistics suppresses and answers with."""

    async def statistics(
        self, at: datetime, active_since: datetime, first_day: date, last_day: date
    ) -> StatisticsCounts:
        d = self._dialect
        now = d.time(require_aware(at))
        members = await self._fetch(_MEMBERS[d.name], d.time(require_aware(active_since)), now)
        purposes = await self._fetch(_PURPOSES[d.name], now)
        days = await self._fetch(_DAYS[d.name], first_day.isoformat(), last_day.isoformat())
        total, active = members[0]
        return StatisticsCounts(
            members=int(total),
            active_members=int(active),
            consents={str(p): int(n) for p, n in purposes},
            days=tuple((str(day), int(s), int(w)) for day, s, w in days),
        )


_SEALED = both(
    "SELECT correction_id, note_ct, reason_ct FROM corrections WHERE member_id = $1 "
    "AND (note_ct IS NOT NULL OR reason_ct IS NOT NULL){update}"
)
_RESEAL = both(
    "UPDATE corrections SET note_ct = $3, reason_ct = $4 WHERE member_id = $1 "
    "AND correction_id = $2"
)


async def reseal_corrections(
    tx: Tx,
    d: Dialect,
    key: Any,
    old: Mapping[str, ResealedCorrection],
    new: Mapping[str, ResealedCorrection],
) -> bool:
    """Inside a per-member DEK rotation (member and key rows locked): store the
    corrections' note and reason re-sealed under the new DEK, only if the member's
    sealed texts are still exactly ``old`` (what the caller re-sealed); False else."""
    current = {
        str(cid): (_optional(note), _optional(reason))
        for cid, note, reason in await tx.fetch(_SEALED[d.name], key)
    }
    if current != dict(old) or set(new) != set(old):
        return False
    await tx.run_many(
        _RESEAL[d.name],
        [(key, cid, _optional(note), _optional(reason)) for cid, (note, reason) in new.items()],
    )
    return True
