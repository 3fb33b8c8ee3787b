"""The Database contract: migrations, opening by URL, and what only one backend can show: the
SQLite file itself, PostgreSQL connection failures. Every test that uses the ``store`` or
``store_url`` fixture runs once on SQLite and once on PostgreSQL."""

from __future__ import annotations

import asyncio
import sqlite3
import stat
from pathlib import Path

import pytest
from store_support import new_member, with_active_kek

from vault.errors import StorageUnavailable
from vault.store import (
    database_backend,
    open_store,
)
from vault.store._migrations import load_migrations
from vault.store.sqlite import SqliteStore

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


@pytest.mark.parametrize("schema", ["vault", "retention"])
def test_both_backends_number_their_migrations_alike(schema: str) -> None:
    """The same number is the same change on both backends, with no gaps, so a
    version in either database's schema_migrations means one thing."""
    sqlite = [(m.version, m.name) for m in load_migrations("sqlite", schema)]
    postgres = [(m.version, m.name) for m in load_migrations("postgres", schema)]
    assert sqlite == postgres
    assert [version for version, _ in sqlite] == list(range(1, len(sqlite) + 1))


async def test_a_sqlite_database_that_skipped_0006_records_it_and_keeps_its_data(
    tmp_path: Path,
) -> None:
    """A SQLite database migrated before its 0006 existed (0005 then 0007) gets the
    empty 0006 recorded on the next start, and nothing else changes."""
    path = tmp_path / "vault.db"
    store = await open_store(f"sqlite:///{path}")
    try:
        await store.migrate()
        await with_active_kek(store)
        member = new_member()
        await store.insert_member(member)
    finally:
        await store.close()
    with sqlite3.connect(path) as conn:
        conn.execute("DELETE FROM schema_migrations WHERE version = 6")
    conn.close()
    store = await open_store(f"sqlite:///{path}")
    try:
        assert await store.migrate() == [6]
        assert await store.migrate() == []
        assert await store.get_member(member.member_id) == member
    finally:
        await store.close()


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
