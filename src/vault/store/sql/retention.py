"""The retention store (see :class:`vault.store.contracts.retention.RetentionStore`),
once for both backends. The access-log purge (PostgreSQL: SKIP LOCKED), the schema
check and the batch re-wrap stay in the backends; so does how a copy is read back
in one snapshot (``_in_read``)."""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from vault.clock import from_micros, to_micros
from vault.store._common import (
    RETAINED_COLUMNS,
    check_limit,
    check_retained,
    corrections_from_json,
    corrections_json,
    require_aware,
)
from vault.store.rows import (
    RETAINED_FIELDS,
    ConsentEventRow,
    ConsentRow,
    DisclosureRow,
    KekUsage,
    MemberKeyRow,
    RetainedMember,
    RetainedSummary,
    RetentionEvent,
)
from vault.store.sql.access_log import ENTRY_COLUMNS, access_entry
from vault.store.sql.dialect import Dialect, both, each
from vault.store.sql.executor import Body, Tx, UniqueViolation
from vault.store.sql.keys import SqlRewrapRead
from vault.store.sql.members import entry_ciphertexts

_CT = ", ".join(RETAINED_COLUMNS[f] for f in RETAINED_FIELDS)
_COPY_COLUMNS = ("member_id", "entry_id", "at", "action_ct", "ip_ct", "caller_ct")
_LOCK_COPY = both(
    "SELECT confirmed, attempt, retained_at FROM retained_members WHERE member_id = $1{update}"
)
_DELETE_ENTRIES = both("DELETE FROM retained_access_log WHERE member_id = $1")
_DELETE_COPY = both("DELETE FROM retained_members WHERE member_id = $1")
_INSERT_COPY = both(
    "INSERT INTO retained_members (member_id, retained_at, destroy_after, reason, attempt, "
    f"dek_id, kek_version, wrapped_dek, {_CT}, consents, consent_history, corrections, "
    "disclosures) VALUES ("
    + ", ".join(f"${i}" for i in range(1, 9 + len(RETAINED_FIELDS)))
    + f", ${9 + len(RETAINED_FIELDS)}{{jsonb}}, ${10 + len(RETAINED_FIELDS)}{{jsonb}}"
    + f", ${11 + len(RETAINED_FIELDS)}{{jsonb}}, ${12 + len(RETAINED_FIELDS)}{{jsonb}})"
)
_COPY = both(
    "SELECT retained_at, destroy_after, reason, attempt, confirmed, dek_id, kek_version, "
    f"wrapped_dek, consents{{text}} AS consents, {_CT}, "
    "consent_history{text} AS consent_history, corrections{text} AS corrections, "
    "disclosures{text} AS disclosures "
    "FROM retained_members WHERE member_id = $1"
)
_COPY_ENTRIES = both(
    f"SELECT {ENTRY_COLUMNS} FROM retained_access_log "
    "WHERE member_id = $1 ORDER BY at DESC, entry_id DESC"
)
_LIST = both(
    "SELECT m.member_id, m.retained_at, m.destroy_after, m.reason, m.confirmed, "
    "m.kek_version, (SELECT count(*) FROM retained_access_log AS a "
    "WHERE a.member_id = m.member_id) AS entries FROM retained_members AS m "
    "WHERE m.member_id > $1 ORDER BY m.member_id LIMIT $2"
)

_CONFIRM = both("UPDATE retained_members SET confirmed = {true} WHERE member_id = $1")
_DUE = each(
    lambda d: (
        f"SELECT member_id FROM retained_members WHERE {d.flag('confirmed')} "
        "AND destroy_after <= $1 ORDER BY destroy_after LIMIT $2"
    )
)
_UNCONFIRMED = each(
    lambda d: (
        f"SELECT member_id FROM retained_members WHERE {d.flag('confirmed', False)} "
        "AND retained_at < $1 ORDER BY retained_at LIMIT $2"
    )
)
_COUNT_ACCESS = both("SELECT count(*) FROM retained_access_log WHERE at < $1")
_KEK_USAGE = both(
    "SELECT kek_version, count(*) FROM retained_members GROUP BY kek_version ORDER BY kek_version"
)
_RECORD_EVENT = both(
    "INSERT INTO retention_events (at, actor, operation, member_id, basis) "
    "VALUES ($1, $2, $3, $4, $5)"
)
_EVENTS = "SELECT at, actor, operation, member_id, basis FROM retention_events"
_ALL_EVENTS = both(f"{_EVENTS} ORDER BY event_id")
_MEMBERS_EVENTS = both(f"{_EVENTS} WHERE member_id = $1 ORDER BY event_id")


def _copy_row(d: Dialect, member: RetainedMember, key: Any) -> tuple[Any, ...]:
    # Consents travel as JSON, their times in microseconds on both backends.
    consents = [
        [c.purpose, c.granted, c.policy_version, to_micros(require_aware(c.recorded_at))]
        for c in member.consents
    ]
    return (
        key,
        d.time(member.retained_at),
        d.time(member.destroy_after),
        member.reason,
        member.attempt,
        member.key.dek_id,
        member.key.kek_version,
        bytes(member.key.wrapped_dek),
        *(bytes(member.ciphertexts[f]) for f in RETAINED_FIELDS),
        json.dumps(consents),
        json.dumps(
            [
                [
                    e.event_id,
                    e.purpose,
                    e.granted,
                    e.policy_version,
                    to_micros(require_aware(e.recorded_at)),
                    e.recorded_by,
                    e.caller,
                ]
                for e in member.consent_history
            ]
        ),
        corrections_json(member.corrections),
        json.dumps(
            [
                [
                    e.disclosure_id,
                    e.recipient_id,
                    e.purpose,
                    list(e.fields),
                    e.basis,
                    to_micros(require_aware(e.at)),
                    base64.b64encode(e.details_ct).decode(),
                    e.entry_id,
                ]
                for e in member.disclosures
            ]
        ),
    )


def _retained(
    d: Dialect, member_id: str, row: Sequence[Any], entries: Sequence[Sequence[Any]]
) -> RetainedMember:
    retained_at, destroy_after, reason, attempt, confirmed, dek_id, version, wrapped = (
        row[i] for i in range(8)
    )
    return RetainedMember(
        member_id=member_id,
        retained_at=d.from_time(retained_at),
        destroy_after=d.from_time(destroy_after),
        reason=str(reason),
        key=MemberKeyRow(member_id, int(dek_id), int(version), bytes(wrapped)),
        ciphertexts={f: bytes(row[9 + i]) for i, f in enumerate(RETAINED_FIELDS)},
        consents=tuple(
            ConsentRow(str(p), bool(g), str(v), from_micros(int(t)))
            for p, g, v, t in json.loads(row[8])
        ),
        access_log=tuple(access_entry(d, e) for e in entries),
        consent_history=tuple(
            ConsentEventRow(int(i), str(p), bool(g), str(v), from_micros(int(t)), str(b), str(c))
            for i, p, g, v, t, b, c in json.loads(row[9 + len(RETAINED_FIELDS)])
        ),
        corrections=corrections_from_json(member_id, row[10 + len(RETAINED_FIELDS)]),
        disclosures=tuple(
            DisclosureRow(
                int(i),
                str(r),
                str(p),
                tuple(map(str, f)),
                b,
                from_micros(int(t)),
                base64.b64decode(c),
                str(e),
            )
            for i, r, p, f, b, t, c, e in json.loads(row[11 + len(RETAINED_FIELDS)])
        ),
        attempt=str(attempt),
        confirmed=bool(confirmed),
    )


class SqlRetention(SqlRewrapRead):
    """Copies in and out, confirming them, the sweeps' reads, the destroy guard's
    count, and events."""

    async def _in_read(self, body: Body[Any]) -> Any:
        """Several reads in one snapshot."""
        raise NotImplementedError

    async def put_retained(self, member: RetainedMember, stale_before: datetime) -> bool:
        d = self._dialect
        key = d.member_id(check_retained(member))
        stale = d.time(stale_before)
        copy_row = _copy_row(d, member, key)
        entries = [
            (key, e.entry_id, d.time(e.at), *entry_ciphertexts(e)) for e in member.access_log
        ]

        async def body(tx: Tx) -> bool:
            found = await tx.fetchrow(_LOCK_COPY[d.name], key)
            if found is not None:
                confirmed, attempt, retained_at = found
                if confirmed or (attempt != member.attempt and retained_at >= stale):
                    return False
                await tx.run(_DELETE_ENTRIES[d.name], key)
                await tx.run(_DELETE_COPY[d.name], key)
            await tx.run(_INSERT_COPY[d.name], *copy_row)
            await tx.copy("retained_access_log", _COPY_COLUMNS, entries)
            return True

        try:
            return await self._in_transaction(body)
        except UniqueViolation:
            return False  # another attempt inserted first

    async def get_retained(self, member_id: str) -> RetainedMember | None:
        d = self._dialect
        key = d.member_id(member_id)

        async def body(tx: Tx) -> RetainedMember | None:
            row = await tx.fetchrow(_COPY[d.name], key)
            if row is None:
                return None
            return _retained(d, str(key), row, await tx.fetch(_COPY_ENTRIES[d.name], key))

        result: RetainedMember | None = await self._in_read(body)
        return result

    async def list_retained(
        self, limit: int, after_member_id: str | None = None
    ) -> list[RetainedSummary]:
        d = self._dialect
        after = d.member_floor if after_member_id is None else d.member_id(after_member_id)
        rows = await self._fetch(_LIST[d.name], after, check_limit(limit))
        return [
            RetainedSummary(
                str(m), d.from_time(at), d.from_time(due), str(why), bool(ok), int(v), int(n)
            )
            for m, at, due, why, ok, v, n in rows
        ]

    async def delete_retained(self, member_id: str, *, attempt: str | None = None) -> bool:
        d = self._dialect
        key = d.member_id(member_id)

        async def body(tx: Tx) -> bool:
            found = await tx.fetchrow(_LOCK_COPY[d.name], key)
            if found is None or (attempt is not None and (found[0] or found[1] != attempt)):
                return False  # nothing deleted: no scrub either
            await tx.run(_DELETE_ENTRIES[d.name], key)
            await tx.run(_DELETE_COPY[d.name], key)
            return True

        return await self._in_transaction(body, scrub=True)

    async def confirm_retained(self, member_id: str) -> bool:
        d = self._dialect
        return await self._run(_CONFIRM[d.name], d.member_id(member_id)) > 0

    async def retained_due(self, now: datetime, limit: int) -> list[str]:
        d = self._dialect
        rows = await self._fetch(_DUE[d.name], d.time(now), check_limit(limit))
        return [str(r[0]) for r in rows]

    async def unconfirmed_before(self, before: datetime, limit: int) -> list[str]:
        d = self._dialect
        rows = await self._fetch(_UNCONFIRMED[d.name], d.time(before), check_limit(limit))
        return [str(r[0]) for r in rows]

    async def count_access_log_before(self, before: datetime) -> int:
        d = self._dialect
        rows = await self._fetch(_COUNT_ACCESS[d.name], d.time(before))
        return int(rows[0][0])

    async def kek_usage(self) -> list[KekUsage]:
        rows = await self._fetch(_KEK_USAGE[self._dialect.name])
        return [KekUsage(int(v), 0, 0, retained_keys=int(n)) for v, n in rows]

    async def record_event(self, event: RetentionEvent) -> None:
        d = self._dialect
        await self._run(
            _RECORD_EVENT[d.name],
            d.time(event.at),
            event.actor,
            event.operation,
            d.member_id(event.member_id),
            event.basis,
        )

    async def list_events(self, member_id: str | None = None) -> list[RetentionEvent]:
        d = self._dialect
        if member_id is None:
            rows = await self._fetch(_ALL_EVENTS[d.name])
        else:
            rows = await self._fetch(_MEMBERS_EVENTS[d.name], d.member_id(member_id))
        return [
            RetentionEvent(d.from_time(r[0]), str(r[1]), str(r[2]), str(r[3]), str(r[4]))
            for r in rows
        ]
