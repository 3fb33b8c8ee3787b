"""``privacy-vault``: run the server and the sidecar, apply migrations, manage keys
(``keys``) and withdrawn members' retained data (``retention``), back up the embedded
databases (``backup``), check a server's health (``health``), publish privacy policy
versions (``policy``), register third-party recipients (``recipients``)."""

from __future__ import annotations

from typing import Annotated

import typer

from service import backup_cli, health_cli
from service.cli_common import load_settings, run_async
from service.keys_cli import keys_app
from service.policy_cli import policy_app
from service.recipients_cli import recipients_app
from service.retention_cli import retention_app

app = typer.Typer(
    name="privacy-vault",
    help="An identity-and-privacy service: an envelope-encrypted member vault over gRPC.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(keys_app, name="keys")
app.add_typer(retention_app, name="retention")
app.add_typer(policy_app, name="policy")
app.add_typer(recipients_app, name="recipients")
app.command(name="backup", epilog=backup_cli.EXIT_CODES_HELP)(backup_cli.backup)
app.command(name="health", epilog=health_cli.HELP_EPILOG)(health_cli.health)


@app.command()
def serve() -> None:
    """Run the gRPC server (embedded default: SQLite and a key file in ./privacy-vault-data)."""
    from service.server import serve as run

    settings = load_settings()
    run_async(run(settings), settings.event_loop)


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

    from service.sidecar_cli import run_cli

    settings = load_settings()
    code = run_async(
        run_cli(settings, once=once, dry_run=dry_run, interval=interval, out=sys.stdout),
        settings.event_loop,
    )
    raise typer.Exit(code)


@app.command()
def migrate() -> None:
    """Apply pending database migrations and exit."""
    from service.wiring import migrate_configured

    versions = run_async(migrate_configured(load_settings()))
    typer.echo(f"applied migrations: {versions}" if versions else "database is up to date")
