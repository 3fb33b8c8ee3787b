"""Idempotent writes (AIP-155): request ids and the result of their first call."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol


@dataclass(frozen=True, slots=True)
class IdempotencyKey:
    """A request id as stored: ``key_hash`` names (caller, method, request id),
    ``request_mac`` the request (both keyed HMACs, 32 bytes), ``member_id`` the
    first call's result. A stored key created before ``live_after`` has expired and
    is replaced."""

    key_hash: bytes
    request_mac: bytes
    member_id: str
    created_at: datetime
    live_after: datetime

    def __repr__(self) -> str:
        return f"<IdempotencyKey at={self.created_at.isoformat()}>"


@dataclass(frozen=True, slots=True)
class StoredRequest:
    request_mac: bytes
    member_id: str


class IdempotencyStore(Protocol):
    """Keys are written by the write they guard, in its transaction
    (``MemberStore.insert_member`` and ``AccessLogStore.append_access`` take an
    ``idempotency`` key): a live key already there raises AlreadyExists("request_id")
    and rolls the write back. A shred deletes the member's keys."""

    async def find_idempotency_key(
        self, key_hash: bytes, live_after: datetime
    ) -> StoredRequest | None:
        """The stored request of a key created after ``live_after``; None otherwise."""
        ...

    async def purge_idempotency_keys(self, before: datetime, limit: int) -> int:
        """Delete at most ``limit`` keys created before ``before``; returns how many."""
        ...
