"""The shredding horizon, proven (issue 3, item 4).

Shredding deletes a member's wrapped DEK from the live database at once. A copy
taken before (a backup, a pg_dump, WAL) still holds it, wrapped under the KEK
version of the day. Once that version is rotated away, re-wrapped and destroyed,
the copy is noise even with the key provider's current material - and the test
shows first that the same copy *was* readable before the destruction, so the
check can fail. The same holds for a backup made by ``privacy-vault backup``
(issue 8, item 17), which never holds the key file - and does not for a copy of the
data directory that includes it.
"""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from process_support import cli_env, run_cli

from vault import CHEAPEST, NewMember, Vault, _hazmat, open_vault
from vault.bindings import dek_context
from vault.errors import DecryptionError, KeyUnavailable
from vault.providers.base import KeyProvider
from vault.providers.local import LocalKeyProvider
from vault.store import Store, open_store

CANARY_NAME = "Horizon Canary Qx7"


async def _backup(store_url: str, tmp_path: Path, make_db: Callable[[], Awaitable[str]]) -> str:
    """A copy of the database as a backup job would take it; returns its URL."""
    if store_url.startswith("sqlite:///"):
        source = sqlite3.connect(store_url.removeprefix("sqlite:///"))
        target_path = tmp_path / "backup.db"
        target = sqlite3.connect(target_path)
        source.backup(target)
        source.close()
        target.close()
        return f"sqlite:///{target_path}"
    dump = tmp_path / "vault.dump"
    await asyncio.to_thread(
        subprocess.run, ["pg_dump", "-Fc", "-f", str(dump), store_url], check=True
    )
    restored = await make_db()
    await asyncio.to_thread(
        subprocess.run, ["pg_restore", "--no-owner", "-d", restored, str(dump)], check=True
    )
    return restored


async def _read_name_from_copy(
    vault: Vault, copy: Store, member_id: str, provider: KeyProvider | None = None
) -> str:
    """Decrypt the member's name from the copy with the provider's current keys (or
    with ``provider``'s, e.g. a copy of the key file)."""
    row = await copy.get_member(member_id)
    assert row is not None, "the copy holds the member"
    material = await (provider or vault.parts.provider).unwrap(
        row.key.kek_version, row.key.wrapped_dek, dek_context(member_id, row.key.dek_id)
    )
    dek = _hazmat.SecretKey(row.key.dek_id, material)
    return _hazmat.open_field(dek, member_id, "name", row.ciphertexts["name"]).decode()


async def test_old_copies_die_with_the_kek_version(
    store_url: str, tmp_path: Path, make_postgres_database: Callable[[], Awaitable[str]]
) -> None:
    async with open_vault(
        data_dir=tmp_path / "data", database_url=store_url, argon2=CHEAPEST
    ) as vault:
        doomed = await vault.sign_up(
            NewMember("doomed01", "a long passphrase", CANARY_NAME, "d@example.com", "1990-01-01")
        )
        await vault.sign_up(
            NewMember("keeper01", "a long passphrase", "Keeper", "k@example.com", "1990-01-01")
        )
        copy_url = await _backup(store_url, tmp_path, make_postgres_database)

        await vault.shred(doomed, reason="withdrawal")
        assert await vault.parts.store.get_member(doomed) is None  # live: gone at once

        await vault.keys.rotate("test")
        async for _ in vault.keys.rewrap("test"):
            pass
        copy = await open_store(copy_url)
        try:
            # Before the destruction the old copy still decrypts: the horizon is open.
            assert await _read_name_from_copy(vault, copy, doomed) == CANARY_NAME

            await vault.keys.destroy_version(1, "test")
            # After it, the current key material cannot open the copy's DEK.
            with pytest.raises((KeyUnavailable, DecryptionError)):
                await _read_name_from_copy(vault, copy, doomed)
            status = await vault.keys.status()
            assert {v.version: v.state for v in status.versions} == {
                1: "destroyed",
                2: "active",
            }
        finally:
            await copy.close()
        # The live members were re-wrapped and still read.
        assert (await vault.keys.status()).versions[1].member_keys == 1


async def test_a_backup_made_by_the_command_dies_with_the_kek_version(tmp_path: Path) -> None:
    """``privacy-vault backup`` (issue 8, item 17) on the embedded default: the copy
    holds the member's wrapped DEK but no key, so destroying the KEK version closes
    the horizon on it. A copy of the key file taken beside it (what copying the data
    directory does) keeps it open: that is why the key file must live elsewhere."""
    data = tmp_path / "data"
    dest = tmp_path / "backup"
    async with open_vault(data_dir=data, argon2=CHEAPEST) as vault:
        doomed = await vault.sign_up(
            NewMember("doomed01", "a long passphrase", CANARY_NAME, "d@example.com", "1990-01-01")
        )
        await vault.sign_up(
            NewMember("keeper01", "a long passphrase", "Keeper", "k@example.com", "1990-01-01")
        )
        made = await asyncio.to_thread(run_cli, ["backup", str(dest)], cli_env(data), tmp_path)
        assert made.returncode == 0, made.stderr
        assert not any(p.name.startswith("kek") for p in dest.iterdir())
        # The "obvious backup" would also have taken this, at the same moment.
        naive_key_file = tmp_path / "naive-copy-of-data-dir" / "kek.json"
        naive_key_file.parent.mkdir(mode=0o700)
        shutil.copy2(data / "kek.json", naive_key_file)

        await vault.shred(doomed, reason="withdrawal")
        await vault.keys.rotate("test")
        async for _ in vault.keys.rewrap("test"):
            pass
        copy = await open_store(f"sqlite:///{dest / 'vault.db'}")
        try:
            # Positive control: before the destruction the backup still decrypts.
            assert await _read_name_from_copy(vault, copy, doomed) == CANARY_NAME

            await vault.keys.destroy_version(1, "test")
            with pytest.raises((KeyUnavailable, DecryptionError)):
                await _read_name_from_copy(vault, copy, doomed)

            # The same backup with the key file copied beside it: still readable.
            stale_keys = LocalKeyProvider(naive_key_file, writable=False)
            assert await _read_name_from_copy(vault, copy, doomed, stale_keys) == CANARY_NAME
        finally:
            await copy.close()


async def test_destroyed_material_is_gone_from_the_key_file(tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with open_vault(data_dir=data, argon2=CHEAPEST) as vault:
        before = (data / "kek.json").read_text()
        await vault.keys.rotate("test")
        async for _ in vault.keys.rewrap("test"):
            pass
        await vault.keys.destroy_version(1, "test")
        after = (data / "kek.json").read_text()
    old_material = before.split('"1": "')[1].split('"')[0]
    assert old_material not in after
    assert '"2"' in after
    # The file was replaced, not edited in place: no stale copy next to it.
    assert sorted(p.name for p in data.iterdir() if p.name.startswith("kek")) == [
        "kek.json",
        "kek.lock",
    ]


async def test_a_version_destroyed_elsewhere_leaves_this_process_too(tmp_path: Path) -> None:
    """The keys CLI destroys a version in another process: a running server's
    provider must not keep the material in memory until it restarts."""
    key_file = tmp_path / "kek.json"
    # recheck_seconds=0: look at the file on every call (the default waits 0.5 s).
    server_side = LocalKeyProvider(key_file, recheck_seconds=0)
    cli_side = LocalKeyProvider(key_file)
    await server_side.create_version(1)
    await cli_side.create_version(2)
    wrapped = await server_side.wrap(1, b"k" * 32, b"ctx")
    assert await server_side.unwrap(1, wrapped, b"ctx") == b"k" * 32
    assert await server_side.has_version(2)  # added by the other process

    await cli_side.destroy_version(1)
    with pytest.raises(KeyUnavailable):
        await server_side.unwrap(1, wrapped, b"ctx")
    assert not await server_side.has_version(1)
