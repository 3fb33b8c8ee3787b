"""PostgreSQL: the member read, its consents as an array of records (the rest of
members is in vault.store.sql.members)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from vault.store._common import CT_COLUMNS, HMAC_COLUMNS, MEMBER_COLUMNS, hmac_column
from vault.store.postgres._db import _PostgresDatabase, _uuid
from vault.store.rows import ConsentRow, IndexedField, MemberKeyRow, MemberRow

# The member's consents ride along as an array of records: one round trip. Each
# carries when a later policy version's material change of its purpose applies
# (policy_changes): the consent check is in the read's own query, never a cache.
# So are the fields pending corrections freeze.
_SELECT_MEMBER = (
    f"SELECT {MEMBER_COLUMNS}, ARRAY("
    "SELECT ROW(c.purpose, c.granted, c.policy_version, c.recorded_at, "
    "(SELECT min(p.effective_at) FROM policy_changes AS p WHERE p.purpose = c.purpose "
    "AND p.published_at > c.recorded_at)) FROM consents AS c "
    "WHERE c.member_id = m.member_id ORDER BY c.purpose) AS consents, "
    # The fields pending corrections freeze (a partial index).
    "ARRAY(SELECT f.field FROM correction_fields AS f "
    "WHERE f.member_id = m.member_id AND f.state = 'pending') AS frozen "
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
        frozen=frozenset(row["frozen"]),
    )


def _consent(row: Sequence[Any]) -> ConsentRow:
    purpose, granted, policy_version, recorded_at, due = row
    return ConsentRow(str(purpose), bool(granted), str(policy_version), recorded_at, due)


class PostgresMembers(_PostgresDatabase):
    """PostgreSQL: reading a member with its key and consents in one round trip."""

    # Sign-ups, updates, logins and consents are shared (vault.store.sql.members).
    async def get_member(self, member_id: str) -> MemberRow | None:
        async with self._connection() as conn:
            row = await conn.fetchrow(f"{_SELECT_MEMBER} WHERE m.member_id = $1", _uuid(member_id))
        return None if row is None else _member(row)

    async def find_member(self, index: IndexedField, hmac: bytes) -> MemberRow | None:
        column = hmac_column(index)
        async with self._connection() as conn:
            row = await conn.fetchrow(f"{_SELECT_MEMBER} WHERE m.{column} = $1", bytes(hmac))
        return None if row is None else _member(row)
