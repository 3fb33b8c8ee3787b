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
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from process_support import STARTUP_TIMEOUT, ServerProcess, cli_env, free_port, run_cli
from pydantic import SecretStr, ValidationError

from service.config import Settings
from service.server import run_server

OTHER_UID = 65534  # nobody
RULE = "printable ASCII characters without whitespace"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _env(data_dir: Path, **settings: str) -> dict[str, str]:
    defaults = {
        "sidecar_in_process": "false",
        "log_format": "json",
        "listen_address": f"127.0.0.1:{free_port()}",
    }
    return cli_env(data_dir, **(defaults | settings))


def _cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run the CLI to its end. A ``serve`` that starts instead of refusing never ends on
    its own: the timeout fails the test then."""
    return run_cli(args, env, cwd, timeout=STARTUP_TIMEOUT)


@contextlib.contextmanager
def _serving(env: dict[str, str], cwd: Path, log: Path) -> Iterator[list[dict[str, Any]]]:
    """``serve`` until health answers; yields its JSON log events once it stopped."""
    events: list[dict[str, Any]] = []
    server = ServerProcess(env, cwd, log)
    try:
        server.wait_serving().close()
        yield events
        assert server.terminate(timeout=STARTUP_TIMEOUT)[0] == 0, server.log_text()
    finally:
        server.close()
    events.extend(server.events())


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
