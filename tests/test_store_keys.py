"""The KeyStore contract: KEK versions and their guards, the index key, resumable re-wrap, per-
member DEK rotation, key events, and the DEK-id guard on writes. Every test that uses the
``store`` or ``store_url`` fixture runs once on SQLite and once on PostgreSQL."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
from store_support import (
    T0,
    assert_utc,
    entry,
    new_member,
    ts,
)

from vault.errors import KeyChanged, NotFound, PreconditionFailed
from vault.store import (
    IndexKeyRow,
    KekVersionRow,
    MemberKeyRow,
    Store,
)
from vault.store.base import KeyEvent, RewrapUpdate


async def test_kek_versions_insert_list_and_one_active(store: Store) -> None:
    assert await store.list_kek_versions() == []
    v1 = KekVersionRow(1, "active", T0)
    assert await store.insert_kek_version(v1) is True
    assert await store.insert_kek_version(KekVersionRow(1, "decrypt_only", ts(5))) is False

    # A second active version breaks the one-active rule.
    with pytest.raises(PreconditionFailed):
        await store.insert_kek_version(KekVersionRow(2, "active", ts(10)))

    v2 = KekVersionRow(2, "decrypt_only", ts(10))
    v3 = KekVersionRow(3, "destroyed", ts(20), destroyed_at=ts(30))
    assert await store.insert_kek_version(v3) is True
    assert await store.insert_kek_version(v2) is True
    listed = await store.list_kek_versions()
    assert listed == [v1, v2, v3]
    for row in listed:
        assert_utc(row.created_at)
    assert listed[2].destroyed_at is not None
    assert_utc(listed[2].destroyed_at)


async def test_kek_version_rejects_unknown_state(store: Store) -> None:
    with pytest.raises(ValueError):
        await store.insert_kek_version(KekVersionRow(1, "retired", T0))  # type: ignore[arg-type]
    assert await store.list_kek_versions() == []


async def test_index_key_first_writer_wins(vault: Store) -> None:
    assert await vault.get_index_key() is None
    a = IndexKeyRow(key_id=1, kek_version=1, wrapped_key=b"key-a", created_at=T0)
    b = IndexKeyRow(key_id=2, kek_version=1, wrapped_key=b"key-b", created_at=ts(1))
    got_a, got_b = await asyncio.gather(vault.insert_index_key(a), vault.insert_index_key(b))
    assert got_a == got_b
    assert got_a in (a, b)
    assert await vault.get_index_key() == got_a
    # A later bootstrap gets the stored key back, not its own.
    c = IndexKeyRow(key_id=3, kek_version=1, wrapped_key=b"key-c", created_at=ts(2))
    assert await vault.insert_index_key(c) == got_a
    assert_utc(got_a.created_at)


def states(rows: list[KekVersionRow]) -> dict[int, str]:
    return {r.version: r.state for r in rows}


async def test_rotate_demotes_the_active_version(vault: Store) -> None:
    row = await vault.rotate_kek(2, ts(10))
    assert (row.version, row.state) == (2, "active")
    assert states(await vault.list_kek_versions()) == {1: "decrypt_only", 2: "active"}
    with pytest.raises(PreconditionFailed):
        await vault.rotate_kek(2, ts(11))
    assert states(await vault.list_kek_versions()) == {1: "decrypt_only", 2: "active"}


async def test_concurrent_rotations_leave_one_active(vault: Store) -> None:
    results = await asyncio.gather(
        vault.rotate_kek(2, ts(1)), vault.rotate_kek(2, ts(2)), return_exceptions=True
    )
    assert sum(isinstance(r, KekVersionRow) for r in results) == 1
    assert sum(isinstance(r, PreconditionFailed) for r in results) == 1
    assert list(states(await vault.list_kek_versions()).values()).count("active") == 1


async def test_destroy_is_guarded(vault: Store) -> None:
    member = new_member(kek_version=1)
    await vault.insert_member(member)
    await vault.insert_index_key(IndexKeyRow(1, 1, b"wrapped-index", T0))
    with pytest.raises(PreconditionFailed) as active:
        await vault.destroy_kek_version(1, ts(5))
    assert "active" in active.value.description
    await vault.rotate_kek(2, ts(6))
    with pytest.raises(PreconditionFailed) as in_use:
        await vault.destroy_kek_version(1, ts(7))
    assert "1 member keys and 1 index keys" in in_use.value.description
    with pytest.raises(NotFound):
        await vault.destroy_kek_version(9, ts(7))

    assert await vault.rewrap_index_key(1, 1, 2, b"rewrapped-index")
    assert not await vault.rewrap_index_key(1, 1, 2, b"again")  # already moved
    moved = RewrapUpdate(member.member_id, 1, 1, 2, b"rewrapped-dek")
    assert await vault.apply_rewrap([moved]) == 1
    assert [(u.version, u.member_keys, u.index_keys) for u in await vault.kek_usage()] == [
        (1, 0, 0),
        (2, 1, 1),
    ]
    destroyed = await vault.destroy_kek_version(1, ts(8))
    assert (destroyed.state, destroyed.destroyed_at) == ("destroyed", ts(8))
    assert (await vault.destroy_kek_version(1, ts(9))).destroyed_at == ts(8)  # idempotent
    # Nothing can be wrapped under a destroyed version any more.
    with pytest.raises(PreconditionFailed):
        await vault.insert_member(new_member(kek_version=1))
    current = await vault.get_member(member.member_id)
    assert current is not None
    with pytest.raises(PreconditionFailed):
        await vault.replace_member_key(
            member.member_id,
            1,
            MemberKeyRow(member.member_id, 2, 1, b"under a destroyed version"),
            dict(current.ciphertexts),
            {},
            old_ciphertexts=current.ciphertexts,
        )


async def test_rewrap_scan_is_resumable_and_conditional(vault: Store) -> None:
    members = [new_member() for _ in range(7)]
    for m in members:
        await vault.insert_member(m)
    await vault.rotate_kek(2, ts(1))
    ordered = sorted(m.member_id for m in members)

    first = await vault.member_keys_to_rewrap(2, None, 3)
    assert [k.member_id for k in first] == ordered[:3]
    rest = await vault.member_keys_to_rewrap(2, first[-1].member_id, 100)
    assert [k.member_id for k in rest] == ordered[3:]

    updates = [RewrapUpdate(k.member_id, k.dek_id, 1, 2, b"new-" + k.wrapped_dek) for k in first]
    stale = RewrapUpdate(rest[0].member_id, 1, 2, 2, b"wrong from_version")
    assert await vault.apply_rewrap([*updates, stale]) == 3
    assert await vault.apply_rewrap(updates) == 0  # idempotent: already moved
    remaining = await vault.member_keys_to_rewrap(2, None, 100)
    assert [k.member_id for k in remaining] == ordered[3:]
    moved = await vault.get_member(first[0].member_id)
    assert moved is not None
    assert (moved.key.kek_version, moved.key.wrapped_dek) == (2, b"new-" + first[0].wrapped_dek)


async def test_writes_are_guarded_by_the_dek_id(vault: Store) -> None:
    member = new_member()
    await vault.insert_member(member)
    mid = member.member_id
    with pytest.raises(KeyChanged):
        await vault.update_member(mid, {"name": b"under an old key"}, dek_id=7)
    with pytest.raises(KeyChanged):
        await vault.append_access(mid, entry(ts(1)), dek_id=7)
    with pytest.raises(KeyChanged):
        await vault.record_login(mid, entry(ts(1)), dek_id=7)
    got = await vault.get_member(mid)
    assert got is not None
    assert got.ciphertexts == member.ciphertexts
    assert await vault.list_access(mid, 10) == []


async def test_replace_member_key_is_atomic_and_conditional(vault: Store) -> None:
    member = new_member()
    await vault.insert_member(member)
    mid = member.member_id
    assert await vault.append_access(mid, entry(ts(1), 1), dek_id=1)
    (logged,) = await vault.list_access(mid, 10)
    new_key = MemberKeyRow(mid, 2, 1, b"wrapped-dek-2")
    fields = {f: b"re-" + ct for f, ct in member.ciphertexts.items()}
    reencrypted = {logged.entry_id: (b"re-action", b"re-ip", None)}

    old = member.ciphertexts
    # Refused: the caller's view is out of date (access log, DEK id, a field).
    assert not await vault.replace_member_key(mid, 1, new_key, fields, {}, old_ciphertexts=old)
    assert not await vault.replace_member_key(
        mid, 9, new_key, fields, reencrypted, old_ciphertexts=old
    )
    stale = {**old, "name": b"what the caller read before an update"}
    assert not await vault.replace_member_key(
        mid, 1, new_key, fields, reencrypted, old_ciphertexts=stale
    )
    unchanged = await vault.get_member(mid)
    assert unchanged is not None
    assert unchanged.key.dek_id == 1

    assert await vault.replace_member_key(mid, 1, new_key, fields, reencrypted, old_ciphertexts=old)
    rotated = await vault.get_member(mid)
    assert rotated is not None
    assert rotated.key == new_key
    assert dict(rotated.ciphertexts) == fields
    (after,) = await vault.list_access(mid, 10)
    assert (after.action_ct, after.ip_ct) == (b"re-action", b"re-ip")
    with pytest.raises(ValueError):
        await vault.replace_member_key(
            mid, 2, new_key, {"name": b"x"}, reencrypted, old_ciphertexts=fields
        )
    with pytest.raises(ValueError):
        await vault.replace_member_key(
            mid,
            2,
            replace(new_key, member_id=new_member().member_id),
            fields,
            reencrypted,
            old_ciphertexts=fields,
        )


async def test_key_events_newest_first(vault: Store) -> None:
    member = new_member()
    first = KeyEvent(ts(1), "alice", "rotate_kek", 2, None, {"previous_active": 1})
    second = KeyEvent(ts(2), "bob", "rotate_member_key", None, member.member_id, {"dek_id": 2})
    await vault.record_key_event(first)
    await vault.record_key_event(second)
    assert await vault.list_key_events() == [second, first]
    assert await vault.list_key_events(1) == [second]
