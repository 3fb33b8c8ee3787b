"""``privacy-vault backup DEST``: an online copy of the embedded databases.

The vault database and the retention database (SQLite) are copied with SQLite's
online backup API while the server runs; the key file never is (a backup that holds
the KEK beside what it wraps defeats the shredding horizon: see the README). With a
PostgreSQL database the command refuses and points at pg_dump / pg_basebackup.

Exit codes are the ``keys`` commands': 0 done, 1 refused (DEST already holds a
backup), 2 usage or configuration error (PostgreSQL; DEST inside the data
directory), 3 unavailable (retry),
4 not found (no vault database yet), 5 internal error.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from service.cli_common import ExitCode, Output, exit_code_for, exit_codes_help, load_settings
from service.config import Settings
from vault import errors as ve
from vault.backup import Backup, backup_sqlite_databases
from vault.bootstrap import (
    default_database_url,
    retention_database_url,
    secure_local_files,
    sqlite_database_files,
)
from vault.store import database_backend

POSTGRES_REFUSAL = (
    "the {role} database is PostgreSQL: back it up with pg_dump or pg_basebackup "
    "(README, 'Backups'); `privacy-vault backup` copies SQLite databases only"
)

EXIT_CODES_HELP = exit_codes_help(
    refused="DEST already holds a backup",
    usage="usage or configuration error (a PostgreSQL database, DEST inside the data directory)",
    unavailable="database unavailable",
    not_found="no vault database",
)


def _not_sqlite(data_dir: Path, vault_url: str | None, retention_url: str | None) -> str | None:
    """Why this command cannot copy the configured databases, or None."""
    urls = {
        "vault": vault_url or default_database_url(data_dir),
        "retention": retention_database_url(data_dir, vault_url, retention_url),
    }
    for role, url in urls.items():
        if url is not None and database_backend(url)[0] != "sqlite":
            return POSTGRES_REFUSAL.format(role=role)
    return None


def _refusal(settings: Settings, dest: Path) -> str | None:
    """Why this command will not back up to ``dest`` (a usage error), or None."""
    vault_url = settings.database_url.get_secret_value() if settings.database_url else None
    try:
        refusal = _not_sqlite(settings.data_dir, vault_url, settings.retention_url)
    except ValueError as exc:
        refusal = str(exc)
    if refusal is None and dest.resolve().is_relative_to(settings.data_dir.resolve()):
        # A copy of the data directory would take the backup and the key file together.
        refusal = (
            f"{dest} is inside the data directory {settings.data_dir}: back up to another volume"
        )
    return refusal


def backup(
    dest: Annotated[
        Path,
        typer.Argument(
            help="A new (or empty) directory for the copies; created 0700, files 0600.",
            show_default=False,
        ),
    ],
) -> None:
    """Copy the SQLite vault and retention databases into DEST while the server runs
    (never the key file: keep that on another volume, a mounted secret or an HSM)."""
    out = Output()
    settings = load_settings()
    refusal = _refusal(settings, dest)
    if refusal:
        out.error(ExitCode.USAGE, refusal)
        raise typer.Exit(ExitCode.USAGE)
    data_dir = settings.data_dir
    vault_url = settings.database_url.get_secret_value() if settings.database_url else None
    vault_db, *rest = sqlite_database_files(data_dir, vault_url, settings.retention_url)
    try:
        secure_local_files(data_dir, [vault_db, *rest])
        done = backup_sqlite_databases(
            vault_db, rest[0] if rest else None, dest, now=datetime.now(UTC)
        )
    except ve.VaultError as exc:
        code = exit_code_for(exc)
        out.error(code, exc.message)
        raise typer.Exit(code) from None
    except OSError as exc:
        # The reason ("No space left on device"), not the paths the text may quote.
        out.error(ExitCode.UNAVAILABLE, f"the backup could not be written: {exc.strerror}")
        raise typer.Exit(ExitCode.UNAVAILABLE) from None
    _print_backup(out, done)


def _print_backup(out: Output, done: Backup) -> None:
    if out.tty:
        for f in done.files:
            out.console.print(f"{f.role}: {done.dest / f.file} ({f.size} bytes)")
        out.console.print(
            f"KEK versions needed to restore: {list(done.kek_versions)} "
            "(the key material is not in the backup)"
        )
    else:
        out.line(
            "backup",
            dest=str(done.dest),
            created_at=done.created_at,
            files=[
                {"role": f.role, "file": f.file, "bytes": f.size, "sha256": f.sha256}
                for f in done.files
            ],
            kek_versions=list(done.kek_versions),
        )
