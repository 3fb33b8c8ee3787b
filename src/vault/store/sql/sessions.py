"""Member sessions (:class:`vault.store.contracts.sessions.SessionStore`), once for
both backends. Creating one is one transaction: the member check, the insert and
the pruning, under the member's row lock (PostgreSQL; SQLite: the write lock), so
two logins of one member cannot both keep an extra session. A login stores its
session inside its own transaction (:mod:`vault.store.sql.members`), with the
same statements (:func:`write_session`) under the same lock."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from vault.store._common import check_limit, check_token_hash
from vault.store.contracts.sessions import NewSession, SessionRow
from vault.store.sql.dialect import Dialect, both, each
from vault.store.sql.executor import ForeignKeyViolation, SqlExecutor, Tx

# The member's row first (the lock order), with the lock an UPDATE of the member
# takes: logins of one member prune one after the other; a shred waits, or has won.
_LOCK_MEMBER = each(
    lambda d: (
        "SELECT 1 FROM members WHERE member_id = $1"
        + (" FOR NO KEY UPDATE" if d.name == "postgres" else "")
    )
)
_COLUMNS = "token_hash, member_id, created_at, idle_expires_at, expires_at"
_INSERT_SESSION = both(f"INSERT INTO member_sessions ({_COLUMNS}) VALUES ($1, $2, $3, $4, $5)")
# Keeps the member's ``$3`` newest live sessions: expired ones and older ones go.
_PRUNE_MEMBER_SESSIONS = both(
    "DELETE FROM member_sessions WHERE member_id = $1 AND token_hash NOT IN ("
    "SELECT token_hash FROM member_sessions WHERE member_id = $1 AND idle_expires_at > $2 "
    "ORDER BY created_at DESC, token_hash DESC LIMIT $3)"
)
# PostgreSQL: rows another purge (or a login's pruning) holds are skipped, not
# waited for, so concurrent purges neither queue nor deadlock.
_PURGE_SESSIONS = each(
    lambda d: (
        "DELETE FROM member_sessions WHERE token_hash IN ("
        "SELECT token_hash FROM member_sessions WHERE idle_expires_at <= $1 "
        "ORDER BY idle_expires_at LIMIT $2"
        + (" FOR UPDATE SKIP LOCKED" if d.name == "postgres" else "")
        + ")"
    )
)
_FIND = both(
    f"SELECT {_COLUMNS} FROM member_sessions WHERE token_hash = $1 AND idle_expires_at > $2"
)
# Never past the absolute end: idle_expires_at <= expires_at always holds, so
# "live" is one indexed comparison.
_REFRESH = both(
    "UPDATE member_sessions SET idle_expires_at = "
    "CASE WHEN $3 < expires_at THEN $3 ELSE expires_at END "
    "WHERE token_hash = $1 AND idle_expires_at > $2"
)
_END = both("DELETE FROM member_sessions WHERE token_hash = $1 AND member_id = $2")
#: Every session of the member (also ended inside the password write).
END_MEMBER_SESSIONS = both("DELETE FROM member_sessions WHERE member_id = $1")


#: A new session's statement arguments: the insert's, then the purge limit.
SessionParams = tuple[tuple[Any, ...], int, int]


def session_params(d: Dialect, new: NewSession) -> SessionParams:
    """:func:`write_session`'s arguments, checked: a 32-byte hash, aware times in
    order, ``keep`` at least 1, a valid purge limit."""
    session = new.row
    if not session.created_at < session.idle_expires_at <= session.expires_at:
        raise ValueError("a session needs created_at < idle_expires_at <= expires_at")
    if new.keep < 1:
        raise ValueError("keep must be at least 1")
    row = (
        check_token_hash(session.token_hash),
        d.member_id(session.member_id),
        d.time(session.created_at),
        d.time(session.idle_expires_at),
        d.time(session.expires_at),
    )
    return row, new.keep, check_limit(new.purge_limit)


async def write_session(tx: Tx, d: Dialect, params: SessionParams) -> None:
    """Insert the session, prune its member's, purge a batch of expired ones. The
    caller holds the member's row lock (the lock order: members first)."""
    row, keep, limit = params
    await tx.run(_INSERT_SESSION[d.name], *row)
    await tx.run(_PRUNE_MEMBER_SESSIONS[d.name], row[1], row[2], keep)
    if limit:  # most logins purge nothing (vault.sessions.PURGE_EVERY)
        await tx.run(_PURGE_SESSIONS[d.name], row[2], limit)


def _row(d: Dialect, r: Sequence[Any]) -> SessionRow:
    return SessionRow(
        bytes(r[0]), str(r[1]), d.from_time(r[2]), d.from_time(r[3]), d.from_time(r[4])
    )


class SqlSessions(SqlExecutor):
    """Creating (one transaction), looking up, refreshing, ending and purging sessions."""

    async def create_session(self, session: SessionRow, *, keep: int, purge_limit: int) -> bool:
        d = self._dialect
        params = session_params(d, NewSession(session, keep, purge_limit))

        async def body(tx: Tx) -> bool:
            if await tx.fetchval(_LOCK_MEMBER[d.name], params[0][1]) is None:
                return False
            await write_session(tx, d, params)
            return True

        try:
            return await self._in_transaction(body)
        except ForeignKeyViolation:
            return False

    async def find_session(self, token_hash: bytes, now: datetime) -> SessionRow | None:
        d = self._dialect
        rows = await self._fetch(_FIND[d.name], check_token_hash(token_hash), d.time(now))
        return _row(d, rows[0]) if rows else None

    async def refresh_session(self, token_hash: bytes, now: datetime, idle_until: datetime) -> bool:
        d = self._dialect
        sql = _REFRESH[d.name]
        return (
            await self._run(sql, check_token_hash(token_hash), d.time(now), d.time(idle_until)) == 1
        )

    async def end_session(self, token_hash: bytes, member_id: str) -> bool:
        d = self._dialect
        hashed = check_token_hash(token_hash)
        return await self._run(_END[d.name], hashed, d.member_id(member_id)) == 1

    async def end_member_sessions(self, member_id: str) -> int:
        d = self._dialect
        return await self._run(END_MEMBER_SESSIONS[d.name], d.member_id(member_id))

    async def purge_sessions(self, now: datetime, limit: int) -> int:
        d = self._dialect
        return await self._run(_PURGE_SESSIONS[d.name], d.time(now), check_limit(limit))
