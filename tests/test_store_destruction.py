"""The DestructionStore contract: shredding, tombstones and destruction records. Every test
that uses the ``store`` or ``store_url`` fixture runs once on SQLite and once on PostgreSQL."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from dataclasses import replace
from pathlib import Path

from store_support import (
    CONSENTS,
    T0,
    assert_utc,
    entry,
    member_seen_at,
    message,
    new_member,
    ts,
    with_active_kek,
)

from vault.store import (
    KekVersionRow,
    NewAccessEntry,
    Store,
    open_store,
)


async def test_shred_member_destroys_everything(vault: Store) -> None:
    assert await vault.insert_kek_version(KekVersionRow(2, "decrypt_only", T0))
    member = new_member(kek_version=2)
    bystander = new_member()
    member = replace(member, consents=tuple(sorted(CONSENTS, key=lambda c: c.purpose)))
    await vault.insert_member(member)
    bystander = replace(bystander, consents=tuple(sorted(CONSENTS, key=lambda c: c.purpose)))
    await vault.insert_member(bystander)
    for n in range(3):
        assert await vault.append_access(member.member_id, entry(ts(n), n), dek_id=1)
    assert await vault.append_access(bystander.member_id, entry(ts(1)), dek_id=1)
    assert await vault.is_destroyed(member.member_id) is False

    record = await vault.shred_member(member.member_id, ts(100), "inactivity")

    assert record is not None
    assert record.member_id == member.member_id
    assert record.destroyed_at == ts(100)
    assert_utc(record.destroyed_at)
    assert record.reason == "inactivity"
    assert dict(record.items) == {
        "member": 1,
        "member_keys": 1,
        "consents": 2,
        "consent_history": 2,
        "disclosure_ledger": 0,
        "access_log": 3,
        "outbox": 0,
        "password_resets": 0,
        "corrections": 0,
    }
    assert record.kek_versions == (2,)

    assert await vault.get_member(member.member_id) is None
    assert await vault.find_member("login_id", member.blind_indexes["login_id"]) is None
    assert await vault.find_member("email", member.blind_indexes["email"]) is None
    assert await vault.list_consents(member.member_id) == []
    assert await vault.list_consent_events(member.member_id, 10) == []  # the history too
    assert await vault.list_access(member.member_id, 10) == []
    assert await vault.is_destroyed(member.member_id) is True
    # A shredded member takes no new writes.
    assert await vault.append_access(member.member_id, entry(ts(200)), dek_id=1) is False
    assert await vault.record_login(member.member_id, entry(ts(200)), dek_id=1) is False
    assert await vault.update_member(member.member_id, {"name": b"x"}, dek_id=1) is False

    # Shredding is idempotent: nothing is left to destroy the second time.
    assert await vault.shred_member(member.member_id, ts(200), "again") is None
    assert await vault.list_destruction_records() == [record]
    assert await vault.list_destruction_records(member.member_id) == [record]
    assert await vault.list_destruction_records(bystander.member_id) == []

    # The bystander is untouched.
    assert await vault.get_member(bystander.member_id) == bystander
    assert await vault.list_consents(bystander.member_id) == sorted(
        CONSENTS, key=lambda c: c.purpose
    )
    assert len(await vault.list_access(bystander.member_id, 10)) == 1
    assert await vault.is_destroyed(bystander.member_id) is False


async def test_shred_unknown_member_is_none(vault: Store) -> None:
    stranger = str(uuid.uuid4())
    assert await vault.shred_member(stranger, ts(1), "withdrawal") is None
    assert await vault.is_destroyed(stranger) is False
    assert await vault.list_destruction_records() == []


async def test_destruction_records_are_listed_oldest_first(vault: Store) -> None:
    members = [new_member() for _ in range(3)]
    for m in members:
        await vault.insert_member(m)
    # Shred out of time order: the list follows destroyed_at, not insertion.
    r2 = await vault.shred_member(members[2].member_id, ts(300), "withdrawal")
    r0 = await vault.shred_member(members[0].member_id, ts(100), "inactivity")
    r1 = await vault.shred_member(members[1].member_id, ts(200), "inactivity")
    assert await vault.list_destruction_records() == [r0, r1, r2]
    assert r0 is not None
    assert dict(r0.items) == {
        "member": 1,
        "member_keys": 1,
        "consents": 0,
        "consent_history": 0,
        "disclosure_ledger": 0,
        "access_log": 0,
        "outbox": 0,
        "password_resets": 0,
        "corrections": 0,
    }
    assert r0.kek_versions == (1,)


async def test_blind_indexes_are_free_again_after_shred(vault: Store) -> None:
    member = new_member()
    await vault.insert_member(member)
    assert await vault.shred_member(member.member_id, ts(1), "withdrawal") is not None
    successor = new_member(
        login_hmac=member.blind_indexes["login_id"], email_hmac=member.blind_indexes["email"]
    )
    successor = replace(successor, consents=tuple(sorted(CONSENTS, key=lambda c: c.purpose)))
    await vault.insert_member(successor)
    assert await vault.find_member("login_id", member.blind_indexes["login_id"]) == successor
    assert await vault.find_member("email", member.blind_indexes["email"]) == successor


async def test_concurrent_shreds_destroy_once(vault: Store) -> None:
    member = new_member()
    member = replace(member, consents=tuple(sorted(CONSENTS, key=lambda c: c.purpose)))
    await vault.insert_member(member)
    results = await asyncio.gather(
        *(vault.shred_member(member.member_id, ts(1), "withdrawal") for _ in range(3))
    )
    assert sum(r is not None for r in results) == 1
    assert len(await vault.list_destruction_records(member.member_id)) == 1


async def test_shred_deletes_and_counts_pending_mail(vault: Store) -> None:
    member = await member_seen_at(vault, T0)
    bystander = await member_seen_at(vault, T0)
    assert await vault.record_inactivity_notice(member.member_id, T0, message(member.member_id))
    assert await vault.enqueue_outbox(message(member.member_id, kind="password_changed"))
    kept = message(bystander.member_id)
    assert await vault.enqueue_outbox(kept)

    record = await vault.shred_member(member.member_id, ts(5), "inactivity")
    assert record is not None
    assert record.items["outbox"] == 2
    assert [m.message_id for m in await vault.due_outbox(ts(1000), 10)] == [kept.message_id]
    (stored,) = await vault.list_destruction_records(member.member_id)
    assert stored.items["outbox"] == 2


async def test_an_expiry_shred_spares_a_member_who_connected_since(vault: Store) -> None:
    member = replace(new_member(), last_seen_at=ts(100))
    await vault.insert_member(member)
    # Decided when the member was last seen at ts(100): a login at ts(500) since.
    assert await vault.record_login(member.member_id, entry(ts(500)), dek_id=1)
    assert (
        await vault.shred_member(member.member_id, ts(600), "inactivity", last_seen_before=ts(200))
        is None
    )
    assert await vault.get_member(member.member_id) is not None
    assert not await vault.is_destroyed(member.member_id)
    record = await vault.shred_member(
        member.member_id, ts(700), "inactivity", last_seen_before=ts(501)
    )
    assert record is not None
    assert record.reason == "inactivity"


async def test_sqlite_shred_leaves_no_trace_in_any_file(tmp_path: Path) -> None:
    db = tmp_path / "vault.db"
    small = b"CANARY-" + secrets.token_hex(12).encode()
    # Larger than a page, so it lives in overflow pages too.
    large = (b"BIGCANARY-" + secrets.token_hex(12).encode()) * 600
    files = [db, db.with_name("vault.db-wal"), db.with_name("vault.db-shm")]

    def raw() -> bytes:
        return b"".join(p.read_bytes() for p in files if p.exists())

    store = await open_store(f"sqlite:///{db}")
    try:
        await store.migrate()
        await with_active_kek(store)
        member = new_member(ciphertexts={"name": small, "email": large})
        member = replace(member, consents=tuple(sorted(CONSENTS, key=lambda c: c.purpose)))
        await store.insert_member(member)
        assert await store.append_access(
            member.member_id, NewAccessEntry(ts(1), b"act-" + small, b"ip"), dek_id=1
        )
        # An update leaves an older copy of the row's page behind, too.
        assert await store.update_member(
            member.member_id, {"mobile_phone": small + b"-2"}, dek_id=1
        )
        assert small in raw()
        assert large[:200] in raw()

        assert await store.shred_member(member.member_id, ts(2), "withdrawal") is not None

        data = raw()
        assert small not in data
        assert large[:40] not in data
    finally:
        await store.close()
    assert small not in raw()
