"""The Node client (``clients/node``) against the real server: ``node --test`` runs
``clients/node/test/client.test.js`` (sign-up, authenticate, reads for two purposes,
an invalid request's BadRequest field violations, withdrawal) against ``serve`` in a
subprocess on a free loopback port: embedded (plaintext, the caller ``local``), and in
production with mTLS, the Node client presenting a certificate with its SPIFFE ID
and a caller policy that grants it three purposes (a fourth is refused).

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
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from process_support import serving
from tls_support import TestPki

NODE_CLIENT = Path(__file__).resolve().parent.parent / "clients" / "node"
REQUIRE_NODE = os.environ.get("PRIVACY_VAULT_REQUIRE_NODE") == "1"
#: Every skip reason of this module starts with this; the terminal summary says so.
NODE_SKIP_REASON = "node client test unavailable"
STAMP = NODE_CLIENT / "node_modules" / ".privacy-vault-lock.sha256"
NODE_CALLER = "spiffe://example.org/ns/web/sa/node-portal"
POLICY = f"""trust_domain = "example.org"

[[caller]]
identity = "{NODE_CALLER}"
methods  = ["MemberService/SignUp", "MemberService/Authenticate",
            "MemberService/GetMember", "MemberService/Withdraw"]
purposes = ["IDENTIFICATION", "INQUIRY", "MEMBER_REQUEST"]
"""


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


@dataclass(frozen=True)
class Transport:
    """How the server runs (CLI settings), how the health probe reaches it, and what the
    Node test connects with (its environment)."""

    settings: dict[str, str] = field(default_factory=dict)
    probe: grpc.ChannelCredentials | None = None
    node_env: dict[str, str] = field(default_factory=dict)


def _mtls(tmp_path: Path) -> Transport:
    """Production (mTLS, POLICY); the Node test gets the CA, and NODE_CALLER's
    certificate and key, as files."""
    pki = TestPki.create(tmp_path / "pki")
    policy = tmp_path / "callers.toml"
    policy.write_text(POLICY)
    client = pki.client(NODE_CALLER)
    (tmp_path / "node.pem").write_bytes(client.cert)
    (tmp_path / "node-key.pem").write_bytes(client.key)
    files = {
        "PRIVACY_VAULT_CLIENT_TLS_CA": str(pki.ca_cert),
        "PRIVACY_VAULT_CLIENT_TLS_CERT": str(tmp_path / "node.pem"),
        "PRIVACY_VAULT_CLIENT_TLS_KEY": str(tmp_path / "node-key.pem"),
    }
    return Transport(pki.production_settings(policy), pki.credentials(client), files)


@pytest.mark.parametrize("mode", ["embedded", "mtls"])
def test_node_client_against_the_real_server(node: str, tmp_path: Path, mode: str) -> None:
    transport = _mtls(tmp_path) if mode == "mtls" else Transport()
    with serving(tmp_path, tmp_path / "data", "server", transport.probe, **transport.settings) as (
        server,
        _,
    ):
        env = dict(os.environ) | transport.node_env | {"PRIVACY_VAULT_ADDRESS": server.target}
        result = _run([node, "--test", "test/client.test.js"], env, 120)
    output = f"{result.stdout}\n{result.stderr}"
    assert result.returncode == 0, f"node --test:\n{output}\nthe server's log:\n{server.log_text()}"
    # TAP's summary: the tests ran (not zero of them), none failed, and only the
    # policy's test is skipped without mTLS.
    counts = dict(re.findall(r"^# (pass|fail|skipped) (\d+)$", result.stdout, re.MULTILINE))
    assert counts == {
        "pass": "8" if mode == "mtls" else "7",
        "fail": "0",
        "skipped": "0" if mode == "mtls" else "1",
    }, output
