"""Member sessions: Authenticate's session tokens, by hash."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol


@dataclass(frozen=True, slots=True)
class SessionRow:
    """A member session as stored: the token's SHA-256 (32 bytes, never the token),
    whose it is, and when it ends (``idle_expires_at`` <= ``expires_at``, the
    absolute end; the session is valid while ``now < idle_expires_at``)."""

    token_hash: bytes
    member_id: str
    created_at: datetime
    idle_expires_at: datetime
    expires_at: datetime

    def __repr__(self) -> str:
        return f"<SessionRow {self.member_id} idle_expires_at={self.idle_expires_at.isoformat()}>"


@dataclass(frozen=True, slots=True)
class NewSession:
    """A session to store with a login (MemberStore.record_login), as
    create_session stores one: the row, the member's sessions pruned to the
    ``keep`` newest live ones, up to ``purge_limit`` expired sessions of anyone
    deleted."""

    row: SessionRow
    keep: int
    purge_limit: int


class SessionStore(Protocol):
    """Live member sessions, bounded per member; expired ones are purged."""

    async def create_session(self, session: SessionRow, *, keep: int, purge_limit: int) -> bool:
        """Store a new session (``created_at`` is now) in one transaction with: the
        member's sessions pruned to the ``keep`` newest live ones (the new one
        included; expired and older ones are deleted), and up to ``purge_limit``
        expired sessions of anyone deleted. False, with nothing written, if the
        member is gone."""
        ...

    async def find_session(self, token_hash: bytes, now: datetime) -> SessionRow | None:
        """The session with this token hash if it is live at ``now``; else None."""
        ...

    async def refresh_session(self, token_hash: bytes, now: datetime, idle_until: datetime) -> bool:
        """Move a session live at ``now`` to idle-expire at ``idle_until`` (never past
        its ``expires_at``); False if it is not live (ended, expired, unknown)."""
        ...

    async def end_session(self, token_hash: bytes, member_id: str) -> bool:
        """Delete the member's session with this token hash; False if none."""
        ...

    async def end_member_sessions(self, member_id: str) -> int:
        """Delete every session of the member; how many there were."""
        ...

    async def purge_sessions(self, now: datetime, limit: int) -> int:
        """Delete up to ``limit`` sessions expired at ``now``; how many. Concurrent
        purges skip each other's rows rather than wait."""
        ...
