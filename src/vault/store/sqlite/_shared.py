"""SQLite: checks and rows that several domains' writes share, inside their transaction."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from typing import Any

from vault.errors import (
    KeyChanged,
    PreconditionFailed,
)
from vault.store._common import (
    CT_SELECT,
    canonical_member_id,
    outbox_params_json,
)
from vault.store.rows import (
    OutboxMessage,
    RetentionCheck,
)
from vault.store.sqlite._db import _to_us


def _require_not_destroyed(conn: sqlite3.Connection, kek_version: int) -> None:
    """Inside a write: a DEK may not be stored wrapped under a destroyed version (a
    rotation, re-wrap and destroy ran while it was being wrapped)."""
    state = conn.execute(
        "SELECT state FROM kek_versions WHERE version = ?", (kek_version,)
    ).fetchone()
    if state is not None and state[0] == "destroyed":
        raise PreconditionFailed("kek_version", f"KEK version {kek_version} has been destroyed")


def _member_has_dek(conn: sqlite3.Connection, member_id: str, dek_id: int) -> bool:
    """Inside a write: False if no such member; KeyChanged if its DEK was rotated."""
    row = conn.execute(
        "SELECT dek_id FROM member_keys WHERE member_id = ?", (member_id,)
    ).fetchone()
    if row is None:
        return False
    if int(row[0]) != dek_id:
        raise KeyChanged
    return True


def _decoy_write(conn: sqlite3.Connection) -> None:
    """Inside a write: dirty a page without changing anything, so the commit writes
    and syncs the WAL as a real insert's would. A caller probing for accounts must
    not see a missing member answer faster."""
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    conn.execute(f"PRAGMA user_version = {int(version)}")


_INSERT_OUTBOX = (
    "INSERT INTO outbox (message_id, member_id, kind, params, created_at, attempts, "
    "next_attempt_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
)


def _outbox_params(message: OutboxMessage) -> tuple[Any, ...]:
    """The outbox row; a message without a next attempt is due at once."""
    created = _to_us(message.created_at)
    due = created if message.next_attempt_at is None else _to_us(message.next_attempt_at)
    return (
        message.message_id,
        canonical_member_id(message.member_id),
        message.kind,
        outbox_params_json(message),
        created,
        int(message.attempts),
        due,
    )


def _matches_retention(
    conn: sqlite3.Connection, member_id: str, check: RetentionCheck, expected: list[bytes]
) -> bool:
    """Whether the member is still exactly what the withdrawal copied (RetentionCheck)."""
    active = conn.execute("SELECT version FROM kek_versions WHERE state = 'active'").fetchone()
    if active is None or int(active[0]) != check.kek_version:
        return False
    key = conn.execute(
        "SELECT dek_id FROM member_keys WHERE member_id = ?", (member_id,)
    ).fetchone()
    if key is None or int(key[0]) != check.dek_id:
        return False
    return _unchanged_since_read(conn, member_id, expected, check.access_entry_ids)


def _unchanged_since_read(
    conn: sqlite3.Connection, member_id: str, expected: list[bytes], entry_ids: Iterable[int]
) -> bool:
    """Whether the member still has the field ciphertexts ``expected`` (column order)
    and exactly the access-log entries ``entry_ids``, as the caller read them."""
    current = conn.execute(
        f"SELECT {CT_SELECT} FROM members WHERE member_id = ?", (member_id,)
    ).fetchone()
    if current is None or [bytes(c) for c in current] != expected:
        return False  # a field was written since the caller read it
    present = {
        int(r[0])
        for r in conn.execute("SELECT entry_id FROM access_log WHERE member_id = ?", (member_id,))
    }
    return present == set(entry_ids)  # else an entry came (or went) meanwhile
