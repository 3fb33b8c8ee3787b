"""The Store contract: every backend passes this same suite.

Tests that use the ``store`` / ``store_url`` fixtures run once per backend
(SQLite and PostgreSQL). A few at the end check what only one backend can:
the SQLite file itself, and PostgreSQL connection failures.
"""

from __future__ import annotations

import asyncio
import secrets
import stat
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from vault.errors import AlreadyExists, PreconditionFailed, StorageUnavailable
from vault.store import (
    ENCRYPTED_FIELDS,
    ConsentRow,
    IndexKeyRow,
    KekVersionRow,
    MemberKeyRow,
    MemberRow,
    NewAccessEntry,
    Store,
    database_backend,
    open_store,
)
from vault.store._migrations import load_migrations
from vault.store.sqlite import SqliteStore

T0 = datetime(2024, 5, 17, 12, 30, 45, 123457, tzinfo=UTC)


def ts(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def new_member(
    *,
    login_hmac: bytes | None = None,
    email_hmac: bytes | None = None,
    kek_version: int = 1,
    ciphertexts: dict[str, bytes] | None = None,
) -> MemberRow:
    member_id = str(uuid.uuid4())
    cts = {f: f"ct-{f}-".encode() + secrets.token_bytes(8) for f in ENCRYPTED_FIELDS}
    cts.update(ciphertexts or {})
    return MemberRow(
        member_id=member_id,
        created_at=T0,
        last_seen_at=T0,
        ciphertexts=cts,
        blind_indexes={
            "login_id": login_hmac or secrets.token_bytes(32),
            "email": email_hmac or secrets.token_bytes(32),
        },
        key=MemberKeyRow(
            member_id=member_id,
            dek_id=1,
            kek_version=kek_version,
            wrapped_dek=b"wrapped-" + secrets.token_bytes(40),
        ),
    )


CONSENTS = [
    ConsentRow(purpose="STATISTICS", granted=False, policy_version="2024-05", recorded_at=T0),
    ConsentRow(purpose="INQUIRY", granted=True, policy_version="2024-05", recorded_at=ts(1)),
]


def entry(at: datetime, n: int = 0) -> NewAccessEntry:
    return NewAccessEntry(at=at, action_ct=f"action-{n}".encode(), ip_ct=f"ip-{n}".encode())


async def with_active_kek(store: Store, version: int = 1) -> Store:
    assert await store.insert_kek_version(KekVersionRow(version, "active", T0))
    return store


@pytest.fixture
async def vault(store: Store) -> Store:
    """A migrated store with KEK version 1 active (members need one)."""
    return await with_active_kek(store)


def assert_utc(value: datetime) -> None:
    assert value.tzinfo is not None
    assert value.utcoffset() == timedelta(0)


# --- migrations -----------------------------------------------------------------


def every_migration(url: str) -> list[int]:
    """The versions a fresh database of the URL's backend gets, from the files."""
    return [m.version for m in load_migrations(database_backend(url)[0])]


async def test_migrate_applies_once_then_nothing(store_url: str) -> None:
    first = await open_store(store_url)
    try:
        assert await first.migrate() == every_migration(store_url)
        assert len(every_migration(store_url)) >= 5
        assert await first.migrate() == []
    finally:
        await first.close()
    # A restart (a new store on the same database) finds nothing to apply.
    second = await open_store(store_url)
    try:
        assert await second.migrate() == []
        assert await second.list_kek_versions() == []
    finally:
        await second.close()


async def test_concurrent_migrations_apply_each_version_once(store_url: str) -> None:
    stores = [await open_store(store_url), await open_store(store_url)]
    try:
        results = await asyncio.gather(*(s.migrate() for s in stores))
        assert sorted(results) == [[], every_migration(store_url)]
    finally:
        for s in stores:
            await s.close()


# --- key hierarchy ----------------------------------------------------------------


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


# --- members --------------------------------------------------------------------


async def test_member_roundtrip(vault: Store) -> None:
    # Inserted in any order, consents come back in purpose order.
    await vault.insert_member(replace(new_member(), consents=tuple(CONSENTS)))
    member = replace(new_member(), consents=tuple(sorted(CONSENTS, key=lambda c: c.purpose)))
    await vault.insert_member(member)

    got = await vault.get_member(member.member_id)
    assert got == member
    assert got is not None
    assert dict(got.ciphertexts) == dict(member.ciphertexts)
    assert set(got.ciphertexts) == set(ENCRYPTED_FIELDS)
    assert got.created_at.microsecond == 123457
    assert_utc(got.created_at)
    assert_utc(got.last_seen_at)

    assert await vault.find_member("login_id", member.blind_indexes["login_id"]) == member
    assert await vault.find_member("email", member.blind_indexes["email"]) == member
    # Indexes are per field: a login HMAC is not an e-mail HMAC.
    assert await vault.find_member("email", member.blind_indexes["login_id"]) is None
    assert await vault.find_member("login_id", secrets.token_bytes(32)) is None
    assert await vault.get_member(str(uuid.uuid4())) is None

    consents = await vault.list_consents(member.member_id)
    assert consents == sorted(CONSENTS, key=lambda c: c.purpose)
    for consent in consents:
        assert_utc(consent.recorded_at)


async def test_member_ids_and_datetimes_are_normalised(vault: Store) -> None:
    member = new_member()
    seoul = timezone(timedelta(hours=9))
    member = MemberRow(
        member_id=member.member_id.upper(),
        created_at=T0.astimezone(seoul),
        last_seen_at=ts(1).astimezone(seoul),
        ciphertexts=member.ciphertexts,
        blind_indexes=member.blind_indexes,
        key=member.key,
    )
    await vault.insert_member(member)
    got = await vault.get_member(member.member_id)  # upper case finds it too
    assert got is not None
    assert got.member_id == member.member_id.lower()
    assert got.created_at == T0
    assert got.last_seen_at == ts(1)
    assert_utc(got.created_at)


async def test_invalid_arguments_are_value_errors(vault: Store) -> None:
    with pytest.raises(ValueError):
        await vault.get_member("not-a-uuid")
    member = new_member()
    naive = MemberRow(
        member_id=member.member_id,
        created_at=T0.replace(tzinfo=None),
        last_seen_at=T0,
        ciphertexts=member.ciphertexts,
        blind_indexes=member.blind_indexes,
        key=member.key,
    )
    with pytest.raises(ValueError):
        await vault.insert_member(naive)
    missing = MemberRow(
        member_id=member.member_id,
        created_at=T0,
        last_seen_at=T0,
        ciphertexts={k: v for k, v in member.ciphertexts.items() if k != "mobile_phone"},
        blind_indexes=member.blind_indexes,
        key=member.key,
    )
    with pytest.raises(ValueError):
        await vault.insert_member(missing)
    with pytest.raises(ValueError):
        await vault.insert_member(replace(member, consents=tuple([CONSENTS[0], CONSENTS[0]])))
    with pytest.raises(ValueError):
        await vault.list_access(member.member_id, -1)
    assert await vault.get_member(member.member_id) is None


@pytest.mark.parametrize("field", ["login_id", "email"])
async def test_duplicate_blind_index_is_already_exists(vault: Store, field: str) -> None:
    first = new_member()
    first = replace(first, consents=tuple(sorted(CONSENTS, key=lambda c: c.purpose)))
    await vault.insert_member(first)
    taken = first.blind_indexes[field]
    second = new_member(login_hmac=taken) if field == "login_id" else new_member(email_hmac=taken)

    second = replace(second, consents=tuple(sorted(CONSENTS, key=lambda c: c.purpose)))

    with pytest.raises(AlreadyExists) as info:
        await vault.insert_member(second)

    assert info.value.field == field
    text = str(info.value)
    assert taken.hex() not in text
    assert repr(taken) not in text
    assert "constraint" not in text.lower()
    # The driver's error (whose detail holds the HMAC) is not chained into logs.
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__
    # Nothing of the failed member was left behind.
    assert await vault.get_member(second.member_id) is None
    assert await vault.list_consents(second.member_id) == []
    assert await vault.list_access(second.member_id, 10) == []
    assert await vault.get_member(first.member_id) == first


async def test_failed_insert_rolls_back_every_row(vault: Store) -> None:
    # The key row fails (unknown KEK version) after the member row went in.
    member = new_member(kek_version=99)
    member = replace(member, consents=tuple(sorted(CONSENTS, key=lambda c: c.purpose)))
    with pytest.raises(ValueError):
        await vault.insert_member(member)
    assert await vault.get_member(member.member_id) is None
    assert await vault.list_consents(member.member_id) == []
    assert await vault.find_member("login_id", member.blind_indexes["login_id"]) is None
    # The member row was rolled back too: its id and blind indexes are free.
    fixed = MemberRow(
        member_id=member.member_id,
        created_at=member.created_at,
        last_seen_at=member.last_seen_at,
        ciphertexts=member.ciphertexts,
        blind_indexes=member.blind_indexes,
        key=MemberKeyRow(member.member_id, 1, 1, member.key.wrapped_dek),
    )
    fixed = replace(fixed, consents=tuple(sorted(CONSENTS, key=lambda c: c.purpose)))
    await vault.insert_member(fixed)
    assert await vault.get_member(member.member_id) == fixed


async def test_update_member_changes_only_named_fields(vault: Store) -> None:
    member = new_member()
    other = new_member()
    await vault.insert_member(member)
    await vault.insert_member(other)

    new_email_hmac = secrets.token_bytes(32)
    assert await vault.update_member(
        member.member_id,
        {"name": b"new-name-ct", "email": b"new-email-ct"},
        {"email": new_email_hmac},
        dek_id=1,
    )
    got = await vault.get_member(member.member_id)
    assert got is not None
    expected_cts = dict(member.ciphertexts, name=b"new-name-ct", email=b"new-email-ct")
    assert dict(got.ciphertexts) == expected_cts
    assert dict(got.blind_indexes) == {
        "login_id": member.blind_indexes["login_id"],
        "email": new_email_hmac,
    }
    assert got.key == member.key
    assert got.created_at == member.created_at
    assert got.last_seen_at == member.last_seen_at
    # The blind index moved: the old HMAC finds no one, the new one finds the member.
    assert await vault.find_member("email", member.blind_indexes["email"]) is None
    assert await vault.find_member("email", new_email_hmac) == got
    assert await vault.get_member(other.member_id) == other

    # An empty update changes nothing but still says whether the member exists.
    assert await vault.update_member(member.member_id, {}, dek_id=1) is True
    assert await vault.get_member(member.member_id) == got


async def test_update_member_refuses_a_taken_blind_index(vault: Store) -> None:
    member = new_member()
    other = new_member()
    await vault.insert_member(member)
    await vault.insert_member(other)
    taken = other.blind_indexes["login_id"]
    with pytest.raises(AlreadyExists) as info:
        await vault.update_member(
            member.member_id, {"login_id": b"x"}, {"login_id": taken}, dek_id=1
        )
    assert info.value.field == "login_id"
    assert taken.hex() not in str(info.value)
    assert info.value.__cause__ is None
    # The whole update was refused, ciphertext included.
    assert await vault.get_member(member.member_id) == member


@pytest.mark.parametrize(
    ("ciphertexts", "blind_indexes"),
    [
        ({"birth_date": b"x"}, None),
        ({"name_ct = name_ct; --": b"x"}, None),
        ({}, {"name": b"x"}),
        ({"name": b"x"}, {"password_hash": b"x"}),
    ],
)
async def test_update_member_rejects_unknown_fields(
    vault: Store, ciphertexts: dict[str, bytes], blind_indexes: dict[str, bytes] | None
) -> None:
    member = new_member()
    await vault.insert_member(member)
    with pytest.raises(ValueError):
        await vault.update_member(member.member_id, ciphertexts, blind_indexes, dek_id=1)
    assert await vault.get_member(member.member_id) == member


async def test_update_unknown_member_is_false(vault: Store) -> None:
    assert await vault.update_member(str(uuid.uuid4()), {"name": b"x"}, dek_id=1) is False
    assert await vault.update_member(str(uuid.uuid4()), {}, dek_id=1) is False


async def test_record_login(vault: Store) -> None:
    member = new_member()
    await vault.insert_member(member)

    assert await vault.record_login(member.member_id, entry(ts(60), 1), dek_id=1) is True
    got = await vault.get_member(member.member_id)
    assert got is not None
    assert got.last_seen_at == ts(60)
    assert got.ciphertexts["password_hash"] == member.ciphertexts["password_hash"]
    entries = await vault.list_access(member.member_id, 10)
    assert [(e.at, e.action_ct, e.ip_ct) for e in entries] == [(ts(60), b"action-1", b"ip-1")]
    assert_utc(entries[0].at)

    # A rehash on login swaps the password hash in the same transaction.
    assert (
        await vault.record_login(member.member_id, entry(ts(120), 2), b"rehashed-ct", dek_id=1)
        is True
    )
    got = await vault.get_member(member.member_id)
    assert got is not None
    assert got.last_seen_at == ts(120)
    assert got.ciphertexts["password_hash"] == b"rehashed-ct"
    assert got.ciphertexts["name"] == member.ciphertexts["name"]
    assert len(await vault.list_access(member.member_id, 10)) == 2

    stranger = str(uuid.uuid4())
    assert await vault.record_login(stranger, entry(ts(180)), b"ct", dek_id=1) is False
    assert await vault.list_access(stranger, 10) == []


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


# --- destruction ----------------------------------------------------------------


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
        "access_log": 3,
        "outbox": 0,
        "password_resets": 0,
    }
    assert record.kek_versions == (2,)

    assert await vault.get_member(member.member_id) is None
    assert await vault.find_member("login_id", member.blind_indexes["login_id"]) is None
    assert await vault.find_member("email", member.blind_indexes["email"]) is None
    assert await vault.list_consents(member.member_id) == []
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
        "access_log": 0,
        "outbox": 0,
        "password_resets": 0,
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


# --- open_store -------------------------------------------------------------------


async def test_open_store_rejects_unknown_scheme_without_echoing_the_url() -> None:
    with pytest.raises(ValueError) as info:
        await open_store("mysql://vault:hunter2@db.internal/vault")
    assert "mysql" in str(info.value)
    assert "hunter2" not in str(info.value)
    assert "db.internal" not in str(info.value)


# --- SQLite only -------------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_sqlite_file_is_private_and_settings_hold(tmp_path: Path) -> None:
    db = tmp_path / "nested" / "dir" / "vault.db"
    store = await open_store(f"sqlite:///{db}")
    try:
        assert isinstance(store, SqliteStore)
        await store.migrate()
        assert _mode(db) == 0o600
        assert _mode(db.parent) == 0o700
        for suffix in ("-wal", "-shm"):
            sidecar = db.with_name(db.name + suffix)
            if sidecar.exists():
                assert _mode(sidecar) & 0o077 == 0
        assert await store.pragmas() == {
            "busy_timeout": 5000,
            "journal_mode": "wal",
            "synchronous": 2,  # FULL
            "foreign_keys": 1,
            "secure_delete": 1,
        }
    finally:
        await store.close()


async def test_sqlite_relative_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    store = await open_store("sqlite:///data/vault.db")
    try:
        assert await store.migrate() == every_migration("sqlite:///data/vault.db")
    finally:
        await store.close()
    assert _mode(tmp_path / "data" / "vault.db") == 0o600


async def test_sqlite_unopenable_file_is_storage_unavailable(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_bytes(b"")
    with pytest.raises(StorageUnavailable) as info:
        await open_store(f"sqlite:///{blocker}/vault.db")
    assert str(tmp_path) not in str(info.value)


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


# --- PostgreSQL only ----------------------------------------------------------------


async def test_postgres_unreachable_is_storage_unavailable_without_dsn() -> None:
    url = "postgresql://vaultuser:s3cret-pw@127.0.0.1:1/vaultdb"
    with pytest.raises(StorageUnavailable) as info:
        await open_store(url)
    text = str(info.value)
    for secret in ("s3cret-pw", "vaultuser", "127.0.0.1", "vaultdb", url):
        assert secret not in text
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__
