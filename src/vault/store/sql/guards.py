"""Locks, checks and rows that several domains' transactions share, once for both.

The lock order (see :mod:`vault.store.postgres`): 1. the ``members`` row, 2. its
``member_keys`` row, 3. ``kek_versions`` rows, 4. the member's own rows. On SQLite
the lock clauses render empty: a write holds the database's one write lock.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vault.errors import KeyChanged, PreconditionFailed
from vault.store._common import CT_COLUMNS, CT_SELECT, outbox_params_json, require_aware
from vault.store.rows import OutboxMessage, RetentionCheck
from vault.store.sql.dialect import Dialect, both
from vault.store.sql.executor import MemberGone, Tx

# Step 1 for a key change or a shred: the member row, with what those check against
# (last_seen_at, then the ciphertexts in column order).
LOCK_MEMBER = both(
    f"SELECT last_seen_at, {CT_SELECT} FROM members " + "WHERE member_id = $1{update}"
)
# Step 2 for them: the key row.
LOCK_MEMBER_KEY = both("SELECT dek_id, kek_version FROM member_keys WHERE member_id = $1{update}")
_MEMBER_DEK = both("SELECT dek_id FROM member_keys WHERE member_id = $1{share}")
_ACTIVE_VERSION = both("SELECT version FROM kek_versions WHERE state = 'active'{share}")
_VERSION_STATE = both("SELECT state FROM kek_versions WHERE version = $1{share}")
# Step 4. An update names the partition key (at) too, so PostgreSQL finds each
# row by partition pruning rather than a probe of every month.
_LOCK_ENTRIES = both("SELECT entry_id, at FROM access_log WHERE member_id = $1{update}")
_LOCK_CONSENT_EVENTS = both("SELECT event_id FROM consent_events WHERE member_id = $1{update}")
_LOCK_DISCLOSURES = both("SELECT disclosure_id FROM disclosures WHERE member_id = $1{update}")
# A member's own write that changes no member column still takes its row first.
LOCK_MEMBER_ROW = both("SELECT 1 FROM members WHERE member_id = $1{no_key_update}")
MEMBER_EXISTS = both("SELECT 1 FROM members WHERE member_id = $1{share}")
_OUTBOX_ROW = (
    "INSERT INTO outbox (message_id, member_id, kind, params, created_at, attempts, "
    "next_attempt_at) VALUES ($1, $2, $3, $4{jsonb}, $5, $6, $7)"
)
INSERT_OUTBOX = both(_OUTBOX_ROW)
# Enqueueing again (a retried call) is a no-op.
ENQUEUE_OUTBOX = both(f"{_OUTBOX_ROW} ON CONFLICT (message_id) DO NOTHING")


def field_ciphertexts(locked: Sequence[Any]) -> list[bytes]:
    """The ciphertexts of a row read by LOCK_MEMBER, in column order."""
    return [bytes(locked[i]) for i in range(1, 1 + len(CT_COLUMNS))]


def outbox_params(d: Dialect, message: OutboxMessage) -> tuple[Any, ...]:
    """The outbox row; a message without a next attempt is due at once."""
    created = d.time(require_aware(message.created_at))
    due = created if message.next_attempt_at is None else d.time(message.next_attempt_at)
    return (
        message.message_id,
        d.member_id(message.member_id),
        message.kind,
        outbox_params_json(message),
        created,
        int(message.attempts),
        due,
    )


async def require_not_destroyed(tx: Tx, d: Dialect, kek_version: int) -> None:
    """Inside a write: a DEK may not be stored wrapped under a destroyed version.
    PostgreSQL's FOR SHARE makes a concurrent destroy of it wait for us, then
    count this DEK."""
    state = await tx.fetchval(_VERSION_STATE[d.name], kek_version)
    if state == "destroyed":
        raise PreconditionFailed("kek_version", f"KEK version {kek_version} has been destroyed")


async def check_dek(tx: Tx, d: Dialect, key: Any, dek_id: int) -> None:
    """Step 2 in a member's own write, once its members row is locked: KeyChanged
    if its DEK was rotated since the caller sealed under it, MemberGone if there is
    no key. The share lock holds the key row until commit."""
    current = await tx.fetchval(_MEMBER_DEK[d.name], key)
    if current is None:
        raise MemberGone
    if int(current) != dek_id:
        raise KeyChanged


async def locked_entries(tx: Tx, d: Dialect, key: Any) -> dict[int, Any]:
    """Step 4: the member's access-log entries, entry_id -> at (as the column holds
    it). Writers of these rows wait for the caller (and then fail their dek check)."""
    return {int(r[0]): r[1] for r in await tx.fetch(_LOCK_ENTRIES[d.name], key)}


async def matches_retention(
    tx: Tx,
    d: Dialect,
    key: Any,
    check: RetentionCheck,
    expected: list[bytes],
    locked: Sequence[Any],
    dek_id: int | None,
) -> bool:
    """Whether the member (its row ``locked`` and its key row ``dek_id`` locked by
    the caller, steps 1 and 2) is still exactly what the withdrawal copied. The
    active version is read FOR SHARE (step 3): a rotation that would demote it
    waits for this transaction, or has committed and is seen."""
    if dek_id != check.dek_id or field_ciphertexts(locked) != expected:
        return False
    active = await tx.fetchval(_ACTIVE_VERSION[d.name])
    if active is None or int(active) != check.kek_version:
        return False
    # An entry came (or went) since the withdrawal read them: copy again.
    if set(await locked_entries(tx, d, key)) != set(check.access_entry_ids):
        return False
    # So did a consent event (an answer recorded since the copy was made).
    events = await tx.fetch(_LOCK_CONSENT_EVENTS[d.name], key)
    if {int(r[0]) for r in events} != set(check.consent_event_ids):
        return False
    # And a disclosure (its ledger entry came after the copy was made).
    return set(await locked_disclosures(tx, d, key)) == set(check.disclosure_ids)


async def locked_disclosures(tx: Tx, d: Dialect, key: Any) -> list[int]:
    """Step 4: the member's ledger entry ids; appends (which check the DEK) wait."""
    return [int(r[0]) for r in await tx.fetch(_LOCK_DISCLOSURES[d.name], key)]
