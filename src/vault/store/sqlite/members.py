"""SQLite: the member read, its consents as JSON (the rest of members is in
vault.store.sql.members)."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from vault.store._common import (
    CT_COLUMNS,
    HMAC_COLUMNS,
    MEMBER_COLUMNS,
    canonical_member_id,
    hmac_column,
)
from vault.store.rows import ConsentRow, IndexedField, MemberKeyRow, MemberRow
from vault.store.sqlite._db import _from_us, _SqliteDatabase

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


class SqliteMembers(_SqliteDatabase):
    """SQLite: reading a member with its key and consents in one statement."""

    # Sign-ups, updates, logins and consents are shared (vault.store.sql.members).
    async def get_member(self, member_id: str) -> MemberRow | None:
        member_id = canonical_member_id(member_id)

        return self._read(lambda conn: _fetch_member(conn, "m.member_id", member_id))

    async def find_member(self, index: IndexedField, hmac: bytes) -> MemberRow | None:
        column = hmac_column(index)
        value = bytes(hmac)

        return self._read(lambda conn: _fetch_member(conn, f"m.{column}", value))
