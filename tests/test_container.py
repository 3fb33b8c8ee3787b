"""The image as deployed: ``docker/Dockerfile`` built by ``scripts/container_build.sh``
and run by podman read-only, as uid 10001, without capabilities, with only a data
volume writable (not even /tmp), on host networking at a free loopback port. The
image's own health check says SERVING, SignUp, Authenticate, GetMember (a calling
service's read, and the member's own with the session) and EndSession work over gRPC
from outside, its metrics endpoint counts them without personal data, and SIGTERM
stops it with exit code 0.

Without podman or without the image (``PRIVACY_VAULT_IMAGE``, default
``localhost/privacy-vault:ci``) the test is skipped loudly, or fails when
``PRIVACY_VAULT_REQUIRE_CONTAINER=1`` (set in CI, which builds the image first).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_support import CLIENT_IP
from process_support import free_port

from privacyvault.v1 import member_pb2 as pb
from privacyvault.v1 import member_pb2_grpc

IMAGE = os.environ.get("PRIVACY_VAULT_IMAGE", "localhost/privacy-vault:ci")
REQUIRE_CONTAINER = os.environ.get("PRIVACY_VAULT_REQUIRE_CONTAINER") == "1"
# runc, permitted ulimits, no systemd: what podman needs on these machines.
CONTAINERS_CONF = Path(__file__).resolve().parent.parent / "scripts" / "containers.conf"
STARTUP_TIMEOUT = 90.0
UID = "10001"


def _unavailable(reason: str) -> None:
    reason = f"container test unavailable: {reason}"
    if REQUIRE_CONTAINER:
        pytest.fail(f"{reason}, and PRIVACY_VAULT_REQUIRE_CONTAINER=1", pytrace=False)
    pytest.skip(reason)


@dataclass(frozen=True)
class Podman:
    binary: str
    env: dict[str, str]

    def run(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.binary, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def ok(self, *args: str, timeout: float = 60.0) -> str:
        result = self.run(*args, timeout=timeout)
        assert result.returncode == 0, f"podman {args[0]}: {result.stderr.strip()}"
        return result.stdout


@pytest.fixture(scope="module")
def podman() -> Podman:
    binary = shutil.which("podman")
    if binary is None:
        _unavailable("podman is not installed (apt-get install podman runc)")
    assert binary is not None
    env = dict(os.environ)
    env.setdefault("CONTAINERS_CONF", str(CONTAINERS_CONF))
    tool = Podman(binary, env)
    if tool.run("image", "exists", IMAGE).returncode != 0:
        _unavailable(f"the image {IMAGE} is not built (scripts/container_build.sh)")
    return tool


@dataclass(frozen=True)
class Container:
    name: str
    target: str
    metrics: str


@pytest.fixture
def container(podman: Podman) -> Iterator[Container]:
    name = f"pv-test-{secrets.token_hex(4)}"
    volume = f"{name}-data"
    port, metrics_port = free_port(), free_port()
    podman.ok("volume", "create", volume)
    try:
        podman.ok(
            "run",
            "--detach",
            "--name",
            name,
            "--read-only",
            "--read-only-tmpfs=false",  # nothing but the data volume is writable
            "--user",
            f"{UID}:{UID}",
            "--cap-drop",
            "ALL",
            "--security-opt",
            "no-new-privileges",
            "--network",
            "host",
            "--cpus",  # a CPU quota (the cgroup's), as a Kubernetes CPU limit sets
            "1",
            "--volume",
            f"{volume}:/var/lib/privacy-vault",
            "--env",
            f"PRIVACY_VAULT_LISTEN_ADDRESS=127.0.0.1:{port}",
            "--env",
            "PRIVACY_VAULT_ARGON2_TIME_COST=1",
            "--env",
            "PRIVACY_VAULT_ARGON2_MEMORY_COST=8",
            "--env",
            "PRIVACY_VAULT_SHUTDOWN_GRACE_SECONDS=2",
            "--env",
            f"PRIVACY_VAULT_METRICS_ADDRESS=127.0.0.1:{metrics_port}",
            IMAGE,
            "serve",
        )
        yield Container(name, f"127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics")
    finally:
        podman.run("rm", "--force", "--time", "0", name)
        podman.run("volume", "rm", "--force", volume)


def wait_serving(podman: Podman, container: Container) -> None:
    """Until ``privacy-vault health`` inside the container exits 0."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        state = podman.ok("inspect", "--format", "{{.State.Running}}", container.name).strip()
        if state != "true":
            logs = podman.run("logs", container.name).stderr
            pytest.fail(f"the container exited:\n{logs}")
        check = podman.run("exec", container.name, "privacy-vault", "health", timeout=30)
        if check.returncode == 0:
            assert check.stdout.strip() == f"SERVING {container.target}"
            return
        if time.monotonic() > deadline:
            logs = podman.run("logs", container.name).stderr
            pytest.fail(f"not SERVING after {STARTUP_TIMEOUT} s: {check.stdout}\n{logs}")
        time.sleep(0.5)


def test_image_serves_read_only_as_non_root_and_stops_on_sigterm(
    podman: Podman, container: Container
) -> None:
    wait_serving(podman, container)
    # The image's HEALTHCHECK itself, and who the process runs as.
    assert podman.run("healthcheck", "run", container.name, timeout=30).returncode == 0
    assert podman.ok("exec", container.name, "id", "-u").strip() == UID

    with grpc.insecure_channel(container.target) as channel:
        members = member_pb2_grpc.MemberServiceStub(channel)
        signed_up = members.SignUp(
            pb.SignUpRequest(
                login_id="container01",
                password="a long passphrase 1",
                name="Container Member",
                email="container01@example.com",
                birth_date="1990-04-01",
            ),
            timeout=20,
        )
        authenticated = members.Authenticate(
            pb.AuthenticateRequest(login_id="container01", password="a long passphrase 1"),
            metadata=CLIENT_IP,
            timeout=20,
        )
        assert authenticated.member_id == signed_up.member_id
        reply = members.GetMember(
            pb.GetMemberRequest(member_id=signed_up.member_id, purpose=pb.PURPOSE_IDENTIFICATION),
            timeout=20,
        )
        assert reply.member.name == "Container Member"
        # The member's own rights carry the session Authenticate returned (issue 10).
        session = (("x-member-session", authenticated.session_token),)
        own = members.GetMember(
            pb.GetMemberRequest(member_id=signed_up.member_id, purpose=pb.PURPOSE_MEMBER_REQUEST),
            metadata=session,
            timeout=20,
        )
        assert own.member.email == "container01@example.com"
        members.EndSession(
            pb.EndSessionRequest(member_id=signed_up.member_id), metadata=session, timeout=20
        )

    # Its metrics endpoint counted the calls, and shows nothing of the member (issue 11).
    with urllib.request.urlopen(container.metrics, timeout=20) as page:
        metrics = page.read().decode()
    assert (
        'grpc_server_handled_total{grpc_code="OK",grpc_method="SignUp",'
        'grpc_service="privacyvault.v1.MemberService",grpc_type="unary"} 1.0'
    ) in metrics
    assert "privacy_vault_sign_ups_total 1.0" in metrics
    for personal in ("container01", "Container Member", signed_up.member_id, "203.0.113.7"):
        assert personal not in metrics
    # The otel extra is in the image: tracing is a setting away.
    podman.ok("exec", container.name, "python", "-c", "import opentelemetry.sdk.trace")

    # `podman stop` sends the image's STOPSIGNAL (SIGTERM) and waits; no SIGKILL needed.
    started = time.monotonic()
    podman.ok("stop", "--time", "30", container.name, timeout=60)
    took = time.monotonic() - started
    state = json.loads(podman.ok("inspect", "--format", "{{json .State}}", container.name))
    logs = podman.run("logs", container.name)
    assert state["ExitCode"] == 0, logs.stdout + logs.stderr
    assert took < 30, "stopped by SIGKILL after the timeout, not by SIGTERM"
    lines = [
        json.loads(line)
        for line in (logs.stdout + logs.stderr).splitlines()
        if line.startswith("{")
    ]
    events = [line["event"] for line in lines]
    assert events.index("shutdown_requested") < events.index("server_stopped")
    # One password thread for the one CPU of its quota, whatever the host has.
    (started_line,) = [line for line in lines if line["event"] == "server_started"]
    assert started_line["password_workers"] == 1
