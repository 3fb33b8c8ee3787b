"""``privacy-vault backup DEST`` (issue 8, item 17): an online copy of the embedded
databases that never holds the key file.

The command runs as a real subprocess while the real server (in this process) keeps
answering sign-ups; the copy is then served by a second server, restored as the
README says, and read back over gRPC. With PostgreSQL the command refuses and points
at pg_dump / pg_basebackup. The horizon side (the copy dies with the KEK version) is
in tests/test_shredding_horizon.py.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import shutil
import sqlite3
import stat
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from grpc_support import embedded_settings, sign_up_request
from process_support import cli_env

from privacyvault.v1 import member_pb2 as pb
from privacyvault.v1 import member_pb2_grpc
from service.config import Settings
from service.server import RunningServer, run_server

BACKUP_TIMEOUT = 60.0
#: The writer's bound: it stops at this many sign-ups even if the backup never ends.
MAX_WRITES = 2_000


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def run_backup(dest: Path, env: dict[str, str], cwd: Path) -> tuple[int, str, str]:
    """``python -m service backup DEST`` as a subprocess, awaited without blocking the
    event loop (the server under test runs on it)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        "backup",
        str(dest),
        env=env,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), BACKUP_TIMEOUT)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@contextlib.asynccontextmanager
async def _serving(settings: Settings) -> AsyncIterator[tuple[RunningServer, grpc.aio.Channel]]:
    async with (
        run_server(settings) as running,
        grpc.aio.insecure_channel(running.target) as channel,
    ):
        yield running, channel


def _key_material(key_file: Path) -> list[bytes]:
    """Every KEK version's material, raw and as stored (base64)."""
    versions = json.loads(key_file.read_text())["versions"]
    return [form for m in versions.values() for form in (m.encode(), base64.b64decode(m))]


async def test_backup_while_serving_writes_is_a_vault_without_the_key_file(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    dest = tmp_path / "backups" / "2026-06-15"
    before: list[str] = []
    during: list[str] = []
    async with _serving(embedded_settings(data)) as (_, channel):
        members = member_pb2_grpc.MemberServiceStub(channel)
        for _ in range(20):
            before.append((await members.SignUp(sign_up_request(), timeout=10)).member_id)

        backup_done = asyncio.Event()

        async def keep_writing() -> None:
            # Sign-ups all along the backup, bounded in count.
            while not backup_done.is_set() and len(during) < MAX_WRITES:
                during.append((await members.SignUp(sign_up_request(), timeout=10)).member_id)

        writer = asyncio.create_task(keep_writing())
        try:
            code, out, err = await run_backup(dest, cli_env(data), tmp_path)
        finally:
            backup_done.set()
            await writer  # a write that failed meanwhile fails the test here
        assert code == 0, err
        # The server was serving writes while the command ran, and still is.
        assert during
        after = (await members.SignUp(sign_up_request(), timeout=10)).member_id

    report = json.loads(out)
    assert report["type"] == "backup"
    assert {f["role"]: f["file"] for f in report["files"]} == {
        "vault": "vault.db",
        "retention": "retention.db",
    }
    assert report["kek_versions"] == [1]

    # Exactly the two databases and the manifest: no key file, no lock, no -wal.
    assert sorted(p.name for p in dest.iterdir()) == ["backup.json", "retention.db", "vault.db"]
    assert _mode(dest) == 0o700
    for path in dest.iterdir():
        assert _mode(path) == 0o600, path.name
    # Not even the key file's content under another name.
    material = _key_material(data / "kek.json")
    for path in dest.iterdir():
        content = path.read_bytes()
        assert not any(m in content for m in material), path.name
    manifest = json.loads((dest / "backup.json").read_text())
    for f in manifest["files"]:
        assert hashlib.sha256((dest / f["file"]).read_bytes()).hexdigest() == f["sha256"]
    assert "not in this backup" in manifest["key_material"]
    for file in ("vault.db", "retention.db"):
        with contextlib.closing(sqlite3.connect(dest / file)) as db:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"

    # Restore as the README says (the copies into a data directory, the key file
    # beside them as a mounted secret) and serve it: every member written before the
    # backup is there and reads back; nothing written after it is.
    restored = tmp_path / "restored"
    restored.mkdir(mode=0o700)
    for file in ("vault.db", "retention.db"):
        shutil.copy2(dest / file, restored / file)
    settings = embedded_settings(restored, local_key_file=data / "kek.json")
    async with _serving(settings) as (running, channel):
        members = member_pb2_grpc.MemberServiceStub(channel)
        for member_id in before:
            reply = await members.GetMember(
                pb.GetMemberRequest(member_id=member_id, purpose=pb.PURPOSE_IDENTIFICATION),
                timeout=10,
            )
            assert reply.member.name.startswith("Member Number")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await members.GetMember(
                pb.GetMemberRequest(member_id=after, purpose=pb.PURPOSE_IDENTIFICATION),
                timeout=10,
            )
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        # One consistent snapshot: each member in the copy has its key with it, and
        # the writes made during the backup are a prefix of them (none torn).
        copied = (await running.vault.keys.status()).versions[0].member_keys
        assert len(before) <= copied <= len(before) + len(during)
        for member_id in during[: copied - len(before)]:
            await members.GetMember(
                pb.GetMemberRequest(member_id=member_id, purpose=pb.PURPOSE_IDENTIFICATION),
                timeout=10,
            )


async def test_backup_refuses_a_dest_that_holds_a_backup(tmp_path: Path) -> None:
    data = tmp_path / "data"
    dest = tmp_path / "backup"
    async with _serving(embedded_settings(data)) as (_, channel):
        await member_pb2_grpc.MemberServiceStub(channel).SignUp(sign_up_request(), timeout=10)
        assert (await run_backup(dest, cli_env(data), tmp_path))[0] == 0
        first = {p.name: p.read_bytes() for p in dest.iterdir()}
        code, _, err = await run_backup(dest, cli_env(data), tmp_path)
    assert code == 1
    assert json.loads(err)["error"] == "refused"
    assert "already holds" in err
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == first  # untouched


async def test_backup_into_the_data_directory_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with _serving(embedded_settings(data)):
        code, _, err = await run_backup(data / "backups" / "today", cli_env(data), tmp_path)
    assert code == 2
    assert "inside the data directory" in json.loads(err)["message"]
    assert not (data / "backups").exists()


async def test_backup_before_any_start_is_not_found(tmp_path: Path) -> None:
    code, _, err = await run_backup(tmp_path / "backup", cli_env(tmp_path / "data"), tmp_path)
    assert code == 4
    assert json.loads(err)["error"] == "not_found"
    assert not (tmp_path / "backup").exists()


@pytest.mark.postgres
async def test_backup_of_a_postgres_vault_refuses_and_points_at_pg_dump(
    tmp_path: Path,
    make_postgres_database: Callable[[], Awaitable[str]],
) -> None:
    url = await make_postgres_database()
    data = tmp_path / "data"
    async with _serving(embedded_settings(data, database_url=url)) as (_, channel):
        await member_pb2_grpc.MemberServiceStub(channel).SignUp(sign_up_request(), timeout=10)
        code, out, err = await run_backup(
            tmp_path / "backup", cli_env(data, database_url=url), tmp_path
        )
    assert code == 2
    error = json.loads(err)
    assert error["error"] == "usage"
    assert "pg_dump" in error["message"]
    assert "README" in error["message"]
    assert "postgres@" not in err + out  # the URL is never echoed
    assert not (tmp_path / "backup").exists()
