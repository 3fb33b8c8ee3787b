"""The one build step pyproject.toml cannot declare: the API's .proto files, which live in
protos/ (the design's layout, and buf's module), ship in the wheel beside their stubs
(privacyvault/v1/*.proto), where ``importlib.resources`` and ``protoc -I <site-packages>``
find them, as googleapis-common-protos ships google/rpc/*.proto."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PROTOS = Path(__file__).resolve().parent / "protos"


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        super().run()
        protos = sorted(PROTOS.rglob("*.proto"))
        if not protos:  # an sdist without them (MANIFEST.in) would build a wheel without them
            raise SystemExit(f"no .proto files under {PROTOS}")
        for proto in protos:
            target = Path(self.build_lib) / proto.relative_to(PROTOS)
            self.mkpath(str(target.parent))
            self.copy_file(str(proto), str(target))


setup(cmdclass={"build_py": BuildPyWithProtos})
