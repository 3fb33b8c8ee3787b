"""Idempotent writes (AIP-155): a retry with the same request id gets the first
answer and writes nothing again; the same id with another request is refused.

What is stored of a request id is a keyed HMAC of (caller identity, method,
request id), so ids are scoped to the caller and never stored as sent; of the
request, a keyed HMAC of its fields (a sign-up holds a password: a plain hash
would be a password hash nobody salted). The key is written in the transaction of
the write it guards, so of two concurrent retries one writes and the other, on
the stored key's conflict, reads the winner's answer.
"""

from __future__ import annotations

import hmac
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

from vault import _hazmat
from vault.calls import current_caller
from vault.clock import Clock
from vault.errors import IdempotencyKeyReused
from vault.policy import Violations
from vault.store.contracts.idempotency import IdempotencyKey, IdempotencyStore

#: How long a request id is remembered (purged by the lifecycle after this).
IDEMPOTENCY_TTL = timedelta(hours=24)
REQUEST_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
SIGN_UP, RECORD_ACCESS = "SignUp", "RecordAccess"


def _lp(value: str) -> bytes:
    data = value.encode()
    return len(data).to_bytes(4, "big") + data


def check_request_id(value: str, v: Violations) -> str:
    """'' (not idempotent) or a valid id; a violation on ``request_id`` otherwise."""
    if value and not REQUEST_ID.fullmatch(value):
        v.add("request_id", "must be 1-64 characters of letters, digits and '_.:-' (a UUID)")
    return value


@dataclass(frozen=True, slots=True)
class IdempotentRequest:
    key_hash: bytes
    request_mac: bytes


class Idempotency:
    def __init__(self, store: IdempotencyStore, key: _hazmat.MacKey, clock: Clock) -> None:
        self._store = store
        self._key = key
        self._clock = clock

    def request(
        self, method: str, request_id: str, fields: Sequence[object]
    ) -> IdempotentRequest | None:
        """The request as stored, scoped to the current caller; None without an id."""
        if not request_id:
            return None
        named = _lp("pv.request-id") + _lp(current_caller()) + _lp(method) + _lp(request_id)
        body = json.dumps([method, *fields], separators=(",", ":"), ensure_ascii=False)
        return IdempotentRequest(
            _hazmat.keyed_digest(self._key, named),
            _hazmat.keyed_digest(self._key, _lp("pv.request") + _lp(body)),
        )

    def key(self, request: IdempotentRequest | None, member_id: str) -> IdempotencyKey | None:
        """What the guarded write stores (its result is ``member_id``)."""
        if request is None:
            return None
        now = self._clock.now()
        return IdempotencyKey(
            request.key_hash, request.request_mac, member_id, now, now - IDEMPOTENCY_TTL
        )

    async def replay(self, request: IdempotentRequest | None) -> str | None:
        """The first call's member id if this request id was used for this request;
        IdempotencyKeyReused if for another; None if it is new (or expired)."""
        if request is None:
            return None
        live_after = self._clock.now() - IDEMPOTENCY_TTL
        stored = await self._store.find_idempotency_key(request.key_hash, live_after)
        if stored is None:
            return None
        if not hmac.compare_digest(stored.request_mac, request.request_mac):
            raise IdempotencyKeyReused
        return stored.member_id
