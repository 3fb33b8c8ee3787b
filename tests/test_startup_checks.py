"""Start-up checks (issue 8, item 13): a weak admin token is refused at settings load
(exit 2, the rule named, the token never printed); a data directory or SQLite file
open to group or others is tightened when it is ours (with a log line) and refused
when it is another user's; a key file open to others is refused, not tightened.

Through the real CLI in subprocesses (``python -m service serve``) and, on both
backends, the in-process server."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import SecretStr, ValidationError

from service.config import Settings
from service.server import run_server

STARTUP_TIMEOUT = 30.0
OTHER_UID = 65534  # nobody
RULE = "printable ASCII characters without whitespace"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env(data_dir: Path, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRIVACY_VAULT_")}
    env |= {
        "PRIVACY_VAULT_DATA_DIR": str(data_dir),
        "PRIVACY_VAULT_ARGON2_TIME_COST": "1",
        "PRIVACY_VAULT_ARGON2_MEMORY_COST": "8",
        "PRIVACY_VAULT_SIDECAR_IN_PROCESS": "false",
        "PRIVACY_VAULT_LOG_FORMAT": "json",
        "PRIVACY_VAULT_LISTEN_ADDRESS": f"127.0.0.1:{_free_port()}",
        "PYTHONUNBUFFERED": "1",
    }
    env |= {f"PRIVACY_VAULT_{k.upper()}": v for k, v in settings.items()}
    return env


def _cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run the CLI to its end. A ``serve`` that starts instead of refusing never ends on
    its own: the timeout fails the test then."""
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=STARTUP_TIMEOUT,
        check=False,
    )


@contextlib.contextmanager
def _serving(env: dict[str, str], cwd: Path, log: Path) -> Iterator[list[dict[str, Any]]]:
    """``serve`` until health answers; yields its JSON log events once it stopped."""
    target = env["PRIVACY_VAULT_LISTEN_ADDRESS"]
    events: list[dict[str, Any]] = []
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "service", "serve"],
            env=env,
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + STARTUP_TIMEOUT
            with grpc.insecure_channel(target) as channel:
                health = health_pb2_grpc.HealthStub(channel)
                while True:
                    if process.poll() is not None:
                        pytest.fail(f"serve exited {process.returncode}:\n{log.read_text()}")
                    try:
                        health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                        break
                    except grpc.RpcError:
                        if time.monotonic() > deadline:
                            pytest.fail(f"serve did not start:\n{log.read_text()}")
                        time.sleep(0.1)
            yield events
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=STARTUP_TIMEOUT) == 0, log.read_text()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
    for line in log.read_text().splitlines():
        with contextlib.suppress(ValueError):
            events.append(json.loads(line))


# --- the admin token -------------------------------------------------------------------------

WEAK_TOKENS = {
    "sixteen-spaces": " " * 16,
    "one-character": "a" * 40,
    "a-short-pattern": "abcabcabcabcabcabcabc",  # 3 distinct
    "seven-distinct": "passwordpassword",
    "inner-space": "correct horse battery staple",
    "a-tab": "tab\tseparated-token-0123",
    "non-ascii": "관리자-토큰-0123456789-abcdef",
    "too-short": "Zq8#mX2!",
    "too-long": secrets.token_urlsafe(800),  # ~1070 characters: no header carries it
}


@pytest.mark.parametrize("token", WEAK_TOKENS.values(), ids=WEAK_TOKENS.keys())
def test_serve_refuses_a_weak_admin_token_without_printing_it(tmp_path: Path, token: str) -> None:
    result = _cli(["serve"], _env(tmp_path / "data", admin_token=token), tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "PRIVACY_VAULT_ADMIN_TOKEN" in result.stderr
    assert RULE in result.stderr  # what is wrong, not only where
    output = result.stdout + result.stderr
    for part in token.split():
        if len(part) >= 4:
            assert part not in output
    assert not (tmp_path / "data").exists()  # refused before anything was created


def test_a_weak_admin_token_from_a_file_is_refused_too(tmp_path: Path) -> None:
    token_file = tmp_path / "admin-token"
    token_file.write_text(" " * 16 + "\n")
    env = _env(tmp_path / "data")
    env["PRIVACY_VAULT_ADMIN_TOKEN_FILE"] = str(token_file)
    result = _cli(["serve"], env, tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "PRIVACY_VAULT_ADMIN_TOKEN" in result.stderr


@pytest.mark.parametrize(
    "token",
    [
        secrets.token_urlsafe(32),
        secrets.token_hex(16),
        "test-admin-token-0123456789abcdef",
        "Zq8#mX2!wL5$pR9&",  # 16 characters, 16 distinct, punctuation is fine
    ],
)
def test_a_sound_admin_token_is_accepted(token: str) -> None:
    settings = Settings(admin_token=SecretStr(token))
    assert settings.admin_token is not None
    assert settings.admin_token.get_secret_value() == token


def test_the_rule_never_quotes_the_token() -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(admin_token=SecretStr("abababababababababab"))
    assert "abab" not in str(caught.value)


# --- the data directory and the database files -----------------------------------------------


def _migrated(tmp_path: Path) -> Path:
    """A data directory with vault.db and retention.db, as a first start leaves it."""
    data = tmp_path / "data"
    result = _cli(["migrate"], _env(data), tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (data / "vault.db").exists()
    assert (data / "retention.db").exists()
    return data


def test_serve_tightens_a_loose_data_dir_and_databases_it_owns(tmp_path: Path) -> None:
    data = _migrated(tmp_path)
    data.chmod(0o755)
    (data / "vault.db").chmod(0o644)
    (data / "retention.db").chmod(0o660)
    wal = data / "vault.db-wal"
    wal.touch()
    wal.chmod(0o644)

    with _serving(_env(data), tmp_path, tmp_path / "serve.log") as events:
        # Tightened before anything was opened, while the server runs.
        assert _mode(data) == 0o700
        assert _mode(data / "vault.db") == 0o600
        assert _mode(data / "retention.db") == 0o600
        assert _mode(data / "kek.json") == 0o600
    tightened = {
        (e["file"], e["mode_was"], e["mode_now"])
        for e in events
        if e.get("event") == "permissions_tightened"
    }
    assert tightened == {
        (str(data), "755", "700"),
        (str(data / "vault.db"), "644", "600"),
        (str(data / "retention.db"), "660", "600"),
        (str(wal), "644", "600"),
    }
    assert all(e["level"] == "warning" for e in events if e.get("event") == "permissions_tightened")
    # Every file the server left behind is private too.
    for path in data.iterdir():
        assert _mode(path) & 0o077 == 0, path.name


def test_migrate_tightens_too(tmp_path: Path) -> None:
    data = _migrated(tmp_path)
    data.chmod(0o750)
    (data / "vault.db").chmod(0o604)
    result = _cli(["migrate"], _env(data), tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert _mode(data) == 0o700
    assert _mode(data / "vault.db") == 0o600
    assert "permissions_tightened" in result.stderr


needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="giving a file to another user needs root (CI runs as root)"
)


@needs_root
def test_serve_refuses_another_users_loose_data_dir(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    os.chown(data, OTHER_UID, -1)
    result = _cli(["serve"], _env(data), tmp_path)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "cannot start: the data directory" in result.stderr
    assert "belongs to another user" in result.stderr
    assert "Traceback" not in result.stderr
    assert _mode(data) == 0o755  # not ours to change
    assert list(data.iterdir()) == []  # no key file, no database


@needs_root
def test_serve_refuses_another_users_loose_database(tmp_path: Path) -> None:
    data = _migrated(tmp_path)
    (data / "vault.db").chmod(0o644)
    os.chown(data / "vault.db", OTHER_UID, -1)
    result = _cli(["serve"], _env(data), tmp_path)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "the SQLite database file" in result.stderr
    assert str(data / "vault.db") in result.stderr
    assert _mode(data / "vault.db") == 0o644


def test_serve_refuses_a_key_file_open_to_others(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with _serving(_env(data), tmp_path, tmp_path / "first.log"):
        pass
    key_file = data / "kek.json"
    key_file.chmod(0o644)
    material = json.loads(key_file.read_text())["versions"]["1"]
    result = _cli(["serve"], _env(data), tmp_path)
    assert result.returncode == 3, result.stderr[-2000:]
    assert "cannot start: the local key file" in result.stderr
    assert "rotate" in result.stderr  # says what to do about a possible copy
    assert "Traceback" not in result.stderr
    assert material not in result.stdout + result.stderr
    assert _mode(key_file) == 0o644  # refused, not quietly tightened


async def test_the_in_process_server_tightens_its_data_dir(
    server_settings: Settings, backend: str, tmp_path: Path
) -> None:
    """Both backends: the data directory (the key file's home) is checked whatever the
    database; the SQLite files only where they are ours."""
    data = server_settings.data_dir
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    async with run_server(server_settings):
        assert _mode(data) == 0o700
        for path in data.iterdir():
            assert _mode(path) & 0o077 == 0, path.name
    if backend == "sqlite":
        vault_db = tmp_path / "vault.db"  # the sqlite_url fixture's, outside data_dir
        vault_db.chmod(0o644)
        async with run_server(server_settings):
            assert _mode(vault_db) == 0o600
