"""The caller policies and TLS material the deployment files mount, against the server.

Production needs mTLS, a client CA and a caller policy (issue 10), so compose and the
kustomize base mount a policy: ``docker/k8s/callers.toml`` (the example the
kustomization turns into a ConfigMap) and the development ``docker/callers.toml``
that ``docker/make-dev-secrets.sh`` writes for compose. Both must pass the server's own
policy parser, name real methods and the purposes GetMember needs. Then the compose
material runs a production server here (SQLite instead of PostgreSQL, loopback ports
instead of the containers'), with compose's own settings: the development client
makes the calls its policy entry allows (its own rights with the member's session),
is refused the others, and ``privacy-vault health`` says SERVING over mTLS and on the
plaintext health listener, neither of which the policy governs.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_support import CLIENT_IP, SESSION_KEY, embedded_settings, error_info
from process_support import cli_env, free_port, run_cli

from privacyvault.v1 import member_pb2 as pb
from privacyvault.v1 import member_pb2_grpc
from service.caller_policy import CallerPolicy, parse_policy
from service.callers import policy_methods
from service.server import POLICY_SERVICES, RunningServer, run_server

DOCKER = Path(__file__).resolve().parent.parent / "docker"
METHODS = policy_methods(POLICY_SERVICES)
PORTAL = "spiffe://example.org/ns/web/sa/member-portal"
DEV_CLIENT = "spiffe://example.org/ns/dev/sa/client"
#: What a member-facing application calls: everything of MemberService but
#: RecordAccess (a calling service's own record of a read), the consents, and the
#: member's disclosure ledger.
MEMBER_FACING = {m for m in METHODS if m.startswith(("MemberService/", "ConsentService/"))} - {
    "MemberService/RecordAccess"
} | {"DisclosureService/ListDisclosures"}


def _policy(path: Path) -> CallerPolicy:
    return parse_policy(path.read_text(encoding="utf-8"), METHODS)


def test_the_kubernetes_example_policy_is_valid_and_serves_a_member_facing_app() -> None:
    policy = _policy(DOCKER / "k8s" / "callers.toml")
    portal = policy.rule_for(PORTAL)
    assert portal is not None
    assert portal.methods == MEMBER_FACING, "the portal needs every member-facing RPC"
    assert policy.allows(PORTAL, "MemberService/EndSession")
    assert policy.allows(PORTAL, "MemberService/GetMember", "MEMBER_REQUEST")
    assert policy.allows(PORTAL, "MemberService/GetMember", "IDENTIFICATION")
    assert not policy.allows(PORTAL, "MemberService/GetMember", "INQUIRY")
    assert not policy.allows(PORTAL, "MemberService/RecordAccess")
    assert not any(m.startswith("KeyAdminService/") for m in portal.methods)
    assert not policy.allows(PORTAL, "DisclosureService/Disclose", "INQUIRY")


@dataclass(frozen=True)
class DevMaterial:
    """What docker/make-dev-secrets.sh wrote, by the paths compose mounts it from."""

    root: Path  # the copy of docker/

    def path(self, relative: str) -> Path:
        return self.root / relative.removeprefix("./")


@pytest.fixture(scope="module")
def dev_material(tmp_path_factory: pytest.TempPathFactory) -> DevMaterial:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: docker/make-dev-secrets.sh needs it")
    root = tmp_path_factory.mktemp("compose") / "docker"
    (root / "k8s").mkdir(parents=True)
    shutil.copy2(DOCKER / "make-dev-secrets.sh", root)
    shutil.copy2(DOCKER / "k8s" / "callers.toml", root / "k8s")
    made = subprocess.run(
        ["bash", str(root / "make-dev-secrets.sh")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert made.returncode == 0, made.stderr
    return DevMaterial(root)


def test_the_compose_development_policy_is_valid(dev_material: DevMaterial) -> None:
    policy = _policy(dev_material.path("callers.toml"))
    assert policy.rule_for(PORTAL) is not None  # the example's entries come along
    for method in ("SignUp", "Authenticate", "GetMember", "EndSession"):
        assert policy.allows(DEV_CLIENT, f"MemberService/{method}")
    assert policy.allows(DEV_CLIENT, "MemberService/GetMember", "MEMBER_REQUEST")
    assert not policy.allows(DEV_CLIENT, "MemberService/UpdateMember")


def _compose_settings(material: DevMaterial) -> dict[str, str]:
    """compose.yaml's x-vault-environment with the files it mounts (secrets under
    /run/secrets, configs at their targets) replaced by the files make-dev-secrets.sh
    wrote; without the database URL (SQLite here) and with loopback ports."""
    yaml = pytest.importorskip("yaml")
    compose: dict[str, Any] = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    mounted = {
        f"/run/secrets/{name}": material.path(spec["file"])
        for name, spec in compose["secrets"].items()
    }
    vault = compose["x-vault"]
    for config in vault["configs"]:
        mounted[config["target"]] = material.path(compose["configs"][config["source"]]["file"])
    settings: dict[str, str] = {}
    for name, value in compose["x-vault-environment"].items():
        key = name.removeprefix("PRIVACY_VAULT_").lower()
        if key == "database_url_file":
            continue  # PostgreSQL in compose; SQLite here
        settings[key] = str(mounted.get(value, value))
    for key in ("tls_cert_file", "tls_key_file", "tls_client_ca_file", "caller_policy_file"):
        assert Path(settings[key]).is_file(), f"compose mounts no file for {key}"
    assert settings["environment"] == "production"
    return settings


@dataclass(frozen=True)
class ComposeServer:
    running: RunningServer
    settings: dict[str, str]  # as the containers have them (health_listen_address: here)
    material: DevMaterial

    def client_credentials(self) -> grpc.ChannelCredentials:
        tls = self.material.path("tls")
        return grpc.ssl_channel_credentials(
            (tls / "ca.crt").read_bytes(),
            (tls / "client.key").read_bytes(),
            (tls / "client.crt").read_bytes(),
        )


@pytest.fixture
async def compose_server(dev_material: DevMaterial, tmp_path: Path) -> AsyncIterator[ComposeServer]:
    settings = _compose_settings(dev_material)
    settings["health_listen_address"] = f"127.0.0.1:{free_port()}"
    file_settings = {k: v for k, v in settings.items() if k != "sidecar_in_process"}
    server_settings = embedded_settings(tmp_path / "data", **file_settings)
    async with run_server(server_settings) as running:
        yield ComposeServer(running, settings, dev_material)


async def _health(server: ComposeServer, tmp_path: Path, *args: str) -> str:
    settings = server.settings | {"listen_address": server.running.target}
    env = cli_env(tmp_path / "probe", **settings)
    result = await asyncio.to_thread(run_cli, ["health", *args], env, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.strip()


async def test_compose_material_serves_the_dev_client_and_health(
    compose_server: ComposeServer, tmp_path: Path
) -> None:
    server = compose_server
    target = server.running.target
    async with grpc.aio.secure_channel(target, server.client_credentials()) as channel:
        members = member_pb2_grpc.MemberServiceStub(channel)
        request = pb.SignUpRequest(
            login_id="compose01",
            password="a long passphrase 1",
            name="Compose Member",
            email="compose01@example.com",
            birth_date="1990-04-01",
        )
        member_id = (await members.SignUp(request)).member_id
        auth = await members.Authenticate(
            pb.AuthenticateRequest(login_id="compose01", password="a long passphrase 1"),
            metadata=CLIENT_IP,
        )
        assert auth.member_id == member_id
        session = ((SESSION_KEY, auth.session_token),)
        # A calling service's read: no member session needed.
        read = await members.GetMember(
            pb.GetMemberRequest(member_id=member_id, purpose=pb.PURPOSE_IDENTIFICATION)
        )
        assert read.member.name == "Compose Member"
        # The member's own request: their session.
        own = await members.GetMember(
            pb.GetMemberRequest(member_id=member_id, purpose=pb.PURPOSE_MEMBER_REQUEST),
            metadata=session,
        )
        assert own.member.email == "compose01@example.com"
        await members.EndSession(pb.EndSessionRequest(member_id=member_id), metadata=session)
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await members.GetMember(
                pb.GetMemberRequest(member_id=member_id, purpose=pb.PURPOSE_MEMBER_REQUEST),
                metadata=session,
            )
        assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert error_info(ended.value).reason == "MEMBER_SESSION_REQUIRED"
        # Not in the development client's entry.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await members.GetMember(
                pb.GetMemberRequest(member_id=member_id, purpose=pb.PURPOSE_INQUIRY)
            )
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error_info(refused.value).reason == "CALLER_NOT_ALLOWED"

    # compose's health check: the plaintext health listener.
    listener = server.settings["health_listen_address"]
    assert await _health(server, tmp_path) == f"SERVING {listener}"
    # Over mTLS to the API port, presenting the server's own pair: its SPIFFE ID is
    # in no policy entry, and health is not under the policy.
    assert await _health(server, tmp_path, "--address", target) == f"SERVING {target}"
    named = await _health(
        server, tmp_path, "--address", target, "--service", "privacyvault.v1.MemberService"
    )
    assert named.startswith("SERVING ")
