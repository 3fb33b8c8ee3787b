"""SQLite: members, their consents, sign-ups, updates and logins."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping
from typing import Any

from vault.store._common import (
    CT_COLUMNS,
    HMAC_COLUMNS,
    MEMBER_COLUMNS,
    canonical_member_id,
    check_new_member,
    hmac_column,
    update_assignments,
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
from vault.store.sqlite._db import _from_us, _integrity_error, _SqliteDatabase, _to_us
from vault.store.sqlite._shared import (
    _INSERT_OUTBOX,
    _member_has_dek,
    _outbox_params,
    _require_not_destroyed,
)

# The member's consents ride along as a JSON array: one statement per read.
_SELECT_MEMBER = (
    f"SELECT {MEMBER_COLUMNS}, (SELECT json_group_array("
    "json_array(c.purpose, c.granted, c.policy_version, c.recorded_at)) FROM "
    "(SELECT * FROM consents WHERE member_id = m.member_id ORDER BY purpose) AS c) AS consents "
    "FROM members AS m JOIN member_keys AS k ON k.member_id = m.member_id"
)


# Column positions in _SELECT_MEMBER: member reads are the hot path, and plain
# tuples index faster than sqlite3.Row looks names up.
_HMAC_AT = {field: 3 + i for i, field in enumerate(HMAC_COLUMNS)}
_CT_AT = {field: 3 + len(HMAC_COLUMNS) + i for i, field in enumerate(CT_COLUMNS)}
_KEY_AT = 3 + len(HMAC_COLUMNS) + len(CT_COLUMNS)


def _member(row: tuple[Any, ...]) -> MemberRow:
    member_id = str(row[0])
    dek_id, kek_version, wrapped_dek, consents = row[_KEY_AT : _KEY_AT + 4]
    return MemberRow(
        member_id=member_id,
        created_at=_from_us(row[1]),
        last_seen_at=_from_us(row[2]),
        ciphertexts={field: row[at] for field, at in _CT_AT.items()},
        blind_indexes={field: row[at] for field, at in _HMAC_AT.items()},
        key=MemberKeyRow(member_id, int(dek_id), int(kek_version), wrapped_dek),
        consents=tuple(
            ConsentRow(str(purpose), bool(granted), str(version), _from_us(recorded_at))
            for purpose, granted, version, recorded_at in json.loads(consents)
        ),
    )


def _fetch_member(conn: sqlite3.Connection, where: str, value: object) -> MemberRow | None:
    cursor = conn.cursor()
    cursor.row_factory = None
    row = cursor.execute(f"{_SELECT_MEMBER} WHERE {where} = ?", (value,)).fetchone()
    return None if row is None else _member(row)


def _consents(conn: sqlite3.Connection, member_id: str) -> list[ConsentRow]:
    rows = conn.execute(
        "SELECT purpose, granted, policy_version, recorded_at FROM consents "
        "WHERE member_id = ? ORDER BY purpose",
        (member_id,),
    ).fetchall()
    return [
        ConsentRow(
            purpose=str(r["purpose"]),
            granted=bool(r["granted"]),
            policy_version=str(r["policy_version"]),
            recorded_at=_from_us(r["recorded_at"]),
        )
        for r in rows
    ]


class SqliteMembers(_SqliteDatabase):
    """SQLite: members, their consents, sign-ups, updates and logins."""

    # --- members ---------------------------------------------------------------
    async def insert_member(self, member: MemberRow) -> None:
        member_id = check_new_member(member)
        consents = member.consents
        columns = [
            "member_id",
            "created_at",
            "last_seen_at",
            *HMAC_COLUMNS.values(),
            *CT_COLUMNS.values(),
        ]
        values = [
            member_id,
            _to_us(member.created_at),
            _to_us(member.last_seen_at),
            *(bytes(member.blind_indexes[f]) for f in HMAC_COLUMNS),
            *(bytes(member.ciphertexts[f]) for f in CT_COLUMNS),
        ]
        insert_member = (
            f"INSERT INTO members ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
        )
        key = member.key
        consent_rows = [
            (member_id, c.purpose, int(c.granted), c.policy_version, _to_us(c.recorded_at))
            for c in consents
        ]

        def work(conn: sqlite3.Connection) -> None:
            _require_not_destroyed(conn, key.kek_version)
            try:
                conn.execute(insert_member, values)
                conn.execute(
                    "INSERT INTO member_keys (member_id, dek_id, kek_version, wrapped_dek) "
                    "VALUES (?, ?, ?, ?)",
                    (member_id, key.dek_id, key.kek_version, bytes(key.wrapped_dek)),
                )
                conn.executemany(
                    "INSERT INTO consents (member_id, purpose, granted, policy_version, "
                    "recorded_at) VALUES (?, ?, ?, ?, ?)",
                    consent_rows,
                )
            except sqlite3.IntegrityError as exc:
                raise _integrity_error(exc) from None

        await self._write(work)

    async def get_member(self, member_id: str) -> MemberRow | None:
        member_id = canonical_member_id(member_id)

        return self._read(lambda conn: _fetch_member(conn, "m.member_id", member_id))

    async def find_member(self, index: IndexedField, hmac: bytes) -> MemberRow | None:
        column = hmac_column(index)
        value = bytes(hmac)

        return self._read(lambda conn: _fetch_member(conn, f"m.{column}", value))

    async def update_member(
        self,
        member_id: str,
        ciphertexts: Mapping[str, bytes],
        blind_indexes: Mapping[str, bytes] | None = None,
        *,
        dek_id: int,
        notify: OutboxMessage | None = None,
    ) -> bool:
        member_id = canonical_member_id(member_id)
        assignments = update_assignments(ciphertexts, blind_indexes)
        setters = ", ".join(f"{column} = ?" for column, _ in assignments)
        params = [value for _, value in assignments] + [member_id]
        outbox_row = None if notify is None else _outbox_params(notify)
        if outbox_row is not None and outbox_row[1] != member_id:
            raise ValueError("the message is for another member")

        def work(conn: sqlite3.Connection) -> bool:
            if not _member_has_dek(conn, member_id, dek_id):
                return False
            if assignments:
                try:
                    cur = conn.execute(f"UPDATE members SET {setters} WHERE member_id = ?", params)
                except sqlite3.IntegrityError as exc:
                    raise _integrity_error(exc) from None
                if cur.rowcount != 1:
                    return False
            if outbox_row is not None:
                conn.execute(_INSERT_OUTBOX, outbox_row)
            return True

        return await self._write(work)

    async def record_login(
        self,
        member_id: str,
        entry: NewAccessEntry,
        password_hash_ct: bytes | None = None,
        *,
        dek_id: int,
    ) -> bool:
        member_id = canonical_member_id(member_id)
        at = _to_us(entry.at)
        if password_hash_ct is None:
            update: tuple[str, list[Any]] = (
                # A connection cancels a pending inactivity notice (the clock restarts).
                "UPDATE members SET last_seen_at = ?, inactivity_notice_at = NULL "
                "WHERE member_id = ?",
                [at, member_id],
            )
        else:
            update = (
                "UPDATE members SET last_seen_at = ?, inactivity_notice_at = NULL, "
                "password_hash_ct = ? WHERE member_id = ?",
                [at, bytes(password_hash_ct), member_id],
            )
        log_params = (member_id, at, *entry_ciphertexts(entry))

        def work(conn: sqlite3.Connection) -> bool:
            if not _member_has_dek(conn, member_id, dek_id):
                return False
            conn.execute(*update)
            conn.execute(INSERT_ACCESS["sqlite"], log_params)
            return True

        return await self._write(work)

    async def list_consents(self, member_id: str) -> list[ConsentRow]:
        member_id = canonical_member_id(member_id)
        return self._read(lambda conn: _consents(conn, member_id))
