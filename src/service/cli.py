"""``privacy-vault``: run the server and the sidecar, apply migrations, manage keys
(``keys``) and withdrawn members' retained data (``retention``), back up the embedded
databases (``backup``)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Annotated, Any, TypeVar

import typer
from pydantic import ValidationError

from service import backup_cli
from service.config import Settings
from service.keys_cli import keys_app
from service.logs import configure_logging
from service.retention_cli import retention_app
from vault import errors as ve

_T = TypeVar("_T")

app = typer.Typer(
    name="privacy-vault",
    help="An identity-and-privacy service: an envelope-encrypted member vault over gRPC.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(keys_app, name="keys")
app.add_typer(retention_app, name="retention")
app.command(name="backup", epilog=backup_cli._EXIT_CODES_HELP)(backup_cli.backup)


def load_settings() -> Settings:
    """Settings from the environment; exit 2 naming the bad settings (never their values)."""
    try:
        settings = Settings.from_env()
    except ValidationError as exc:
        # Name the settings that are wrong, not their values (they may be secrets).
        # Errors between settings (no location) carry our validators' own messages,
        # which never quote a value.
        # Our own validators' messages (type value_error) say what is wrong and never
        # quote the value, so they are shown beside the variable's name.
        bad = ", ".join(
            (
                "PRIVACY_VAULT_"
                + str(e["loc"][0]).upper()
                + (f" ({_reason(e['msg'])})" if e["type"] == "value_error" else "")
            )
            if e["loc"]
            else _reason(e["msg"])
            for e in exc.errors(include_input=False)
        )
        typer.echo(f"invalid configuration: {bad or exc.error_count()}", err=True)
        raise typer.Exit(2) from None
    configure_logging(settings.log_level, settings.log_format)
    return settings


def _reason(message: object) -> str:
    return str(message).removeprefix("Value error, ")


# Exit codes of a command whose start-up the vault refused (the keys commands' codes).
STARTUP_EXIT_CODES: dict[type[ve.VaultError], int] = {
    ve.PreconditionFailed: 1,  # e.g. a data directory of another user's open to others
    ve.KeyUnavailable: 3,  # e.g. a key file others can read
    ve.StorageUnavailable: 3,
}


def run_async(main: Coroutine[Any, Any, _T]) -> _T:
    """Run ``main``; a vault error (a refused start-up check, a database or key provider
    that cannot be used) is one line on stderr and an exit code, not a traceback. Vault
    error messages never carry a value or key material."""
    try:
        return asyncio.run(main)
    except ve.VaultError as exc:
        code = next((c for t, c in STARTUP_EXIT_CODES.items() if isinstance(exc, t)), 5)
        typer.echo(f"cannot start: {exc.message}", err=True)
        raise typer.Exit(code) from None


@app.command()
def serve() -> None:
    """Run the gRPC server (embedded default: SQLite and a key file in ./privacy-vault-data)."""
    from service.server import serve as run

    run_async(run(load_settings()))


@app.command()
def sidecar(
    once: Annotated[bool, typer.Option("--once", help="Run one round and exit.")] = False,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Print what one round would do (counts); change nothing."),
    ] = False,
    interval: Annotated[
        float | None,
        typer.Option(min=0.001, help="Seconds between rounds (default: the setting)."),
    ] = None,
) -> None:
    """Run the lifecycle sidecar: inactivity notices and shredding, destruction of retained
    data whose date passed, access-log purge, the e-mail relay."""
    import sys

    from service.sidecar import run_cli

    settings = load_settings()
    code = run_async(
        run_cli(settings, once=once, dry_run=dry_run, interval=interval, out=sys.stdout)
    )
    raise typer.Exit(code)


@app.command()
def migrate() -> None:
    """Apply pending database migrations and exit."""
    from service.server import migrate_only

    versions = run_async(migrate_only(load_settings()))
    typer.echo(f"applied migrations: {versions}" if versions else "database is up to date")
