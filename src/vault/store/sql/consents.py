"""Consent histories and policy versions (see
:class:`vault.store.contracts.consents.ConsentStore`), once for both backends."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from vault.errors import AlreadyExists
from vault.store._common import check_limit, require_aware
from vault.store.rows import ConsentEventRow, NewConsent, OutboxMessage, PolicyVersionRow
from vault.store.sql import guards
from vault.store.sql.dialect import Dialect, both, each
from vault.store.sql.executor import SqlExecutor, Tx, UniqueViolation

CURRENT_VERSION = both(
    "SELECT version FROM policy_versions WHERE published_at <= $1 "
    "ORDER BY published_at DESC, version DESC LIMIT 1"
)
_EVENT_COLUMNS = "event_id, purpose, granted, policy_version, recorded_at, recorded_by, caller"
INSERT_EVENT = both(
    "INSERT INTO consent_events "
    "(member_id, purpose, granted, policy_version, recorded_at, recorded_by, caller) "
    "VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING event_id"
)
_UPSERT_CURRENT = both(
    "INSERT INTO consents (member_id, purpose, granted, policy_version, recorded_at) "
    "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (member_id, purpose) DO UPDATE SET "
    "granted = excluded.granted, policy_version = excluded.policy_version, "
    "recorded_at = excluded.recorded_at"
)
_EVENTS = both(
    f"SELECT {_EVENT_COLUMNS} FROM consent_events WHERE member_id = $1 AND event_id < $2 "
    "ORDER BY event_id DESC LIMIT $3"
)
#: Every event of the member, oldest first (the export, the move into retention).
ALL_EVENTS = both(
    f"SELECT {_EVENT_COLUMNS} FROM consent_events WHERE member_id = $1 ORDER BY event_id"
)
_INSERT_VERSION = both(
    "INSERT INTO policy_versions (version, published_at, effective_at, text_sha256, "
    "changed_purposes, published_by, caller) VALUES ($1, $2, $3, $4, $5{jsonb}, $6, $7)"
)
_INSERT_CHANGE = both(
    "INSERT INTO policy_changes (purpose, published_at, effective_at, version) "
    "VALUES ($1, $2, $3, $4)"
)
_VERSIONS = both(
    "SELECT version, published_at, effective_at, text_sha256, changed_purposes{text}, "
    "published_by, caller FROM policy_versions ORDER BY published_at, version"
)
_PENDING = each(
    lambda d: (
        f"SELECT version FROM policy_versions WHERE {d.flag('notices_done', False)} "
        "ORDER BY published_at, version LIMIT $1"
    )
)
_LOCK_VERSION = both(
    "SELECT notice_cursor, notices_done FROM policy_versions WHERE version = $1{update}"
)
# Members whose current answer to a purpose the version changes is a grant given
# before it was published: those it asks again.
_AFFECTED = both(
    "SELECT DISTINCT c.member_id FROM consents AS c JOIN policy_changes AS p "
    "ON p.purpose = c.purpose WHERE p.version = $1 AND c.granted = {true} "
    "AND c.recorded_at < p.published_at AND c.member_id > $2 ORDER BY c.member_id LIMIT $3"
)
_MOVE_CURSOR = both(
    "UPDATE policy_versions SET notice_cursor = $2, notices_done = $3 WHERE version = $1"
)


def event_row(d: Dialect, row: Sequence[Any]) -> ConsentEventRow:
    event_id, purpose, granted, version, at, recorded_by, caller = row
    return ConsentEventRow(
        int(event_id),
        str(purpose),
        bool(granted),
        str(version),
        d.from_time(at),
        str(recorded_by),
        str(caller),
    )


async def append_consents(
    tx: Tx,
    d: Dialect,
    key: Any,
    answers: Sequence[NewConsent],
    at: datetime,
    *,
    recorded_by: str,
    caller: str,
    default_version: str,
) -> list[ConsentEventRow]:
    """Inside a write holding the member's row: the events and the current answers
    (sign-up's first answers and every later change)."""
    when = d.time(require_aware(at))
    version = await tx.fetchval(CURRENT_VERSION[d.name], when) or default_version
    events = []
    for answer in answers:
        event_id = await tx.fetchval(
            INSERT_EVENT[d.name],
            key,
            answer.purpose,
            answer.granted,
            version,
            when,
            recorded_by,
            caller,
        )
        await tx.run(_UPSERT_CURRENT[d.name], key, answer.purpose, answer.granted, version, when)
        events.append(
            ConsentEventRow(
                int(event_id),
                answer.purpose,
                answer.granted,
                str(version),
                d.from_time(when),
                recorded_by,
                caller,
            )
        )
    return events


def _version_row(d: Dialect, row: Sequence[Any]) -> PolicyVersionRow:
    version, published, effective, digest, changed, by, caller = row
    return PolicyVersionRow(
        str(version),
        d.from_time(published),
        d.from_time(effective),
        str(digest),
        tuple(str(p) for p in json.loads(changed)),
        str(by),
        str(caller),
    )


class SqlConsents(SqlExecutor):
    """Recording answers, the history, publishing versions and queueing their notices."""

    async def record_consents(
        self,
        member_id: str,
        answers: Sequence[NewConsent],
        at: datetime,
        *,
        recorded_by: str,
        caller: str,
        default_version: str,
    ) -> list[ConsentEventRow] | None:
        d = self._dialect
        key = d.member_id(member_id)
        if len({a.purpose for a in answers}) != len(answers):
            raise ValueError("answers name a purpose more than once")

        async def body(tx: Tx) -> list[ConsentEventRow] | None:
            # Step 1 of the lock order: a shred (or the withdrawal's move, which checks
            # the history it copied) waits for us, or we find the member gone.
            if await tx.fetchval(guards.LOCK_MEMBER_ROW[d.name], key) is None:
                return None
            return await append_consents(
                tx,
                d,
                key,
                answers,
                at,
                recorded_by=recorded_by,
                caller=caller,
                default_version=default_version,
            )

        return await self._in_transaction(body)

    async def list_consent_events(
        self, member_id: str, limit: int, before_event_id: int | None = None
    ) -> list[ConsentEventRow]:
        d = self._dialect
        before = 2**63 - 1 if before_event_id is None else int(before_event_id)
        rows = await self._fetch(
            _EVENTS[d.name], d.member_id(member_id), before, check_limit(limit)
        )
        return [event_row(d, r) for r in rows]

    async def publish_policy_version(self, version: PolicyVersionRow) -> None:
        d = self._dialect
        published = d.time(require_aware(version.published_at))
        effective = d.time(require_aware(version.effective_at))

        async def body(tx: Tx) -> None:
            await tx.run(
                _INSERT_VERSION[d.name],
                version.version,
                published,
                effective,
                version.text_sha256,
                json.dumps(list(version.changed_purposes)),
                version.published_by,
                version.caller,
            )
            await tx.run_many(
                _INSERT_CHANGE[d.name],
                [(p, published, effective, version.version) for p in version.changed_purposes],
            )

        try:
            await self._in_transaction(body)
        except UniqueViolation:
            # The version's own primary key: the one unique constraint here.
            raise AlreadyExists("policy_version", "a policy version") from None

    async def list_policy_versions(self) -> list[PolicyVersionRow]:
        d = self._dialect
        return [_version_row(d, r) for r in await self._fetch(_VERSIONS[d.name])]

    async def current_policy_version(self, at: datetime) -> str | None:
        d = self._dialect
        rows = await self._fetch(CURRENT_VERSION[d.name], d.time(require_aware(at)))
        return str(rows[0][0]) if rows else None

    async def versions_with_pending_notices(self, limit: int) -> list[str]:
        d = self._dialect
        return [str(r[0]) for r in await self._fetch(_PENDING[d.name], check_limit(limit))]

    async def queue_policy_notices(
        self, version: str, limit: int, notice: Callable[[str], OutboxMessage]
    ) -> tuple[int, bool]:
        d = self._dialect
        size = check_limit(limit)

        async def body(tx: Tx) -> tuple[int, bool]:
            state = await tx.fetchrow(_LOCK_VERSION[d.name], version)
            if state is None or state[1]:
                return 0, True
            cursor = d.member_floor if state[0] is None else state[0]
            page = [r[0] for r in await tx.fetch(_AFFECTED[d.name], version, cursor, size)]
            queued = 0
            for member in page:
                # FOR SHARE holds the member against a shred until commit; one shredded
                # since the page was read is skipped.
                if await tx.fetchval(guards.MEMBER_EXISTS[d.name], member) is None:
                    continue
                message = notice(str(member))
                await tx.run(guards.ENQUEUE_OUTBOX[d.name], *guards.outbox_params(d, message))
                queued += 1
            done = len(page) < size
            await tx.run(_MOVE_CURSOR[d.name], version, page[-1] if page else state[0], done)
            return queued, done

        return await self._in_transaction(body)
