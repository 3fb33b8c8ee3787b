"""Regenerate the committed gRPC stubs from protos/ (``--check`` fails when they are stale)."""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT = ROOT / "src" / "privacyvault"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def generate(into: Path) -> None:
    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    # The mypy plugins live beside this interpreter, which need not be on PATH.
    bindir = Path(sys.executable).parent
    args = [
        "protoc",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"-I{PROTOS}",
        f"-I{include}",
        f"--python_out={into}",
        f"--grpc_python_out={into}",
        f"--mypy_out={into}",
        f"--mypy_grpc_out={into}",
        *sources,
    ]
    if protoc.main(args) != 0:
        sys.exit("protoc failed")
    for pkg in {p.parent for p in (into / "privacyvault").rglob("*_pb2.py")} | {
        into / "privacyvault"
    }:
        (pkg / "__init__.py").touch()


def generated_files(root: Path) -> set[Path]:
    return {
        p.relative_to(root)
        for p in root.rglob("*")
        if p.name.endswith(GENERATED_SUFFIXES) or p.name in ("__init__.py", "py.typed")
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if committed stubs are stale")
    check = parser.parse_args().check
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh = Path(tmp) / "privacyvault"
        (fresh / "py.typed").touch()
        if check:
            want, have = generated_files(fresh), generated_files(OUT) if OUT.exists() else set()
            stale = sorted(str(p) for p in want ^ have)
            stale += sorted(
                str(p) for p in want & have if not filecmp.cmp(fresh / p, OUT / p, shallow=False)
            )
            if stale:
                sys.exit("stale generated stubs, run scripts/gen_protos.py: " + ", ".join(stale))
            print("generated stubs are up to date")
            return
        for p in generated_files(OUT) if OUT.exists() else set():
            (OUT / p).unlink()
        shutil.copytree(fresh, OUT, dirs_exist_ok=True)
        print(f"regenerated {len(generated_files(OUT))} files under {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
