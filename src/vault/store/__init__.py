"""Storage backends for the vault, chosen by database URL.

``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db`` for the
embedded default; ``postgresql://...`` (or ``postgres://...``) for production.
:func:`open_store` connects but does not migrate: call ``await store.migrate()``.
"""

from __future__ import annotations

import re

from vault.store.base import (
    ENCRYPTED_FIELDS,
    INDEXED_FIELDS,
    AccessEntryRow,
    ConsentRow,
    DestructionRecord,
    IndexedField,
    IndexKeyRow,
    KekState,
    KekVersionRow,
    MemberKeyRow,
    MemberRow,
    NewAccessEntry,
    RetentionStore,
    Store,
)

__all__ = [
    "ENCRYPTED_FIELDS",
    "INDEXED_FIELDS",
    "AccessEntryRow",
    "ConsentRow",
    "DestructionRecord",
    "IndexKeyRow",
    "IndexedField",
    "KekState",
    "KekVersionRow",
    "MemberKeyRow",
    "MemberRow",
    "NewAccessEntry",
    "RetentionStore",
    "Store",
    "open_retention_store",
    "open_store",
]

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):(?=//)")


def database_backend(url: str) -> tuple[str, str]:
    """("sqlite", file path) or ("postgres", url) for a database URL.

    Error messages name the scheme at most: the URL may carry a password.
    """
    match = _SCHEME.match(url)
    if match is None:
        raise ValueError("the database URL has no scheme")
    scheme = match.group(1).lower()
    if scheme == "sqlite":
        rest = url[match.end() :]
        if not rest.startswith("///") or len(rest) == 3:
            raise ValueError("a sqlite URL must be sqlite:///relative/path or sqlite:////abs/path")
        return "sqlite", rest[3:]
    if scheme in ("postgresql", "postgres"):
        return "postgres", url
    raise ValueError(f"unsupported database URL scheme {scheme!r}")


async def open_store(url: str, *, pool_size: int = 10) -> Store:
    """Open the store the URL names. ``pool_size`` bounds PostgreSQL connections."""
    backend, target = database_backend(url)
    if backend == "sqlite":
        # Imported here so a PostgreSQL deployment never loads sqlite3, and vice versa.
        from vault.store.sqlite import SqliteStore

        return await SqliteStore.open(target)
    from vault.store.postgres import PostgresStore

    return await PostgresStore.open(target, pool_size=pool_size)


async def open_retention_store(url: str, *, pool_size: int = 2) -> RetentionStore:
    """Open the separated retention storage the URL names (a database of its own)."""
    backend, target = database_backend(url)
    if backend == "sqlite":
        from vault.store.sqlite import SqliteRetentionStore

        return await SqliteRetentionStore.open(target)
    from vault.store.postgres import PostgresRetentionStore

    return await PostgresRetentionStore.open(target, pool_size=pool_size)
