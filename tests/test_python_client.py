"""The client-only distribution (``clients/python``: ``privacy-vault-client``) and the
.proto files in both wheels.

The client wheel is built from this repository's own files (hatchling
``force-include`` of src/privacyvault and protos/), installed with its dependencies
into a fresh venv (pip, from the configured index), and from there
``clients/python/example.py`` signs up, reads and decodes an INVALID_ARGUMENT's
BadRequest against the real server in a subprocess. That venv has neither the
server's packages (``service``, ``vault``) nor its dependencies. The wheels and the
venv are made once per session (about 30 s).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass
from email.parser import Parser
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from process_support import free_port, serving

from privacyvault import errors
from privacyvault.v1 import member_pb2 as pb
from privacyvault.v1 import member_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
CLIENT = ROOT / "clients" / "python"
PROTOS = sorted(p.name for p in (ROOT / "protos" / "privacyvault" / "v1").glob("*.proto"))
# What a client must not get: the server's packages and the dependencies only it needs.
SERVER_ONLY = ("service", "vault", "asyncpg", "cryptography", "pkcs11", "argon2", "pydantic")
CLIENT_DEPENDENCIES = {"grpcio", "protobuf", "googleapis-common-protos", "grpcio-status"}


def _run(args: list[str | Path], cwd: Path, timeout: float = 300) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    result = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, f"{args}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _wheel(source: Path, into: Path) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", into, source], into)
    (built,) = into.glob("*.whl")
    return built


@dataclass(frozen=True)
class ClientVenv:
    wheel: Path
    python: Path
    workdir: Path


@pytest.fixture(scope="session")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> ClientVenv:
    """The client wheel, and a fresh venv with it and its dependencies installed."""
    work = tmp_path_factory.mktemp("python-client")
    wheel = _wheel(CLIENT, work / "wheel")
    _run([sys.executable, "-m", "venv", work / "venv"], work)
    python = work / "venv" / "bin" / "python"
    _run([python, "-m", "pip", "install", "--quiet", wheel], work)
    return ClientVenv(wheel, python, work)


def test_client_wheel_holds_the_stubs_their_typing_and_the_protos(
    client_venv: ClientVenv,
) -> None:
    with zipfile.ZipFile(client_venv.wheel) as wheel:
        names = wheel.namelist()
        metadata = Parser().parsestr(
            wheel.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        )
        packaged = {n: wheel.read(n) for n in names if n.startswith("privacyvault/")}
    assert {n.split("/")[0] for n in names} == {"privacyvault", _dist_info(client_venv.wheel)}
    # The very files of the repository: the stubs, .pyi, py.typed, the errors helper...
    src = ROOT / "src"
    tracked = {
        str(p.relative_to(src))
        for p in (src / "privacyvault").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    protos = {f"privacyvault/v1/{name}" for name in PROTOS}
    assert set(packaged) == tracked | protos
    for name, content in packaged.items():
        origin = ROOT / "protos" / name if name in protos else src / name
        assert content == origin.read_bytes(), name
    assert {"privacyvault/py.typed", "privacyvault/v1/member_pb2.pyi"} <= set(packaged)
    assert {_name(r) for r in metadata.get_all("Requires-Dist")} == CLIENT_DEPENDENCIES


def _dist_info(wheel: Path) -> str:
    name, version = wheel.name.split("-")[:2]
    return f"{name}-{version}.dist-info"


def test_client_venv_has_nothing_of_the_server(client_venv: ClientVenv) -> None:
    probe = (
        "import importlib.util, json, sys; "
        f"print(json.dumps([n for n in {list(SERVER_ONLY)!r} if importlib.util.find_spec(n)]))"
    )
    found = json.loads(_run([client_venv.python, "-c", probe], client_venv.workdir))
    assert found == []
    # And the client's own modules import there, standalone.
    imports = (
        "import privacyvault.errors, privacyvault.v1.member_pb2_grpc, "
        "privacyvault.v1.key_admin_pb2_grpc; print(privacyvault.errors.__file__)"
    )
    where = Path(_run([client_venv.python, "-c", imports], client_venv.workdir).strip())
    assert ROOT not in where.parents


def test_client_calls_the_real_server_and_decodes_bad_request(
    client_venv: ClientVenv, tmp_path: Path
) -> None:
    with serving(tmp_path, tmp_path / "data", "server") as (server, _):
        out = _run(
            [client_venv.python, CLIENT / "example.py", server.target], client_venv.workdir, 60
        )
    seen = json.loads(out)
    assert seen["member_id"]
    login_id = seen["login_id"]
    assert seen["read"] == {"login_id": login_id, "email": f"{login_id}@example.com"}
    invalid = seen["invalid"]
    assert invalid["code"] == "INVALID_ARGUMENT"
    assert invalid["status_code"] == 3
    assert (invalid["reason"], invalid["domain"]) == ("INVALID_ARGUMENT", "privacyvault.v1")
    assert set(invalid["field_violations"]) == {"email", "birth_date"}
    assert all(invalid["field_violations"].values())
    assert "not-an-address" not in json.dumps(invalid)  # no submitted value echoed
    # importlib.resources finds the .proto files in the installed client.
    assert seen["protos"] == PROTOS


def test_server_wheel_ships_the_protos_beside_their_stubs(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    wheel = _wheel(ROOT, tmp_path_factory.mktemp("server-wheel"))
    with zipfile.ZipFile(wheel) as built:
        for name in PROTOS:
            packaged = built.read(f"privacyvault/v1/{name}")
            assert packaged == (ROOT / "protos" / "privacyvault" / "v1" / name).read_bytes()


def test_client_declares_the_server_floors_and_version() -> None:
    """The stubs are the server's: the client needs the same grpcio/protobuf floors
    (tests/test_dependency_floors.py checks the server's against the stubs)."""
    server = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    client = tomllib.loads((CLIENT / "pyproject.toml").read_text())["project"]
    assert client["version"] == server["version"]
    server_deps = {_name(d): d for d in server["dependencies"]}
    for dependency in client["dependencies"]:
        assert server_deps[_name(dependency)] == dependency


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", requirement, maxsplit=1)[0].lower()


async def test_errors_helper_finds_details_and_none_without_a_status() -> None:
    """``privacyvault.errors`` on the channel's own error (no server answered: no
    Status) and on a Status already decoded."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{free_port()}") as channel:
        members = member_pb2_grpc.MemberServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await members.SignUp(pb.SignUpRequest(), timeout=2)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert errors.rich_status(caught.value) is None
    assert errors.error_detail(caught.value, error_details_pb2.ErrorInfo) is None
    status = status_pb2.Status(code=3, message="invalid")
    status.details.add().Pack(error_details_pb2.ErrorInfo(reason="INVALID_ARGUMENT"))
    assert errors.error_detail(status, error_details_pb2.BadRequest) is None
    info = errors.error_detail(status, error_details_pb2.ErrorInfo)
    assert info is not None
    assert info.reason == "INVALID_ARGUMENT"
