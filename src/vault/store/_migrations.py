"""Versioned SQL migrations, read from package data: the vault's in
``migrations/<backend>/NNNN_name.sql``, the retention store's (a database of its
own) in ``migrations/retention/<backend>/``."""

from __future__ import annotations

import re
from importlib.resources import files
from typing import NamedTuple

_FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
BACKENDS = ("sqlite", "postgres")
SCHEMAS = ("vault", "retention")


class Migration(NamedTuple):
    version: int
    name: str
    sql: str


def load_migrations(backend: str, schema: str = "vault") -> list[Migration]:
    """The backend's migrations for the vault or the retention store, oldest first."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown storage backend {backend!r}")
    if schema not in SCHEMAS:
        raise ValueError(f"unknown schema {schema!r}")
    root = files("vault.store") / "migrations"
    if schema == "retention":
        root = root / "retention"
    found: dict[int, Migration] = {}
    for entry in (root / backend).iterdir():
        match = _FILE_NAME.match(entry.name)
        if match is None:
            continue
        version = int(match.group(1))
        if version in found:
            # Two files claiming one version would apply in an arbitrary order.
            raise RuntimeError(f"duplicate {backend} migration version {version}")
        found[version] = Migration(version, match.group(2), entry.read_text(encoding="utf-8"))
    return [found[v] for v in sorted(found)]
