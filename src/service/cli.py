"""``privacy-vault``: run the server and the sidecar, apply migrations, manage keys
(``keys``) and withdrawn members' retained data (``retention``)."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer
from pydantic import ValidationError

from service.config import Settings
from service.keys_cli import keys_app
from service.logs import configure_logging
from service.retention_cli import retention_app

app = typer.Typer(
    name="privacy-vault",
    help="An identity-and-privacy service: an envelope-encrypted member vault over gRPC.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(keys_app, name="keys")
app.add_typer(retention_app, name="retention")


def load_settings() -> Settings:
    """Settings from the environment; exit 2 naming the bad settings (never their values)."""
    try:
        settings = Settings.from_env()
    except ValidationError as exc:
        # Name the settings that are wrong, not their values (they may be secrets).
        # Errors between settings (no location) carry our validators' own messages,
        # which never quote a value.
        bad = ", ".join(
            "PRIVACY_VAULT_" + str(e["loc"][0]).upper()
            if e["loc"]
            else str(e["msg"]).removeprefix("Value error, ")
            for e in exc.errors(include_input=False)
        )
        typer.echo(f"invalid configuration: {bad or exc.error_count()}", err=True)
        raise typer.Exit(2) from None
    configure_logging(settings.log_level, settings.log_format)
    return settings


@app.command()
def serve() -> None:
    """Run the gRPC server (embedded default: SQLite and a key file in ./privacy-vault-data)."""
    from service.server import serve as run

    asyncio.run(run(load_settings()))


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
    code = asyncio.run(
        run_cli(settings, once=once, dry_run=dry_run, interval=interval, out=sys.stdout)
    )
    raise typer.Exit(code)


@app.command()
def migrate() -> None:
    """Apply pending database migrations and exit."""
    from service.server import migrate_only

    versions = asyncio.run(migrate_only(load_settings()))
    typer.echo(f"applied migrations: {versions}" if versions else "database is up to date")
