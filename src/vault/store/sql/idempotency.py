"""Idempotency keys (:class:`vault.store.contracts.idempotency.IdempotencyStore`),
written once for both backends. The insert runs inside the guarded write's
transaction body (:func:`store_key`, from insert_member and append_access)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from vault.errors import AlreadyExists
from vault.store._common import check_limit
from vault.store.contracts.idempotency import IdempotencyKey, StoredRequest
from vault.store.sql.dialect import Dialect, both
from vault.store.sql.executor import SqlExecutor, Tx

_FIND = both(
    "SELECT request_mac, member_id FROM idempotency_keys WHERE key_hash = $1 AND created_at > $2"
)
# An expired key (created at or before $5, not purged yet) is replaced; a live one
# is left alone and the statement changes no row (the caller rolls back).
_INSERT_KEY = both(
    "INSERT INTO idempotency_keys (key_hash, request_mac, member_id, created_at) "
    "VALUES ($1, $2, $3, $4) ON CONFLICT (key_hash) DO UPDATE SET "
    "request_mac = excluded.request_mac, member_id = excluded.member_id, "
    "created_at = excluded.created_at WHERE idempotency_keys.created_at <= $5"
)
_PURGE = both(
    "DELETE FROM idempotency_keys WHERE key_hash IN "
    "(SELECT key_hash FROM idempotency_keys WHERE created_at < $1 LIMIT $2)"
)
KEY_BYTES = 32


def key_params(d: Dialect, key: IdempotencyKey | None) -> tuple[Any, ...] | None:
    """The key's row in ``d``'s encoding (None without a key)."""
    if key is None:
        return None
    if len(key.key_hash) != KEY_BYTES or len(key.request_mac) != KEY_BYTES:
        raise ValueError("idempotency keys are 32-byte HMACs")
    return (
        bytes(key.key_hash),
        bytes(key.request_mac),
        d.member_id(key.member_id),
        d.time(key.created_at),
        d.time(key.live_after),
    )


async def store_key(tx: Tx, d: Dialect, params: tuple[Any, ...] | None) -> None:
    """Inside the guarded write's transaction: store the key (``key_params``, or
    None for a write without one). A live key with this hash is there already:
    AlreadyExists("request_id"), and the guarded write is rolled back."""
    if params is not None and await tx.run(_INSERT_KEY[d.name], *params) != 1:
        raise AlreadyExists("request_id")


class SqlIdempotency(SqlExecutor):
    async def find_idempotency_key(
        self, key_hash: bytes, live_after: datetime
    ) -> StoredRequest | None:
        d = self._dialect
        rows = await self._fetch(_FIND[d.name], bytes(key_hash), d.time(live_after))
        if not rows:
            return None
        return StoredRequest(bytes(rows[0][0]), str(rows[0][1]))

    async def purge_idempotency_keys(self, before: datetime, limit: int) -> int:
        d = self._dialect
        return await self._run(_PURGE[d.name], d.time(before), check_limit(limit))
