"""PostgreSQL: members, their consents, sign-ups, updates and logins."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import asyncpg

from vault.store._common import (
    CT_COLUMNS,
    HMAC_COLUMNS,
    MEMBER_COLUMNS,
    check_new_member,
    hmac_column,
    require_aware,
    update_assignments,
)
from vault.store.postgres._db import _affected, _PostgresDatabase, _unique_error, _uuid
from vault.store.postgres._shared import (
    _INSERT_OUTBOX,
    _check_dek,
    _MemberGone,
    _outbox_params,
    _require_not_destroyed,
)
from vault.store.rows import (
    ConsentRow,
    IndexedField,
    MemberKeyRow,
    MemberRow,
    NewAccessEntry,
    OutboxMessage,
)
from vault.store.sql.access_log import INSERT_ACCESS, entry_ciphertexts

# The member's consents ride along as an array of records: one round trip.
_SELECT_MEMBER = (
    f"SELECT {MEMBER_COLUMNS}, ARRAY("
    "SELECT ROW(c.purpose, c.granted, c.policy_version, c.recorded_at) FROM consents AS c "
    "WHERE c.member_id = m.member_id ORDER BY c.purpose) AS consents "
    "FROM members AS m JOIN member_keys AS k ON k.member_id = m.member_id"
)


def _member(row: Mapping[str, Any]) -> MemberRow:
    member_id = str(row["member_id"])
    return MemberRow(
        member_id=member_id,
        created_at=row["created_at"],
        last_seen_at=row["last_seen_at"],
        ciphertexts={field: bytes(row[column]) for field, column in CT_COLUMNS.items()},
        blind_indexes={field: bytes(row[column]) for field, column in HMAC_COLUMNS.items()},
        key=MemberKeyRow(
            member_id=member_id,
            dek_id=int(row["dek_id"]),
            kek_version=int(row["kek_version"]),
            wrapped_dek=bytes(row["wrapped_dek"]),
        ),
        consents=tuple(_consent(c) for c in row["consents"]),
    )


def _consent(row: Sequence[Any]) -> ConsentRow:
    purpose, granted, policy_version, recorded_at = row
    return ConsentRow(str(purpose), bool(granted), str(policy_version), recorded_at)


class PostgresMembers(_PostgresDatabase):
    """PostgreSQL: members, their consents, sign-ups, updates and logins."""

    # --- members ---------------------------------------------------------------
    async def insert_member(self, member: MemberRow) -> None:
        member_id = uuid.UUID(check_new_member(member))
        consents = member.consents
        columns = [
            "member_id",
            "created_at",
            "last_seen_at",
            *HMAC_COLUMNS.values(),
            *CT_COLUMNS.values(),
        ]
        placeholders = ", ".join(f"${i}" for i in range(1, len(columns) + 1))
        values = [
            member_id,
            member.created_at,
            member.last_seen_at,
            *(bytes(member.blind_indexes[f]) for f in HMAC_COLUMNS),
            *(bytes(member.ciphertexts[f]) for f in CT_COLUMNS),
        ]
        key = member.key
        try:
            async with self._transaction() as conn:
                await _require_not_destroyed(conn, key.kek_version)
                await conn.execute(
                    f"INSERT INTO members ({', '.join(columns)}) VALUES ({placeholders})", *values
                )
                await conn.execute(
                    "INSERT INTO member_keys (member_id, dek_id, kek_version, wrapped_dek) "
                    "VALUES ($1, $2, $3, $4)",
                    member_id,
                    key.dek_id,
                    key.kek_version,
                    bytes(key.wrapped_dek),
                )
                if consents:
                    await conn.executemany(
                        "INSERT INTO consents (member_id, purpose, granted, policy_version, "
                        "recorded_at) VALUES ($1, $2, $3, $4, $5)",
                        [
                            (member_id, c.purpose, c.granted, c.policy_version, c.recorded_at)
                            for c in consents
                        ],
                    )
        except asyncpg.UniqueViolationError as exc:
            raise _unique_error(exc) from None
        except asyncpg.ForeignKeyViolationError:
            # The only foreign key a caller can miss here is the KEK version.
            raise ValueError("the member key's KEK version does not exist") from None

    async def get_member(self, member_id: str) -> MemberRow | None:
        async with self._connection() as conn:
            row = await conn.fetchrow(f"{_SELECT_MEMBER} WHERE m.member_id = $1", _uuid(member_id))
        return None if row is None else _member(row)

    async def find_member(self, index: IndexedField, hmac: bytes) -> MemberRow | None:
        column = hmac_column(index)
        async with self._connection() as conn:
            row = await conn.fetchrow(f"{_SELECT_MEMBER} WHERE m.{column} = $1", bytes(hmac))
        return None if row is None else _member(row)

    async def update_member(
        self,
        member_id: str,
        ciphertexts: Mapping[str, bytes],
        blind_indexes: Mapping[str, bytes] | None = None,
        *,
        dek_id: int,
        notify: OutboxMessage | None = None,
    ) -> bool:
        key = _uuid(member_id)
        assignments = update_assignments(ciphertexts, blind_indexes)
        outbox_row = None if notify is None else _outbox_params(notify)
        if outbox_row is not None and outbox_row[1] != key:
            raise ValueError("the message is for another member")
        try:
            async with self._transaction() as conn:
                # The lock order: the members row first (by the update itself), then
                # the key row; a rotated key rolls the update back.
                if assignments:
                    setters = ", ".join(
                        f"{column} = ${i}" for i, (column, _) in enumerate(assignments, start=2)
                    )
                    status = await conn.execute(
                        f"UPDATE members SET {setters} WHERE member_id = $1",
                        key,
                        *(value for _, value in assignments),
                    )
                    if _affected(status) != 1:
                        return False
                elif not await conn.fetchval(
                    "SELECT 1 FROM members WHERE member_id = $1 FOR NO KEY UPDATE", key
                ):
                    return False
                await _check_dek(conn, key, dek_id)
                if outbox_row is not None:
                    await conn.execute(_INSERT_OUTBOX, *outbox_row)
        except asyncpg.UniqueViolationError as exc:
            raise _unique_error(exc) from None
        except _MemberGone:
            return False
        return True

    async def record_login(
        self,
        member_id: str,
        entry: NewAccessEntry,
        password_hash_ct: bytes | None = None,
        *,
        dek_id: int,
    ) -> bool:
        key = _uuid(member_id)
        at = require_aware(entry.at)
        try:
            async with self._transaction() as conn:
                # The lock order: the members row first (by the update), then the key
                # row; a rotated key rolls the update back.
                if password_hash_ct is None:
                    status = await conn.execute(
                        # A connection cancels a pending inactivity notice (the clock
                        # restarts).
                        "UPDATE members SET last_seen_at = $2, inactivity_notice_at = NULL "
                        "WHERE member_id = $1",
                        key,
                        at,
                    )
                else:
                    status = await conn.execute(
                        "UPDATE members SET last_seen_at = $2, inactivity_notice_at = NULL, "
                        "password_hash_ct = $3 WHERE member_id = $1",
                        key,
                        at,
                        bytes(password_hash_ct),
                    )
                if _affected(status) != 1:
                    return False
                await _check_dek(conn, key, dek_id)
                await conn.execute(INSERT_ACCESS["postgres"], key, at, *entry_ciphertexts(entry))
        except _MemberGone:
            return False
        return True

    async def list_consents(self, member_id: str) -> list[ConsentRow]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT purpose, granted, policy_version, recorded_at FROM consents "
                "WHERE member_id = $1 ORDER BY purpose",
                _uuid(member_id),
            )
        return [
            ConsentRow(
                purpose=str(r["purpose"]),
                granted=bool(r["granted"]),
                policy_version=str(r["policy_version"]),
                recorded_at=r["recorded_at"],
            )
            for r in rows
        ]
