"""What this process's vault has done since it opened: counts, and nothing else.

The vault counts; whoever wants the numbers reads them (the service's Prometheus
collector, at scrape time). No metrics library here, no callback per event, nothing
to install: a count is one integer addition on the path that did the work, and the
vault stays ignorant of who reads it (``vault`` knows nothing of the service layer).

Keys are fixed names from the vault's own code (a shred's reason), never a member
id, a login ID, an address or anything a caller sent.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass(slots=True)
class Activity:
    """Monotonic counts since the vault opened (Prometheus counters, read as they are)."""

    sign_ups: int = 0
    #: Members crypto-shredded, by the reason of the destruction record.
    shreds: Counter[str] = field(default_factory=Counter)
    #: Password checks that failed: wrong, unknown login ID, or refused under a lock.
    login_failures: int = 0
    #: Failures that locked an account that was not locked before them.
    lockouts: int = 0
    #: Logins refused before any password check: the client IP's failure window is full.
    login_throttled: int = 0
    #: Keys (member DEKs, the index key, retained copies' DEKs) moved to the active KEK.
    keys_rewrapped: int = 0
    kek_rotations: int = 0

    def shredded(self, reason: str, count: int = 1) -> None:
        if count:
            self.shreds[reason] += count

    def snapshot(self) -> Activity:
        """A copy, for a reader on another thread (a scrape)."""
        return Activity(
            self.sign_ups,
            Counter(self.shreds),
            self.login_failures,
            self.lockouts,
            self.login_throttled,
            self.keys_rewrapped,
            self.kek_rotations,
        )
