"""The IdempotencyStore contract: request ids written by the write they guard, in its
transaction. Runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import secrets
from datetime import timedelta

import pytest
from store_support import T0, entry, new_member, ts

from vault.errors import AlreadyExists
from vault.store import Store
from vault.store.contracts.idempotency import IdempotencyKey, StoredRequest

DAY = timedelta(days=1)


def key(member_id: str, at_seconds: float = 0, key_hash: bytes | None = None) -> IdempotencyKey:
    at = ts(at_seconds)
    return IdempotencyKey(
        key_hash or secrets.token_bytes(32), secrets.token_bytes(32), member_id, at, at - DAY
    )


async def test_sign_up_key_is_stored_with_the_member(vault: Store) -> None:
    member = new_member()
    k = key(member.member_id)
    await vault.insert_member(member, k)
    assert await vault.find_idempotency_key(k.key_hash, T0 - DAY) == StoredRequest(
        k.request_mac, member.member_id
    )
    assert await vault.find_idempotency_key(k.key_hash, T0) is None  # not after T0
    # The same live key with another member: refused, and the member is not written.
    other = new_member()
    with pytest.raises(AlreadyExists) as raised:
        await vault.insert_member(other, key(other.member_id, 1, k.key_hash))
    assert raised.value.field == "request_id"
    assert await vault.get_member(other.member_id) is None


async def test_an_expired_key_is_replaced(vault: Store) -> None:
    first, second = new_member(), new_member()
    k = key(first.member_id)
    await vault.insert_member(first, k)
    later = key(second.member_id, 86_400 + 1, k.key_hash)
    await vault.insert_member(second, later)
    found = await vault.find_idempotency_key(k.key_hash, later.live_after)
    assert found == StoredRequest(later.request_mac, second.member_id)


async def test_access_entry_key_conflict_rolls_the_entry_back(vault: Store) -> None:
    member = new_member()
    await vault.insert_member(member)
    mid = member.member_id
    k = key(mid)
    assert await vault.append_access(mid, entry(ts(1)), dek_id=1, idempotency=k)
    with pytest.raises(AlreadyExists):
        await vault.append_access(
            mid, entry(ts(2), 1), dek_id=1, idempotency=key(mid, 2, k.key_hash)
        )
    assert [e.at for e in await vault.list_access(mid, 10)] == [ts(1)]


async def test_purge_and_shred_delete_keys(vault: Store) -> None:
    old, kept = new_member(), new_member()
    k_old, k_kept = key(old.member_id), key(kept.member_id, 100)
    await vault.insert_member(old, k_old)
    await vault.insert_member(kept, k_kept)
    assert await vault.purge_idempotency_keys(ts(50), 10) == 1
    assert await vault.find_idempotency_key(k_old.key_hash, T0 - DAY) is None
    assert await vault.find_idempotency_key(k_kept.key_hash, T0 - DAY) is not None
    await vault.shred_member(kept.member_id, ts(200), "withdrawal")
    assert await vault.find_idempotency_key(k_kept.key_hash, T0 - DAY) is None
