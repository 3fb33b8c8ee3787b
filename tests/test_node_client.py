"""The Node client (``clients/node``) against the real server: ``node --test`` runs
``clients/node/test/client.test.js`` (sign-up, authenticate, reads for two purposes,
an invalid request's BadRequest field violations, withdrawal) against ``serve`` in a
subprocess on a free loopback port.

``npm ci`` installs the locked packages into ``clients/node/node_modules`` (ignored
by git) once per package-lock.json: a stamp beside them holds the lockfile's hash.
Without node or npm the test is skipped loudly, or fails when
``PRIVACY_VAULT_REQUIRE_NODE=1`` (set in CI, which installs them).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from process_support import serving

NODE_CLIENT = Path(__file__).resolve().parent.parent / "clients" / "node"
REQUIRE_NODE = os.environ.get("PRIVACY_VAULT_REQUIRE_NODE") == "1"
#: Every skip reason of this module starts with this; the terminal summary says so.
NODE_SKIP_REASON = "node client test unavailable"
STAMP = NODE_CLIENT / "node_modules" / ".privacy-vault-lock.sha256"


def _unavailable(reason: str) -> None:
    reason = f"{NODE_SKIP_REASON}: {reason}"
    if REQUIRE_NODE:
        pytest.fail(f"{reason}, and PRIVACY_VAULT_REQUIRE_NODE=1", pytrace=False)
    pytest.skip(reason)


def _run(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args,
        cwd=NODE_CLIENT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="session")
def node() -> str:
    """node, with the locked packages installed (``npm ci`` when the lockfile changed)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        _unavailable("node or npm is not installed (apt-get install nodejs npm)")
    assert node is not None
    assert npm is not None
    lock = hashlib.sha256((NODE_CLIENT / "package-lock.json").read_bytes()).hexdigest()
    if not STAMP.exists() or STAMP.read_text() != lock:
        installed = _run(
            [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund"], dict(os.environ), 600
        )
        assert installed.returncode == 0, f"npm ci:\n{installed.stdout}\n{installed.stderr}"
        STAMP.write_text(lock)
    return node


def test_node_client_against_the_real_server(node: str, tmp_path: Path) -> None:
    with serving(tmp_path, tmp_path / "data", "server") as (server, _):
        env = dict(os.environ) | {"PRIVACY_VAULT_ADDRESS": server.target}
        result = _run([node, "--test", "test/client.test.js"], env, 120)
    output = f"{result.stdout}\n{result.stderr}"
    assert result.returncode == 0, f"node --test:\n{output}\nthe server's log:\n{server.log_text()}"
    # TAP's summary: the tests ran (not zero of them) and none failed.
    passed = re.search(r"^# pass (\d+)$", result.stdout, re.MULTILINE)
    assert passed is not None, output
    assert int(passed.group(1)) >= 7, output
    assert re.search(r"^# fail 0$", result.stdout, re.MULTILINE), output
