"""Online backups of the embedded (SQLite) databases: ``privacy-vault backup DEST``.

SQLite's online backup API copies one consistent snapshot of each database while
the server goes on writing (in WAL mode the copy's read transaction does not block
the writer, and one step copies every page, so a write meanwhile cannot restart it).

The key file is never part of a backup. A copy that keeps the KEK beside the
ciphertext it wraps outlives the destruction of that KEK version, so the shredding
horizon would never close on it; keep the key file on another volume, in a mounted
secret or in an HSM, and back it up (if at all) on its own schedule.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from vault.bootstrap import (
    default_database_url,
    retention_database_url,
    secure_local_files,
    sqlite_database_files,
    tighten_permissions,
)
from vault.errors import NotFound, PreconditionFailed, StorageUnavailable
from vault.store import database_backend

BACKUP_FORMAT = "privacy-vault-backup/1"
MANIFEST = "backup.json"
#: Fixed names in DEST whatever the sources are called: a restore copies them back.
VAULT_FILE = "vault.db"
RETENTION_FILE = "retention.db"
_PARTIAL = ".partial"
POSTGRES_REFUSAL = (
    "the {role} database is PostgreSQL: back it up with pg_dump or pg_basebackup "
    "(README, 'Backups'); `privacy-vault backup` copies SQLite databases only"
)


@dataclass(frozen=True, slots=True)
class BackedUpFile:
    role: str  # "vault" or "retention"
    file: str  # its name in DEST
    size: int
    sha256: str


@dataclass(frozen=True, slots=True)
class Backup:
    dest: Path
    files: tuple[BackedUpFile, ...]
    #: The KEK versions (not destroyed when the copy was taken) that a restore needs.
    kek_versions: tuple[int, ...]
    created_at: datetime


def backup_databases(
    *,
    data_dir: Path,
    dest: Path,
    now: datetime,
    database_url: str | None = None,
    retention_url: str | None = None,
) -> Backup:
    """Copy the databases the settings name into ``dest`` (see
    :func:`backup_sqlite_databases`). ValueError, before anything is read or written,
    if one is PostgreSQL (pg_dump's job) or ``dest`` is inside the data directory."""
    for role, url in {
        "vault": database_url or default_database_url(data_dir),
        "retention": retention_database_url(data_dir, database_url, retention_url),
    }.items():
        if url is not None and database_backend(url)[0] != "sqlite":
            raise ValueError(POSTGRES_REFUSAL.format(role=role))
    if dest.resolve().is_relative_to(data_dir.resolve()):
        # A copy of the data directory would take the backup and the key file together.
        raise ValueError(
            f"{dest} is inside the data directory {data_dir}: back up to another volume"
        )
    vault_db, *rest = sqlite_database_files(data_dir, database_url, retention_url)
    secure_local_files(data_dir, [vault_db, *rest])
    return backup_sqlite_databases(vault_db, rest[0] if rest else None, dest, now=now)


def backup_sqlite_databases(
    vault_db: Path, retention_db: Path | None, dest: Path, *, now: datetime
) -> Backup:
    """Copy the vault database (and the retention database, if there is one) into
    ``dest`` (a directory: created 0700, files 0600), then write a manifest.

    Nothing is left in ``dest`` that looks complete unless every copy succeeded: each
    is written under a ``.partial`` name, checked, synced and then renamed, and the
    manifest comes last. Refuses (PreconditionFailed) a ``dest`` that already holds
    a backup; NotFound when there is no vault database to copy.
    """
    if not vault_db.is_file():
        raise NotFound(f"vault database at {vault_db}")
    sources = [("vault", vault_db, VAULT_FILE)]
    if retention_db is not None and retention_db.is_file():
        sources.append(("retention", retention_db, RETENTION_FILE))
    _prepare_dest(dest, [VAULT_FILE, RETENTION_FILE, MANIFEST])
    created: list[Path] = []
    try:
        files = []
        kek_versions: tuple[int, ...] = ()
        for role, source, file in sources:
            target = dest / file
            versions = _copy(source, target, created, role=role)
            if role == "vault":
                kek_versions = versions
            files.append(BackedUpFile(role, file, target.stat().st_size, _sha256(target)))
        backup = Backup(dest, tuple(files), kek_versions, now)
        _write_manifest(backup, created)
        _fsync_dir(dest)
    except BaseException:
        # No half-backup: whatever this run wrote goes again.
        for path in created:
            with contextlib.suppress(OSError):
                path.unlink()
        raise
    return backup


def _prepare_dest(dest: Path, names: Sequence[str]) -> None:
    if dest.exists():
        if not dest.is_dir():
            raise PreconditionFailed("dest", f"{dest} exists and is not a directory")
        taken = [n for n in names if (dest / n).exists() or (dest / (n + _PARTIAL)).exists()]
        if taken:
            raise PreconditionFailed(
                "dest", f"{dest} already holds {', '.join(taken)}: back up into a new directory"
            )
        tighten_permissions(dest, "the backup directory")
    else:
        dest.mkdir(mode=0o700, parents=True)
        os.chmod(dest, 0o700)  # whatever the umask


def _create_private(path: Path) -> None:
    """Create ``path`` empty and 0600 (never through a link), before SQLite opens it."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))


def _copy(source: Path, target: Path, created: list[Path], *, role: str) -> tuple[int, ...]:
    """One database into ``target`` via the backup API; the KEK versions it references
    (vault database only)."""
    partial = target.with_name(target.name + _PARTIAL)
    _create_private(partial)
    created.append(partial)
    try:
        with (
            _connect(f"{source.resolve().as_uri()}?mode=ro", uri=True) as src,
            _connect(str(partial)) as copy,
        ):
            src.backup(copy)  # pages=-1: every page in one step, one snapshot
            # A single self-contained file: no -wal beside the copy.
            copy.execute("PRAGMA journal_mode = DELETE")
            if copy.execute("PRAGMA integrity_check").fetchone()[0] != "ok":
                raise StorageUnavailable(f"the copy of the {role} database failed its check")
            versions = _kek_versions(copy) if role == "vault" else ()
    except sqlite3.Error:
        # SQLite's text may name paths or statements; say what failed, not why.
        raise StorageUnavailable(f"the {role} database could not be copied; retry") from None
    _fsync(partial)
    os.replace(partial, target)
    created.append(target)
    return versions


@contextlib.contextmanager
def _connect(database: str, *, uri: bool = False) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(database, uri=uri, timeout=10, isolation_level=None)
    try:
        yield conn
    finally:
        conn.close()


def _kek_versions(copy: sqlite3.Connection) -> tuple[int, ...]:
    try:
        rows = copy.execute(
            "SELECT version FROM kek_versions WHERE state != 'destroyed' ORDER BY version"
        ).fetchall()
    except sqlite3.OperationalError:
        raise PreconditionFailed(
            "source", "the vault database is not a privacy-vault database (no KEK versions)"
        ) from None
    return tuple(int(version) for (version,) in rows)


def _write_manifest(backup: Backup, created: list[Path]) -> None:
    doc = {
        "format": BACKUP_FORMAT,
        "created_at": backup.created_at.isoformat(),
        "files": [
            {"role": f.role, "file": f.file, "bytes": f.size, "sha256": f.sha256}
            for f in backup.files
        ],
        "kek_versions": list(backup.kek_versions),
        "key_material": (
            "not in this backup: restoring needs the key file or HSM holding these KEK "
            "versions; versions destroyed since make the copies of their members unreadable"
        ),
    }
    path = backup.dest / MANIFEST
    partial = path.with_name(path.name + _PARTIAL)
    _create_private(partial)
    created.append(partial)
    partial.write_text(json.dumps(doc, indent=1) + "\n")
    _fsync(partial)
    os.replace(partial, path)
    created.append(path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem syncs directories
        _fsync(path)
