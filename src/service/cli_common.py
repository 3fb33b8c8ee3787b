"""What every ``privacy-vault`` command shares: settings, output, exit codes, --actor.

- :func:`load_settings`: the settings from the environment, or exit 2 naming the
  bad ones (never their values).
- :class:`Output`: tables for people (a terminal) or JSON lines for scripts, one
  object per result with a ``type``; errors on stderr (JSON off a terminal).
- :class:`ExitCode` and :func:`exit_code_for`: the one place an error becomes an
  exit code. :func:`run_vault_command` opens the vault as the server does, runs a
  command and exits with its code; :func:`run_async` is the same for ``serve``,
  ``sidecar`` and ``migrate``, whose only errors are refused start-ups.
- :data:`ActorOption` and :func:`valid_actor`: who runs an operation.

Nothing printed ever holds key bytes or personal data (``retention disclose`` is
the one command whose output is a member's data, and only on request).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable, Container, Coroutine, Iterable, Sequence
from datetime import UTC, datetime
from enum import IntEnum
from typing import Annotated, Any, TextIO, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from service.config import Settings
from service.errors import ServiceError
from service.key_admin_servicer import check_actor
from service.logs import configure_logging
from service.wiring import open_configured_vault
from vault import Vault
from vault import errors as ve

_T = TypeVar("_T")


class ExitCode(IntEnum):
    OK = 0
    REFUSED = 1
    USAGE = 2
    UNAVAILABLE = 3
    NOT_FOUND = 4
    INTERNAL = 5


#: What an error means to a script, first match wins; anything else is INTERNAL.
_EXIT_CODES: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], ExitCode], ...] = (
    (ve.PreconditionFailed, ExitCode.REFUSED),
    (ve.AlreadyExists, ExitCode.REFUSED),
    (ve.InvalidInput, ExitCode.USAGE),
    (ve.NotFound, ExitCode.NOT_FOUND),
    (
        (ve.KeyUnavailable, ve.StorageUnavailable, ve.KeyChanged, ve.Conflict, OSError),
        ExitCode.UNAVAILABLE,
    ),
)
#: A refused start-up (serve, sidecar, migrate): a check failed (e.g. a data directory
#: of another user's open to others), or a key file or database cannot be used.
_STARTUP_EXIT_CODES: tuple[tuple[type[BaseException], ExitCode], ...] = (
    (ve.PreconditionFailed, ExitCode.REFUSED),
    (ve.KeyUnavailable, ExitCode.UNAVAILABLE),
    (ve.StorageUnavailable, ExitCode.UNAVAILABLE),
    (ServiceError, ExitCode.USAGE),  # a configuration file that cannot be used
)


def exit_code_for(exc: BaseException, *, startup: bool = False) -> ExitCode:
    table = _STARTUP_EXIT_CODES if startup else _EXIT_CODES
    return next((code for kind, code in table if isinstance(exc, kind)), ExitCode.INTERNAL)


def message_for(exc: BaseException) -> str:
    """What an error says on stderr: vault and service messages never carry a value."""
    if isinstance(exc, ve.InvalidInput):
        return "; ".join(f"{v.field} {v.description}" for v in exc.violations)
    if isinstance(exc, ve.VaultError | ServiceError):
        return exc.message
    # Any other text may quote anything: say only what kind of failure it was.
    return f"{type(exc).__name__} (details withheld)"


def exit_codes_help(
    *,
    refused: str,
    done: str = "done",
    usage: str = "usage or configuration error",
    unavailable: str = "database or key provider unavailable",
    not_found: str = "not found",
) -> str:
    """The exit-code paragraph of a command's help: the codes are the same for every
    command, what each means there differs."""
    return (
        f"Exit codes: 0 {done}; 1 refused ({refused}); 2 {usage}; 3 {unavailable}, retry; "
        f"4 {not_found}; 5 internal error."
    )


# --- settings -------------------------------------------------------------------------------


def load_settings() -> Settings:
    """Settings from the environment; exit 2 naming the bad settings (never their values)."""
    try:
        settings = Settings.from_env()
    except ValidationError as exc:
        # Name the settings that are wrong, not their values (they may be secrets).
        # Errors between settings (no location) carry our validators' own messages,
        # and so do value errors (type value_error): they say what is wrong and
        # never quote the value, so they are shown beside the variable's name.
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
        raise typer.Exit(ExitCode.USAGE) from None
    configure_logging(settings.log_level, settings.log_format)
    return settings


def _reason(message: object) -> str:
    return str(message).removeprefix("Value error, ")


# --- output ---------------------------------------------------------------------------------


class Output:
    """Results for people (a terminal) or for scripts (JSON lines)."""

    def __init__(self, out: TextIO | None = None, err: TextIO | None = None) -> None:
        self._out = out or sys.stdout
        self._err = err or sys.stderr
        self.tty = self._out.isatty()
        self.console = Console(file=self._out, highlight=False)
        self._err_console = Console(file=self._err, highlight=False)

    def line(self, kind: str, **fields: Any) -> None:
        """One JSON object on stdout (scripts only; callers print for people)."""
        self._out.write(json.dumps({"type": kind, **fields}, default=_json_default) + "\n")
        self._out.flush()

    def table(
        self,
        title: str,
        columns: Sequence[str],
        rows: Iterable[Sequence[str]],
        *,
        right: Container[str] = (),
        row_styles: Sequence[str] = (),
    ) -> None:
        """A table for people: ``right`` names the right-aligned columns; row n takes
        ``row_styles[n]`` if given."""
        table = Table(title=title)
        for column in columns:
            table.add_column(column, justify="right" if column in right else "left")
        for n, row in enumerate(rows):
            table.add_row(*row, style=row_styles[n] if n < len(row_styles) else None)
        self.console.print(table)

    def error(self, code: ExitCode, message: str) -> None:
        if self._err.isatty():
            self._err_console.print(f"[bold red]error[/] ({code.name.lower()}): {message}")
            return
        line = {"type": "error", "exit_code": int(code), "error": code.name.lower()}
        self._err.write(json.dumps({**line, "message": message}) + "\n")
        self._err.flush()


def _json_default(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(type(value).__name__)


def when(at: datetime | None) -> str:
    """A compact UTC time for tables (JSON lines carry full ISO 8601)."""
    return "-" if at is None else at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


# --- --actor --------------------------------------------------------------------------------


def _default_actor() -> str:
    return os.environ.get("USER") or "cli"


ActorOption = Annotated[
    str,
    typer.Option(
        "--actor",
        help="Who runs the operation, recorded in the key event. Default: $USER, else 'cli'.",
        default_factory=_default_actor,
        show_default=False,
    ),
]


def valid_actor(actor: str) -> None:
    """Checks --actor before anything is opened: a bad one is a usage error (exit 2)."""
    try:
        check_actor(actor, "--actor")
    except ve.InvalidInput as exc:
        Output().error(ExitCode.USAGE, message_for(exc))
        raise typer.Exit(ExitCode.USAGE) from None


# --- running --------------------------------------------------------------------------------


def run_vault_command(work: Callable[[Vault, Output], Awaitable[ExitCode]]) -> None:
    """Open the vault as the server does, run ``work``, exit with its code (the admin
    commands' one place where errors become exit codes)."""
    out = Output()
    settings = load_settings()
    try:
        settings.key_provider_settings  # noqa: B018 - a misconfigured provider is a usage error
    except ValueError as exc:
        out.error(ExitCode.USAGE, str(exc))
        raise typer.Exit(ExitCode.USAGE) from None

    async def main() -> ExitCode:
        async with open_configured_vault(settings) as vault:
            return await work(vault, out)

    try:
        code = asyncio.run(main())
    except Exception as exc:  # noqa: BLE001 - the CLI's one place errors become exit codes
        code = exit_code_for(exc)
        out.error(code, message_for(exc))
    raise typer.Exit(code)


def _loop_factory(event_loop: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory if asked for and installed (it is a dependency where it
    builds, not on Windows); None for asyncio's own loop."""
    if event_loop != "uvloop":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run_async(main: Coroutine[Any, Any, _T], event_loop: str = "asyncio") -> _T:
    """Run ``main`` on ``event_loop`` (the ``event_loop`` setting for the long-running
    commands); a vault error (a refused start-up check, a database or key provider that
    cannot be used) is one line on stderr and an exit code, not a traceback. Vault error
    messages never carry a value or key material."""
    try:
        with asyncio.Runner(loop_factory=_loop_factory(event_loop)) as runner:
            return runner.run(main)
    except (ve.VaultError, ServiceError) as exc:
        code = exit_code_for(exc, startup=True)
        typer.echo(f"cannot start: {exc.message}", err=True)
        raise typer.Exit(code) from None
