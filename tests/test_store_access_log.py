"""The AccessLogStore contract: paging and the 6-month purge. Every test that uses the
``store`` or ``store_url`` fixture runs once on SQLite and once on PostgreSQL."""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import datetime

from store_support import (
    T0,
    entry,
    member_seen_at,
    new_member,
    ts,
)

from vault.store import (
    NewAccessEntry,
    Store,
)


async def test_access_log_pages_through_ties_without_loss_or_duplication(vault: Store) -> None:
    member = new_member()
    other = new_member()
    await vault.insert_member(member)
    await vault.insert_member(other)
    # Several entries share a timestamp, so only entry_id orders them.
    times = [ts(0), ts(10), ts(10), ts(10), ts(5), ts(20), ts(20), ts(10), ts(0)]
    for n, at in enumerate(times):
        assert await vault.append_access(member.member_id, entry(at, n), dek_id=1)
    assert await vault.append_access(other.member_id, entry(ts(10), 99), dek_id=1)
    assert await vault.append_access(str(uuid.uuid4()), entry(ts(10)), dek_id=1) is False

    everything = await vault.list_access(member.member_id, 100)
    assert len(everything) == len(times)
    keys = [(e.at, e.entry_id) for e in everything]
    assert keys == sorted(keys, reverse=True)
    assert len({e.entry_id for e in everything}) == len(times)
    assert sorted(e.action_ct for e in everything) == sorted(
        f"action-{n}".encode() for n in range(len(times))
    )

    paged = []
    cursor: tuple[datetime, int] | None = None
    for _ in range(10):
        page = await vault.list_access(member.member_id, 2, cursor)
        if not page:
            break
        assert len(page) <= 2
        paged.extend(page)
        cursor = (page[-1].at, page[-1].entry_id)
    assert paged == everything

    assert await vault.list_access(member.member_id, 0) == []
    # A cursor is exclusive: paging from the newest entry skips just that one.
    first = everything[0]
    assert (
        await vault.list_access(member.member_id, 100, (first.at, first.entry_id))
        == (everything[1:])
    )


async def test_purge_access_log_in_batches_oldest_first(vault: Store) -> None:
    member = await member_seen_at(vault, T0)
    for n in range(7):
        assert await vault.append_access(member.member_id, entry(ts(n), n), dek_id=1)

    assert await vault.count_access_log_before(ts(5)) == 5
    assert await vault.purge_access_log(ts(5), 2) == 2
    assert await vault.count_access_log_before(ts(5)) == 3
    assert await vault.purge_access_log(ts(5), 2) == 2
    assert await vault.purge_access_log(ts(5), 2) == 1
    assert await vault.purge_access_log(ts(5), 2) == 0
    left = await vault.list_access(member.member_id, 10)
    assert sorted(e.at for e in left) == [ts(5), ts(6)]


async def test_an_entry_keeps_its_caller_and_a_key_replacement_reseals_it(vault: Store) -> None:
    """The caller (migration 0011) is stored with its entry, read back, and replaced with
    the entry's other ciphertexts by a member key rotation; an entry without one (older
    than callers) stays without."""
    member = new_member()
    await vault.insert_member(member)
    mid = member.member_id
    with_caller = NewAccessEntry(at=ts(1), action_ct=b"a", ip_ct=b"i", caller_ct=b"c")
    assert await vault.append_access(mid, with_caller, dek_id=1)
    assert await vault.append_access(mid, entry(ts(2)), dek_id=1)
    newer, older = await vault.list_access(mid, 10)
    assert (older.caller_ct, newer.caller_ct) == (b"c", None)

    resealed = {older.entry_id: (b"a2", b"i2", b"c2"), newer.entry_id: (b"a3", b"i3", None)}
    new_key = replace(member.key, dek_id=2)
    fields = dict(member.ciphertexts)
    assert await vault.replace_member_key(mid, 1, new_key, fields, resealed, old_ciphertexts=fields)
    newer, older = await vault.list_access(mid, 10)
    assert (older.action_ct, older.ip_ct, older.caller_ct) == (b"a2", b"i2", b"c2")
    assert (newer.action_ct, newer.caller_ct) == (b"a3", None)
