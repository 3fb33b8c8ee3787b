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
from vault import errors as ve
from vault.backup import Backup, backup_databases

EXIT_CODES_HELP = exit_codes_help(
    refused="DEST already holds a backup",
    usage="usage or configuration error (a PostgreSQL database, DEST inside the data directory)",
    unavailable="database unavailable",
    not_found="no vault database",
)


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
    try:
        done = backup_databases(
            data_dir=settings.data_dir,
            dest=dest,
            now=datetime.now(UTC),
            database_url=(
                settings.database_url.get_secret_value() if settings.database_url else None
            ),
            retention_url=settings.retention_url,
        )
    except ValueError as exc:  # PostgreSQL, or DEST inside the data directory
        out.error(ExitCode.USAGE, str(exc))
        raise typer.Exit(ExitCode.USAGE) from None
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
