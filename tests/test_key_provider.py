"""The local key provider and vault bootstrap: file permissions, malformed files,
concurrent creation across processes, mounted (read-only) key files, and failing
fast when the key file does not belong to the database."""

from __future__ import annotations

import asyncio
import base64
import json
import multiprocessing
import os
import stat
from multiprocessing.synchronize import Barrier
from pathlib import Path

import pytest

from vault import CHEAPEST, KeyProviderSettings, open_vault
from vault.errors import DecryptionError, KeyUnavailable
from vault.providers.local import FILE_FORMAT, LocalKeyProvider

MATERIAL = bytes(range(32))
CONTEXT = b"dek|test-member|1"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _file_secrets(path: Path) -> list[str]:
    """Every key in a key file, as base64 (as stored), hex and raw text."""
    versions: dict[str, str] = json.loads(path.read_bytes())["versions"]
    forms: list[str] = []
    for encoded in versions.values():
        raw = base64.b64decode(encoded)
        forms += [encoded, raw.hex(), raw.decode("latin-1")]
    return forms


async def _new_key_file(path: Path) -> LocalKeyProvider:
    provider = LocalKeyProvider(path)
    await provider.create_version(1)
    return provider


# --- the file and its permissions ---------------------------------------------------


async def test_first_open_creates_a_0600_key_file_in_a_0700_data_dir(tmp_path: Path) -> None:
    data_dir = tmp_path / "fresh" / "data"
    async with open_vault(data_dir=data_dir, argon2=CHEAPEST):
        pass
    key_file = data_dir / "kek.json"
    assert _mode(data_dir) == 0o700
    assert _mode(key_file) == 0o600
    doc = json.loads(key_file.read_bytes())
    assert doc["format"] == FILE_FORMAT
    assert list(doc["versions"]) == ["1"]
    assert len(base64.b64decode(doc["versions"]["1"])) == 32
    # Nothing else in the directory is readable by group or others either.
    for path in data_dir.iterdir():
        assert _mode(path) & 0o077 == 0, path.name


async def test_provider_round_trip_and_missing_version(tmp_path: Path) -> None:
    provider = await _new_key_file(tmp_path / "kek.json")
    assert await provider.has_version(1)
    assert not await provider.has_version(2)
    wrapped = await provider.wrap(1, MATERIAL, CONTEXT)
    assert await provider.unwrap(1, wrapped, CONTEXT) == MATERIAL
    with pytest.raises(DecryptionError):
        await provider.unwrap(1, wrapped, b"dek|other-member|1")
    with pytest.raises(KeyUnavailable):
        await provider.wrap(2, MATERIAL, CONTEXT)


async def test_create_version_is_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "kek.json"
    provider = await _new_key_file(path)
    before = path.read_bytes()
    await provider.create_version(1)
    await LocalKeyProvider(path).create_version(1)
    assert path.read_bytes() == before


async def test_repr_names_versions_not_keys(tmp_path: Path) -> None:
    path = tmp_path / "kek.json"
    provider = await _new_key_file(path)
    text = repr(provider)
    assert "1" in text
    for secret in _file_secrets(path):
        assert secret not in text


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
async def test_key_file_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "kek.json"
    await _new_key_file(path)
    path.chmod(mode)
    with pytest.raises(KeyUnavailable) as caught:
        LocalKeyProvider(path)
    message = str(caught.value)
    assert "chmod" in message
    for secret in _file_secrets(path):
        assert secret not in message


async def test_data_dir_with_a_readable_key_file_does_not_open(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    async with open_vault(data_dir=data_dir, argon2=CHEAPEST):
        pass
    (data_dir / "kek.json").chmod(0o644)
    with pytest.raises(KeyUnavailable, match="chmod"):
        async with open_vault(data_dir=data_dir, argon2=CHEAPEST):
            pass


SECRET_LOOKING = "c2VjcmV0LWtleS1tYXRlcmlhbC10aGF0LW11c3Qtbm90LWxlYWs"
SHORT_KEY = base64.b64encode(b"sixteen-byte-key").decode()  # valid base64, not 32 bytes


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(f"not json {SECRET_LOOKING}", id="not-json"),
        pytest.param(f'{{"format": "{FILE_FORMAT}", "versions": ', id="truncated-json"),
        pytest.param(f'["{SECRET_LOOKING}"]', id="json-list"),
        pytest.param(f'{{"format": "{FILE_FORMAT}"}}', id="no-versions"),
        pytest.param(
            f'{{"format": "{FILE_FORMAT}", "versions": {{"1": "!{SECRET_LOOKING}!"}}}}',
            id="bad-base64",
        ),
        pytest.param(
            f'{{"format": "{FILE_FORMAT}", "versions": {{"1": "{SHORT_KEY}"}}}}',
            id="key-of-wrong-length",
        ),
        pytest.param(
            f'{{"format": "{FILE_FORMAT}", "versions": {{"one": "{SECRET_LOOKING}"}}}}',
            id="non-numeric-version",
        ),
        pytest.param(
            f'{{"format": "{FILE_FORMAT}", "versions": ["{SECRET_LOOKING}"]}}',
            id="versions-not-a-map",
        ),
    ],
)
def test_malformed_key_file_is_refused_without_echo(tmp_path: Path, content: str) -> None:
    path = tmp_path / "kek.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, content.encode())
    os.close(fd)
    with pytest.raises(KeyUnavailable) as caught:
        LocalKeyProvider(path)
    message = str(caught.value)
    assert "malformed" in message
    assert SECRET_LOOKING not in message
    assert SHORT_KEY not in message
    assert SECRET_LOOKING[:12] not in message
    assert caught.value.__cause__ is None


def test_key_file_of_unknown_format_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "kek.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, json.dumps({"format": "other/9", "versions": {}}).encode())
    os.close(fd)
    with pytest.raises(KeyUnavailable, match="unknown format"):
        LocalKeyProvider(path)


# --- two processes creating version 1 at once ---------------------------------------


def _race_create(
    path: str,
    barrier: Barrier,
    material: bytes,
    outbox: multiprocessing.Queue,
    inbox: multiprocessing.Queue,
) -> None:
    """In a spawned process: create version 1, wrap ``material``, then unwrap what the
    other process wrapped, all with this process's in-memory view of the file."""

    async def run() -> None:
        provider = LocalKeyProvider(Path(path))
        barrier.wait(timeout=60)
        await provider.create_version(1)
        outbox.put(("wrapped", await provider.wrap(1, material, CONTEXT)))
        peer_wrapped: bytes = inbox.get(timeout=60)
        try:
            outbox.put(("unwrapped", await provider.unwrap(1, peer_wrapped, CONTEXT)))
        except DecryptionError:
            outbox.put(("unwrapped", b"DecryptionError"))

    asyncio.run(run())


def test_concurrent_create_version_in_two_processes_agrees(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    path = tmp_path / "data" / "kek.json"
    materials = [bytes([i]) * 32 for i in (1, 2)]
    barrier = ctx.Barrier(2)
    outboxes = [ctx.Queue() for _ in materials]
    inboxes = [ctx.Queue() for _ in materials]
    processes = [
        ctx.Process(target=_race_create, args=(str(path), barrier, m, outboxes[i], inboxes[i]))
        for i, m in enumerate(materials)
    ]
    for process in processes:
        process.start()
    try:
        wrapped = []
        for outbox in outboxes:
            kind, value = outbox.get(timeout=60)
            assert kind == "wrapped"
            wrapped.append(value)
        # Each unwraps what the other wrapped.
        inboxes[0].put(wrapped[1])
        inboxes[1].put(wrapped[0])
        unwrapped = [outbox.get(timeout=60) for outbox in outboxes]
    finally:
        for process in processes:
            process.join(timeout=60)
            if process.is_alive():
                process.kill()
    assert [p.exitcode for p in processes] == [0, 0]
    assert unwrapped == [("unwrapped", materials[1]), ("unwrapped", materials[0])]
    doc = json.loads(path.read_bytes())
    assert list(doc["versions"]) == ["1"]
    assert _mode(path) == 0o600


# --- mounted (read-only) key files ---------------------------------------------------


async def test_mounted_key_file_without_the_version_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "secret" / "kek.json"
    await _new_key_file(path)
    before = path.read_bytes()
    mounted = LocalKeyProvider(path, writable=False)
    await mounted.create_version(1)  # present: nothing to do
    with pytest.raises(KeyUnavailable, match="mounted key file"):
        await mounted.create_version(2)
    assert path.read_bytes() == before
    assert not await mounted.has_version(2)


async def test_missing_mounted_key_file_is_never_created(tmp_path: Path) -> None:
    path = tmp_path / "secret" / "kek.json"
    mounted = LocalKeyProvider(path, writable=False)
    with pytest.raises(KeyUnavailable):
        await mounted.create_version(1)
    assert not path.exists()


async def test_vault_on_mounted_key_file_without_version_1_fails_at_start(tmp_path: Path) -> None:
    # A mounted secret holding only version 2 cannot start an empty database,
    # which needs version 1; the vault must not write a version into the secret.
    source = tmp_path / "source.json"
    provider = LocalKeyProvider(source)
    await provider.create_version(2)
    mounted = tmp_path / "secret" / "kek.json"
    mounted.parent.mkdir()
    mounted.write_bytes(source.read_bytes())
    mounted.chmod(0o400)
    with pytest.raises(KeyUnavailable):
        async with open_vault(
            data_dir=tmp_path / "data",
            key_provider=KeyProviderSettings(local_key_file=mounted),
            argon2=CHEAPEST,
        ):
            pass
    assert mounted.read_bytes() == source.read_bytes()


# --- a key file that does not belong to the database --------------------------------


async def test_vault_opens_again_with_its_own_key_file(tmp_path: Path, store_url: str) -> None:
    data_dir = tmp_path / "first"
    async with open_vault(data_dir=data_dir, database_url=store_url, argon2=CHEAPEST):
        pass
    async with open_vault(data_dir=data_dir, database_url=store_url, argon2=CHEAPEST) as vault:
        assert [v.version for v in await vault.parts.store.list_kek_versions()] == [1]


async def test_vault_with_another_key_file_fails_at_start(tmp_path: Path, store_url: str) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    async with open_vault(data_dir=first, database_url=store_url, argon2=CHEAPEST):
        pass
    # The second data directory has its own, different version 1.
    second.mkdir(mode=0o700)
    other = await _new_key_file(second / "kek.json")
    assert await other.has_version(1)
    with pytest.raises(KeyUnavailable) as caught:
        async with open_vault(data_dir=second, database_url=store_url, argon2=CHEAPEST):
            pass
    message = str(caught.value)
    assert "do not open this database" in message
    for secret in _file_secrets(second / "kek.json") + _file_secrets(first / "kek.json"):
        assert secret not in message
    # Nothing was changed by the failed start: the right key file still opens it.
    async with open_vault(data_dir=first, database_url=store_url, argon2=CHEAPEST):
        pass


async def test_vault_with_an_empty_key_file_fails_at_start(tmp_path: Path, store_url: str) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    async with open_vault(data_dir=first, database_url=store_url, argon2=CHEAPEST):
        pass
    with pytest.raises(KeyUnavailable, match="active KEK version 1"):
        async with open_vault(data_dir=second, database_url=store_url, argon2=CHEAPEST):
            pass
    # A fresh key file must not be invented for an existing database.
    key_file = second / "kek.json"
    assert not key_file.exists() or json.loads(key_file.read_bytes())["versions"] == {}


async def test_vault_with_another_mounted_key_file_fails_at_start(
    tmp_path: Path, store_url: str
) -> None:
    first = tmp_path / "first"
    async with open_vault(data_dir=first, database_url=store_url, argon2=CHEAPEST):
        pass
    mounted = tmp_path / "secret" / "kek.json"
    await _new_key_file(mounted)
    with pytest.raises(KeyUnavailable, match="do not open this database"):
        async with open_vault(
            data_dir=tmp_path / "second",
            database_url=store_url,
            key_provider=KeyProviderSettings(local_key_file=mounted),
            argon2=CHEAPEST,
        ):
            pass
