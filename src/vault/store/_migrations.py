"""Versioned SQL migrations, read from package data ``migrations/<backend>/NNNN_name.sql``."""

from __future__ import annotations

import re
from importlib.resources import files
from typing import NamedTuple

_FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
BACKENDS = ("sqlite", "postgres")


class Migration(NamedTuple):
    version: int
    name: str
    sql: str


def load_migrations(backend: str) -> list[Migration]:
    """The backend's migrations, oldest first."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown storage backend {backend!r}")
    found: dict[int, Migration] = {}
    for entry in (files("vault.store") / "migrations" / backend).iterdir():
        match = _FILE_NAME.match(entry.name)
        if match is None:
            continue
        version = int(match.group(1))
        if version in found:
            # Two files claiming one version would apply in an arbitrary order.
            raise RuntimeError(f"duplicate {backend} migration version {version}")
        found[version] = Migration(version, match.group(2), entry.read_text(encoding="utf-8"))
    return [found[v] for v in sorted(found)]
