"""A bounded, expiring cache of unwrapped member DEKs.

It keeps the key provider (an HSM, later) off the hot path. Entries expire after
``ttl`` seconds and the least recently used go first past ``max_size``; a shred
evicts the member at once.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from vault._hazmat import SecretKey


class DekCache:
    def __init__(
        self,
        max_size: int = 10_000,
        ttl: float = 300.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_size < 0 or ttl < 0:
            raise ValueError("cache size and ttl must not be negative")
        self._max_size = max_size
        self._ttl = ttl
        self._monotonic = monotonic
        self._entries: OrderedDict[str, tuple[int, SecretKey, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, member_id: str, dek_id: int) -> SecretKey | None:
        entry = self._entries.get(member_id)
        if entry is None:
            return None
        cached_id, key, expires = entry
        if cached_id != dek_id or expires <= self._monotonic():
            del self._entries[member_id]
            return None
        self._entries.move_to_end(member_id)
        return key

    def put(self, member_id: str, key: SecretKey) -> None:
        if self._max_size == 0:
            return
        self._entries[member_id] = (key.key_id, key, self._monotonic() + self._ttl)
        self._entries.move_to_end(member_id)
        while len(self._entries) > self._max_size:
            self._entries.popitem(last=False)

    def evict(self, member_id: str) -> None:
        self._entries.pop(member_id, None)

    def clear(self) -> None:
        self._entries.clear()
