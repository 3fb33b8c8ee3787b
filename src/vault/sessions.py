"""Member sessions: who the member is, after Authenticate (policy section 7: the
member's own rights are exercised "after identification").

A session token is 256 random bits from the OS CSPRNG, handed to the member's
application once; the database keeps only its SHA-256 (a 256-bit random token
needs no salt or slow hash: nobody can guess one to test against the table). A
session ends ``session_idle`` after its last use and ``session_lifetime`` after
the login at the latest; EndSession, a password change or reset (in the password
write's own transaction, :mod:`vault.store.sql.passwords`) and the member's shred
end it sooner. A member has at most ``sessions_per_member`` live sessions:
a login past it ends the oldest, so a loop of logins cannot grow the table, and
every ``PURGE_EVERY``-th login purges a batch of anyone's expired sessions with it
(more than the logins in between added, so expired rows cannot pile up; the
other logins' transactions are a statement shorter).

Every refusal is one :class:`~vault.errors.MemberSessionRequired`, whatever the
reason, so the answer tells nothing about the member or the token.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import timedelta

from vault import policy
from vault.clock import Clock
from vault.errors import AuthenticationFailed, MemberSessionRequired
from vault.members import VaultSettings, log
from vault.policy import Violations
from vault.store.base import NewSession, SessionRow, SessionStore

SESSION_TOKEN_BYTES = 32  # 256 bits
# What token_urlsafe(32) returns: 43 characters of the URL-safe alphabet.
_TOKEN = re.compile(r"[A-Za-z0-9_-]{43}")
#: A use moves the idle end only when that gains more than this: a burst of calls
#: from one page writes once, and the idle lifetime is exact to within a minute.
REFRESH_STEP = timedelta(minutes=1)
#: Expired sessions (anyone's) deleted with every PURGE_EVERY-th login of a process:
#: up to 100 / 16 (6) per login, while a login adds one.
PURGE_BATCH, PURGE_EVERY = 100, 16


@dataclass(frozen=True, slots=True)
class Login:
    """A successful Authenticate: the member and the new session's token."""

    member_id: str
    session_token: str

    def __repr__(self) -> str:
        return f"<Login {self.member_id}>"  # never the token


def token_hash(token: str) -> bytes:
    """What member_sessions stores of a token: its SHA-256."""
    return hashlib.sha256(token.encode()).digest()


class MemberSessions:
    """Starts, checks and ends member sessions (reached as ``Vault.sessions``)."""

    def __init__(self, store: SessionStore, clock: Clock, settings: VaultSettings) -> None:
        self._store = store
        self._clock = clock
        self._idle = settings.session_idle
        self._lifetime = settings.session_lifetime
        self._keep = settings.sessions_per_member
        self._logins = 0

    def __repr__(self) -> str:
        return f"<MemberSessions idle={self._idle} lifetime={self._lifetime}>"

    def new(self, member_id: str) -> tuple[str, NewSession]:
        """A new session for ``member_id``, not yet stored: the token (shown only
        once it is) and what the store writes. Authenticate stores it in the
        login's own transaction (MemberStore.record_login)."""
        token = secrets.token_urlsafe(SESSION_TOKEN_BYTES)
        now = self._clock.now()
        ends = now + self._lifetime
        row = SessionRow(token_hash(token), member_id, now, min(now + self._idle, ends), ends)
        purge = PURGE_BATCH if self._logins % PURGE_EVERY == 0 else 0
        self._logins += 1
        return token, NewSession(row, self._keep, purge)

    async def start(self, member_id: str) -> str:
        """A new session for an authenticated member, in a transaction of its own
        (tests; Authenticate uses :meth:`new`): the token, shown only now.
        AuthenticationFailed if the member is gone: the login did not happen."""
        token, new = self.new(member_id)
        if not await self._store.create_session(
            new.row, keep=new.keep, purge_limit=new.purge_limit
        ):
            raise AuthenticationFailed
        return token

    async def require(self, token: str, member_id: str) -> None:
        """Pass if ``token`` is a live session of ``member_id``, and count this as a
        use (the idle timer starts again); else MemberSessionRequired."""
        hashed, mid = self._checked(token, member_id)
        now = self._clock.now()
        row = await self._store.find_session(hashed, now)
        if row is None or row.member_id != mid:
            raise MemberSessionRequired
        idle_until = min(now + self._idle, row.expires_at)
        # Refresh False: it ended (EndSession, a password change) since the read.
        if idle_until - row.idle_expires_at > REFRESH_STEP and not (
            await self._store.refresh_session(hashed, now, idle_until)
        ):
            raise MemberSessionRequired

    async def end(self, token: str, member_id: str) -> None:
        """End this session of the member (EndSession); MemberSessionRequired if it
        is not one."""
        hashed, mid = self._checked(token, member_id)
        if not await self._store.end_session(hashed, mid):
            raise MemberSessionRequired
        log.info("member_session_ended")

    @staticmethod
    def _checked(token: str, member_id: str) -> tuple[bytes, str]:
        """The token's hash and the canonical member id. A malformed member id is
        InvalidInput, as everywhere (its form is public: no oracle); a token of the
        wrong shape is refused before any lookup, like an unknown one."""
        v = Violations()
        mid = policy.check_member_id(member_id, v)
        v.raise_if_any()
        assert mid
        if not _TOKEN.fullmatch(token):
            raise MemberSessionRequired
        return token_hash(token), mid
