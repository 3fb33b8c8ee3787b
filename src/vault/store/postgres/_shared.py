"""PostgreSQL: locks, checks and rows that several domains' writes share."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from vault.errors import (
    KeyChanged,
    PreconditionFailed,
)
from vault.store._common import (
    CT_COLUMNS,
    CT_SELECT,
    outbox_params_json,
    require_aware,
)
from vault.store.postgres._db import _uuid
from vault.store.rows import (
    OutboxMessage,
    RetentionCheck,
)

# Step 1 of the lock order for a key change or a shred: the member row FOR UPDATE,
# with what those check against (last_seen_at, then the ciphertexts in column order).
_LOCK_MEMBER = f"SELECT last_seen_at, {CT_SELECT} FROM members WHERE member_id = $1 FOR UPDATE"
# Step 2 for them: the key row FOR UPDATE.
_LOCK_MEMBER_KEY = "SELECT dek_id, kek_version FROM member_keys WHERE member_id = $1 FOR UPDATE"


def _field_ciphertexts(locked: Mapping[str, Any]) -> list[bytes]:
    """The ciphertexts of a row read by _LOCK_MEMBER, in column order."""
    return [bytes(locked[column]) for column in CT_COLUMNS.values()]


async def _locked_entries(conn: Any, key: uuid.UUID) -> dict[int, datetime]:
    """Step 4: the member's access-log entries FOR UPDATE, entry_id -> at. Writers of
    these rows wait for the caller's transaction (and then fail their dek_id check).
    An update names the partition key too, so each row is found by partition
    pruning rather than a probe of every month."""
    rows = await conn.fetch(
        "SELECT entry_id, at FROM access_log WHERE member_id = $1 FOR UPDATE", key
    )
    return {int(r["entry_id"]): r["at"] for r in rows}


async def _matches_retention(
    conn: Any,
    key: uuid.UUID,
    check: RetentionCheck,
    expected: list[bytes],
    locked: Mapping[str, Any],
    dek_id: int | None,
) -> bool:
    """Whether the member (its row ``locked`` and its key row ``dek_id`` locked by
    the caller, steps 1 and 2) is still exactly what the withdrawal copied
    (RetentionCheck). The active version is read FOR SHARE (step 3): a rotation
    that would demote it waits for this transaction, or has committed and is seen."""
    if dek_id != check.dek_id or _field_ciphertexts(locked) != expected:
        return False
    active = await conn.fetchval(
        "SELECT version FROM kek_versions WHERE state = 'active' FOR SHARE"
    )
    if active is None or int(active) != check.kek_version:
        return False
    # An entry came (or went) since the withdrawal read them: copy again.
    return set(await _locked_entries(conn, key)) == set(check.access_entry_ids)


_INSERT_OUTBOX = (
    "INSERT INTO outbox (message_id, member_id, kind, params, created_at, attempts, "
    "next_attempt_at) VALUES ($1, $2, $3, $4::jsonb, $5, $6, $7)"
)


def _outbox_params(message: OutboxMessage) -> tuple[Any, ...]:
    """The outbox row; a message without a next attempt is due at once."""
    created = require_aware(message.created_at)
    due = created if message.next_attempt_at is None else require_aware(message.next_attempt_at)
    return (
        message.message_id,
        _uuid(message.member_id),
        message.kind,
        outbox_params_json(message),
        created,
        int(message.attempts),
        due,
    )


async def _require_not_destroyed(conn: Any, kek_version: int) -> None:
    """Inside a write: a DEK may not be stored wrapped under a destroyed version.
    FOR SHARE makes a concurrent destroy of it wait for us, then count this DEK."""
    state = await conn.fetchval(
        "SELECT state FROM kek_versions WHERE version = $1 FOR SHARE", kek_version
    )
    if state == "destroyed":
        raise PreconditionFailed("kek_version", f"KEK version {kek_version} has been destroyed")


class _MemberGone(Exception):
    """Raised inside a write transaction to roll it back: the member is gone."""


async def _check_dek(conn: Any, member_id: uuid.UUID, dek_id: int) -> None:
    """Step 2 of the lock order in a member's own write, once its members row is
    locked: KeyChanged if its DEK was rotated since the caller sealed under it,
    _MemberGone if there is no key. The share lock holds the key row until commit."""
    current = await conn.fetchval(
        "SELECT dek_id FROM member_keys WHERE member_id = $1 FOR SHARE", member_id
    )
    if current is None:
        raise _MemberGone
    if int(current) != dek_id:
        raise KeyChanged
