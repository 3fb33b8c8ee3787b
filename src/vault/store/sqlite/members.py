"""SQLite: the member read, its consents as JSON (the rest of members is in
vault.store.sql.members)."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from vault.clock import from_micros
from vault.store._common import (
    CT_COLUMNS,
    HMAC_COLUMNS,
    MEMBER_COLUMNS,
    canonical_member_id,
    hmac_column,
)
from vault.store.rows import ConsentRow, IndexedField, MemberKeyRow, MemberRow
from vault.store.sqlite._db import _SqliteDatabase

# The member's consents ride along as a JSON array: one statement per read. Each
# carries when a later policy version's material change of its purpose applies
# (policy_changes): the consent check is in the read's own query, never a cache.
# So are the fields pending corrections freeze.
_SELECT_MEMBER = (
    f"SELECT {MEMBER_COLUMNS}, (SELECT json_group_array("
    "json_array(c.purpose, c.granted, c.policy_version, c.recorded_at, c.due)) FROM "
    "(SELECT x.purpose, x.granted, x.policy_version, x.recorded_at, "
    "(SELECT min(p.effective_at) FROM policy_changes AS p WHERE p.purpose = x.purpose "
    "AND p.published_at > x.recorded_at) AS due FROM consents AS x "
    "WHERE x.member_id = m.member_id ORDER BY x.purpose) AS c) AS consents, "
    # The fields pending corrections freeze (a partial index; NULL for none).
    "(SELECT group_concat(field) FROM correction_fields "
    "WHERE member_id = m.member_id AND state = 'pending') AS frozen "
    "FROM members AS m JOIN member_keys AS k ON k.member_id = m.member_id"
)
# Built once: the member read is GetMember's hot path.
_BY_ID = f"{_SELECT_MEMBER} WHERE m.member_id = ?"
_BY_HMAC = {f: f"{_SELECT_MEMBER} WHERE m.{c} = ?" for f, c in HMAC_COLUMNS.items()}

# Column positions in _SELECT_MEMBER: plain tuples index faster than sqlite3.Row
# looks names up, and zip over a slice builds a dict faster than a comprehension.
_CT_FIELDS = tuple(CT_COLUMNS)
_HMAC_FIELDS = tuple(HMAC_COLUMNS)
_CT_AT = 3 + len(HMAC_COLUMNS)
_KEY_AT = _CT_AT + len(CT_COLUMNS)
_NONE_FROZEN: frozenset[str] = frozenset()
# raw_decode: the C scanner without loads' whitespace checks (SQLite wrote the JSON).
_decode = json.JSONDecoder().raw_decode


def _member(row: tuple[Any, ...]) -> MemberRow:
    # The columns come typed by the schema (TEXT member_id and purposes, INTEGER
    # ids, BLOB ciphertexts), so no value is converted again.
    member_id = row[0]
    dek_id, kek_version, wrapped_dek, consents, frozen = row[_KEY_AT:]
    return MemberRow(
        member_id=member_id,
        created_at=from_micros(row[1]),
        last_seen_at=from_micros(row[2]),
        ciphertexts=dict(zip(_CT_FIELDS, row[_CT_AT:_KEY_AT], strict=True)),
        blind_indexes=dict(zip(_HMAC_FIELDS, row[3:_CT_AT], strict=True)),
        key=MemberKeyRow(member_id, dek_id, kek_version, wrapped_dek),
        consents=tuple(
            [
                ConsentRow(
                    purpose,
                    granted == 1,
                    version,
                    from_micros(at),
                    None if due is None else from_micros(due),
                )
                for purpose, granted, version, at, due in _decode(consents)[0]
            ]
        ),
        frozen=_NONE_FROZEN if frozen is None else frozenset(frozen.split(",")),
    )


def _fetch_member(conn: sqlite3.Connection, sql: str, value: object) -> MemberRow | None:
    cursor = conn.cursor()
    cursor.row_factory = None
    row = cursor.execute(sql, (value,)).fetchone()
    return None if row is None else _member(row)


class SqliteMembers(_SqliteDatabase):
    """SQLite: reading a member with its key and consents in one statement."""

    # Sign-ups, updates, logins and consents are shared (vault.store.sql.members).
    async def get_member(self, member_id: str) -> MemberRow | None:
        member_id = canonical_member_id(member_id)

        return self._read(lambda conn: _fetch_member(conn, _BY_ID, member_id))

    async def find_member(self, index: IndexedField, hmac: bytes) -> MemberRow | None:
        hmac_column(index)  # refuses an unknown index name
        sql = _BY_HMAC[index]
        value = bytes(hmac)

        return self._read(lambda conn: _fetch_member(conn, sql, value))
