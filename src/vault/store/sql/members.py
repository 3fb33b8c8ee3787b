"""Members' writes and consents (part of
:class:`vault.store.contracts.members.MemberStore`), once for both backends. The
member read (``get_member`` / ``find_member``, the hot path) stays in the
backends: PostgreSQL aggregates the consents into an array of records, SQLite
into JSON."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from vault.store._common import (
    CT_COLUMNS,
    HMAC_COLUMNS,
    check_new_member,
    update_assignments,
)
from vault.store.contracts.idempotency import IdempotencyKey
from vault.store.contracts.sessions import NewSession
from vault.store.rows import (
    RECORDED_BY_MEMBER,
    AccessEntryRow,
    ConsentRow,
    MemberRow,
    NewAccessEntry,
    NewConsent,
    OutboxMessage,
)
from vault.store.sql import guards
from vault.store.sql.consents import append_consents
from vault.store.sql.corrections import STATISTICS_PURPOSE, count_sign_up, release_corrected
from vault.store.sql.dialect import both
from vault.store.sql.executor import (
    ForeignKeyViolation,
    MemberGone,
    SqlExecutor,
    Tx,
    UniqueViolation,
)
from vault.store.sql.idempotency import key_params, store_key
from vault.store.sql.keys import members_update
from vault.store.sql.sessions import session_params, write_session

_MEMBER_COLUMNS = ["member_id", "created_at", "last_seen_at", *HMAC_COLUMNS.values()]
_MEMBER_COLUMNS += list(CT_COLUMNS.values())
_INSERT_MEMBER = both(
    f"INSERT INTO members ({', '.join(_MEMBER_COLUMNS)}) "
    f"VALUES ({', '.join(f'${i}' for i in range(1, len(_MEMBER_COLUMNS) + 1))})"
)
_INSERT_KEY = both(
    "INSERT INTO member_keys (member_id, dek_id, kek_version, wrapped_dek) VALUES ($1, $2, $3, $4)"
)
# A connection cancels a pending inactivity notice (the clock restarts).
_SEEN = "UPDATE members SET last_seen_at = $2, inactivity_notice_at = NULL"
_LOGIN = both(f"{_SEEN} WHERE member_id = $1")
_LOGIN_REHASH = both(f"{_SEEN}, password_hash_ct = $3 WHERE member_id = $1")
#: One entry: (member_id, at) then :func:`entry_ciphertexts`.
INSERT_ACCESS = both(
    "INSERT INTO access_log (member_id, at, action_ct, ip_ct, caller_ct) "
    "VALUES ($1, $2, $3, $4, $5)"
)
_CONSENTS = both(
    "SELECT purpose, granted, policy_version, recorded_at FROM consents "
    "WHERE member_id = $1 ORDER BY purpose"
)


def optional_bytes(value: Any) -> bytes | None:
    """A nullable BLOB/bytea column (caller_ct before migration 0011)."""
    return None if value is None else bytes(value)


def entry_ciphertexts(entry: NewAccessEntry | AccessEntryRow) -> tuple[bytes, bytes, bytes | None]:
    """An entry's (action, ip, caller) ciphertexts as the drivers bind them."""
    return bytes(entry.action_ct), bytes(entry.ip_ct), optional_bytes(entry.caller_ct)


class SqlMembers(SqlExecutor):
    """Sign-ups, updates, logins and consents."""

    async def insert_member(
        self, member: MemberRow, idempotency: IdempotencyKey | None = None, *, caller: str = ""
    ) -> None:
        d = self._dialect
        member_id = d.member_id(check_new_member(member))
        values = [
            member_id,
            d.time(member.created_at),
            d.time(member.last_seen_at),
            *(bytes(member.blind_indexes[f]) for f in HMAC_COLUMNS),
            *(bytes(member.ciphertexts[f]) for f in CT_COLUMNS),
        ]
        key = member.key
        # Sign-up's answers are the member's first consent events, under the version
        # in force (the newest published; before any, the configured one).
        consents = member.consents
        request = key_params(d, idempotency)
        counted = any(c.purpose == STATISTICS_PURPOSE and c.granted for c in member.consents)

        async def body(tx: Tx) -> None:
            await guards.require_not_destroyed(tx, d, key.kek_version)
            await tx.run(_INSERT_MEMBER[d.name], *values)
            await tx.run(
                _INSERT_KEY[d.name], member_id, key.dek_id, key.kek_version, bytes(key.wrapped_dek)
            )
            for c in consents:
                await append_consents(
                    tx,
                    d,
                    member_id,
                    [NewConsent(c.purpose, c.granted)],
                    c.recorded_at,
                    recorded_by=RECORDED_BY_MEMBER,
                    caller=caller,
                    default_version=c.policy_version,
                )
            if counted:  # consents to statistics as it signs up: a sign-up that day
                await count_sign_up(tx, d, member.created_at.astimezone(UTC).date())
            await store_key(tx, d, request)  # a live key there rolls the member back

        try:
            await self._in_transaction(body)
        except UniqueViolation as exc:
            raise exc.error() from None
        except ForeignKeyViolation:
            # The only foreign key a caller can miss here is the KEK version.
            raise ValueError("the member key's KEK version does not exist") from None

    async def update_member(
        self,
        member_id: str,
        ciphertexts: Mapping[str, bytes],
        blind_indexes: Mapping[str, bytes] | None = None,
        *,
        dek_id: int,
        notify: OutboxMessage | None = None,
        corrected_at: datetime | None = None,
        corrected_by: str = "",
    ) -> bool:
        d = self._dialect
        key = d.member_id(member_id)
        assignments = update_assignments(ciphertexts, blind_indexes)
        update = members_update(d, [column for column, _ in assignments])
        outbox_row = None if notify is None else guards.outbox_params(d, notify)
        if outbox_row is not None and outbox_row[1] != key:
            raise ValueError("the message is for another member")

        async def body(tx: Tx) -> bool:
            # The lock order: the members row first (by the update itself), then
            # the key row; a rotated key rolls the update back.
            if assignments:
                if await tx.run(update, key, *(value for _, value in assignments)) != 1:
                    return False
            elif not await tx.fetchval(guards.LOCK_MEMBER_ROW[d.name], key):
                return False
            await guards.check_dek(tx, d, key, dek_id)
            if outbox_row is not None:
                await tx.run(guards.INSERT_OUTBOX[d.name], *outbox_row)
            if corrected_at is not None:
                await release_corrected(tx, d, key, ciphertexts, corrected_at, corrected_by)
            return True

        try:
            return await self._in_transaction(body)
        except UniqueViolation as exc:
            raise exc.error() from None
        except MemberGone:
            return False

    async def record_login(
        self,
        member_id: str,
        entry: NewAccessEntry,
        password_hash_ct: bytes | None = None,
        *,
        dek_id: int,
        session: NewSession | None = None,
    ) -> bool:
        d = self._dialect
        key = d.member_id(member_id)
        at = d.time(entry.at)
        started = None if session is None else session_params(d, session)
        if started is not None and started[0][1] != key:
            raise ValueError("the session is another member's")
        login: tuple[Any, ...] = (
            (_LOGIN[d.name], key, at)
            if password_hash_ct is None
            else (_LOGIN_REHASH[d.name], key, at, bytes(password_hash_ct))
        )
        log_row = (key, at, *entry_ciphertexts(entry))

        async def body(tx: Tx) -> bool:
            # The lock order: the members row first (by the update), then the key
            # row; a rotated key rolls the update back.
            if await tx.run(*login) != 1:
                return False
            await guards.check_dek(tx, d, key, dek_id)
            await tx.run(INSERT_ACCESS[d.name], *log_row)
            if started is not None:  # under the member's row lock, taken above
                await write_session(tx, d, started)
            return True

        try:
            return await self._in_transaction(body)
        except (MemberGone, ForeignKeyViolation):
            return False

    async def list_consents(self, member_id: str) -> list[ConsentRow]:
        d = self._dialect
        rows = await self._fetch(_CONSENTS[d.name], d.member_id(member_id))
        return [
            ConsentRow(str(purpose), bool(granted), str(version), d.from_time(at))
            for purpose, granted, version, at in rows
        ]
