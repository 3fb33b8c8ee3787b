"""The declared dependency floors accept the committed stubs (issue 8, item 14).

The generated ``*_pb2.py`` check the protobuf runtime they were generated for, and
the ``*_pb2_grpc.py`` the grpcio version: a floor below those lets ``pip`` install a
runtime that the stubs then refuse at import. The proof with the real lowest
versions installed is ``scripts/check_floors.py`` (run by ``.ci/run``); this is the
fast check that fails the moment the stubs are regenerated past a floor.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import privacyvault.v1

ROOT = Path(__file__).resolve().parent.parent
STUBS = Path(privacyvault.v1.__file__).parent


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("."))


def _specifiers() -> dict[str, str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    out = {}
    for dep in deps:
        match = re.match(r"^([A-Za-z0-9._-]+)\s*(.*)$", dep)
        assert match is not None, dep
        out[match.group(1).lower()] = match.group(2)
    return out


def _floor(specifier: str) -> tuple[int, ...]:
    match = re.search(r">=\s*([0-9.]+)", specifier)
    assert match is not None, f"no floor in {specifier!r}"
    return _version(match.group(1))


def _cap(specifier: str) -> tuple[int, ...]:
    match = re.search(r"<\s*([0-9.]+)", specifier)
    assert match is not None, f"no upper bound in {specifier!r}"
    return _version(match.group(1))


def test_protobuf_floor_accepts_every_committed_pb2_stub() -> None:
    protobuf = _specifiers()["protobuf"]
    stubs = sorted(STUBS.glob("*_pb2.py"))
    assert stubs
    for stub in stubs:
        found = re.search(
            r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,"
            r"\s*(\d+),\s*(\d+),\s*(\d+),",
            stub.read_text(),
        )
        assert found is not None, stub.name
        generated = tuple(int(g) for g in found.groups())
        # The runtime must be at least the gencode version, in the same major.
        assert _floor(protobuf) >= generated, (stub.name, protobuf, generated)
        assert _cap(protobuf) <= (generated[0] + 1,), (stub.name, protobuf, generated)


def test_grpcio_floor_accepts_every_committed_grpc_stub() -> None:
    grpcio = _specifiers()["grpcio"]
    stubs = sorted(STUBS.glob("*_pb2_grpc.py"))
    assert stubs
    for stub in stubs:
        found = re.search(r"GRPC_GENERATED_VERSION = '([0-9.]+)'", stub.read_text())
        assert found is not None, stub.name
        assert _floor(grpcio) >= _version(found.group(1)), (stub.name, grpcio, found.group(1))


def test_ci_proves_the_floors_with_the_lowest_versions_installed() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert "scripts/check_floors.py" in ci
    script = (ROOT / "scripts" / "check_floors.py").read_text()
    assert '"--resolution", "lowest-direct"' in script


def test_the_floor_checks_test_modules_exist() -> None:
    """The floor check runs named test modules; one moved away (as the store contract
    did when it was split by domain) must fail here, not only in CI's floor step."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_floors", ROOT / "scripts/check_floors.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    missing = [name for name in module.FLOOR_TESTS if not (ROOT / name).is_file()]
    assert module.FLOOR_TESTS
    assert missing == []
