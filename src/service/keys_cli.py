"""``privacy-vault keys``: key management for the security team.

Each command opens the vault with the server's own settings (``PRIVACY_VAULT_*``)
and calls ``vault.keys`` directly: run it where the database and the key provider
are reachable. On a terminal the output is tables and a progress bar; otherwise
it is JSON lines on stdout, one object per result or progress step, each with a
``type``. Errors go to stderr (a JSON object when stderr is not a terminal).
Nothing printed ever holds key bytes or personal data.

Exit codes (scripts may rely on them):
  0  done (for ``--dry-run``: the operation would be allowed)
  1  refused: the vault's state does not allow it (FAILED_PRECONDITION), e.g.
     destroying a version still in use or the active one
  2  usage or configuration error
  3  unavailable: the database or the key provider cannot be reached (or the
     member kept changing during a member key rotation); retry
  4  not found: no such KEK version or member
  5  internal error
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from service.cli_common import (
    ActorOption,
    ExitCode,
    Output,
    exit_codes_help,
    load_settings,
    run_vault_command,
    valid_actor,
    when,
)
from vault.keyadmin import DEFAULT_BATCH, MAX_BATCH, KeyAdmin, KeyStatus

EXIT_CODES_HELP = exit_codes_help(
    done="done (dry run: allowed)", refused="the vault's state does not allow it"
)

keys_app = typer.Typer(
    name="keys",
    help=(
        "Key management for the security team: KEK status, rotation, re-wrap, "
        "destruction, member key rotation, the scheduled horizon job. Uses the server's "
        "PRIVACY_VAULT_* settings. JSON lines on stdout when not on a terminal. " + EXIT_CODES_HELP
    ),
    no_args_is_help=True,
    add_completion=False,
)


def _run(work: Callable[[KeyAdmin, Output], Awaitable[ExitCode]]) -> None:
    """Open the vault as the server does, run ``work`` on ``vault.keys``, exit with its code."""
    run_vault_command(lambda vault, out: work(vault.keys, out))


# --- status -------------------------------------------------------------------------------


def _print_status(out: Output, status: KeyStatus) -> None:
    if not out.tty:
        out.line(
            "status",
            provider=status.provider,
            active_version=status.active_version,
            versions=[
                {
                    "version": v.version,
                    "state": v.state,
                    "created_at": v.created_at,
                    "destroyed_at": v.destroyed_at,
                    "member_keys": v.member_keys,
                    "index_keys": v.index_keys,
                    "retained_keys": v.retained_keys,
                }
                for v in status.versions
            ],
        )
        return
    styles = {"active": "bold green", "decrypt_only": "yellow", "destroyed": "dim"}
    out.table(
        f"KEK versions (provider: {status.provider})",
        ("version", "state", "created", "destroyed", "member keys", "index keys", "retained keys"),
        [
            (
                str(v.version),
                v.state,
                when(v.created_at),
                when(v.destroyed_at),
                str(v.member_keys),
                str(v.index_keys),
                str(v.retained_keys),
            )
            for v in status.versions
        ],
        right=("member keys", "index keys", "retained keys"),
        row_styles=[styles.get(v.state, "") for v in status.versions],
    )


@keys_app.command(epilog=EXIT_CODES_HELP)
def status() -> None:
    """Show each KEK version's state and how many member and index keys it still wraps."""

    async def work(keys: KeyAdmin, out: Output) -> ExitCode:
        _print_status(out, await keys.status())
        return ExitCode.OK

    _run(work)


# --- rotate -------------------------------------------------------------------------------


@keys_app.command(epilog=EXIT_CODES_HELP)
def rotate(actor: ActorOption) -> None:
    """Add a KEK version and make it active; new member keys are wrapped under it at once.

    Then run `keys rewrap` to move the existing keys, and `keys destroy-version` for
    the old version.
    """
    valid_actor(actor)

    async def work(keys: KeyAdmin, out: Output) -> ExitCode:
        row = await keys.rotate(actor)
        if out.tty:
            out.console.print(
                f"KEK version [bold]{row.version}[/] is active; version {row.version - 1} is "
                "decrypt-only. Next: [bold]privacy-vault keys rewrap[/]."
            )
        else:
            out.line(
                "rotated",
                version=row.version,
                previous_version=row.version - 1,
                created_at=row.created_at,
            )
        return ExitCode.OK

    _run(work)


# --- rewrap -------------------------------------------------------------------------------


@keys_app.command(epilog=EXIT_CODES_HELP)
def rewrap(
    actor: ActorOption,
    batch_size: Annotated[
        int,
        typer.Option(min=1, max=MAX_BATCH, help="Keys per batch; each batch is one transaction."),
    ] = DEFAULT_BATCH,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only count the keys that would move.")
    ] = False,
) -> None:
    """Move every member key and the index key to the active KEK version, online.

    Batches commit one by one: an interrupted run can simply be started again.
    """
    valid_actor(actor)

    async def work(keys: KeyAdmin, out: Output) -> ExitCode:
        steps = keys.rewrap(actor, batch_size=batch_size, dry_run=dry_run)
        if not out.tty:
            async for step in steps:
                out.line("rewrap_progress", **dataclasses.asdict(step))
            return ExitCode.OK
        last = None
        with Progress(
            TextColumn("[bold]re-wrap[/] to v{task.fields[target]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[batches]} batches"),
            TimeElapsedColumn(),
            console=out.console,
            transient=False,
        ) as bar:
            task = None
            async for step in steps:
                last = step
                if task is None:
                    task = bar.add_task(
                        "rewrap", total=step.total, target=step.target_version, batches=0
                    )
                bar.update(
                    task,
                    total=step.total,
                    completed=step.rewrapped + step.skipped,
                    batches=step.batches,
                )
        if last is not None:
            verb = "would move" if last.dry_run else "re-wrapped"
            count = last.total if last.dry_run else last.rewrapped
            out.console.print(
                f"{verb} {count} keys to KEK version {last.target_version}"
                + ("" if last.dry_run else f" ({last.skipped} moved meanwhile by others)")
            )
        return ExitCode.OK

    _run(work)


# --- destroy-version ----------------------------------------------------------------------


@keys_app.command("destroy-version", epilog=EXIT_CODES_HELP)
def destroy_version(
    version: Annotated[int, typer.Argument(min=1, help="The KEK version to destroy.")],
    actor: ActorOption,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", help="Only say whether it is allowed and why: exit 0 if so, else 1."
        ),
    ] = False,
    yes: Annotated[
        bool, typer.Option("--yes", "-y", help="Do not ask for confirmation on a terminal.")
    ] = False,
) -> None:
    """Destroy a KEK version's material, irreversibly.

    Refused (exit 1) while it is the active version or still wraps any key: rotate and
    re-wrap first. Copies of keys wrapped under it (backups, WAL) become undecryptable.
    """
    valid_actor(actor)

    async def work(keys: KeyAdmin, out: Output) -> ExitCode:
        plan = await keys.plan_destroy(version)
        if dry_run:
            if out.tty:
                verdict = "[green]allowed[/]" if plan.allowed else "[red]refused[/]"
                out.console.print(f"destroying KEK version {version}: {verdict}: {plan.reason}")
            else:
                out.line("destroy_plan", version=version, allowed=plan.allowed, reason=plan.reason)
            return ExitCode.OK if plan.allowed else ExitCode.REFUSED
        if out.tty and not yes and plan.allowed:
            typer.confirm(f"Destroy KEK version {version}? This cannot be undone", abort=True)
        # The store re-checks in the destroying transaction; a refusal (the plan
        # went stale, or was never allowed) raises PreconditionFailed: exit 1.
        row = await keys.destroy_version(version, actor)
        if out.tty:
            out.console.print(f"KEK version {row.version} is destroyed.")
        else:
            out.line("destroyed", version=row.version, destroyed_at=row.destroyed_at)
        return ExitCode.OK

    _run(work)


# --- rotate-member ------------------------------------------------------------------------


@keys_app.command("rotate-member", epilog=EXIT_CODES_HELP)
def rotate_member(
    member_id: Annotated[str, typer.Argument(help="The member's id.")],
    actor: ActorOption,
) -> None:
    """Re-encrypt one member's fields and access history under a fresh data key."""
    valid_actor(actor)

    async def work(keys: KeyAdmin, out: Output) -> ExitCode:
        dek_id = await keys.rotate_member_key(member_id, actor)
        if out.tty:
            out.console.print(f"member {member_id} now has data key {dek_id}.")
        else:
            out.line("member_key_rotated", member_id=member_id, dek_id=dek_id)
        return ExitCode.OK

    _run(work)


# --- events -------------------------------------------------------------------------------


@keys_app.command(epilog=EXIT_CODES_HELP)
def events(
    limit: Annotated[int, typer.Option(min=1, max=1000, help="How many, newest first.")] = 20,
) -> None:
    """Show the audit trail of key operations (who, what, when), newest first."""

    async def work(keys: KeyAdmin, out: Output) -> ExitCode:
        found = await keys.events(limit)
        if not out.tty:
            for e in found:
                out.line(
                    "key_event",
                    at=e.at,
                    actor=e.actor,
                    operation=e.operation,
                    kek_version=e.kek_version,
                    member_id=e.member_id,
                    details=dict(e.details),
                )
            return ExitCode.OK
        out.table(
            "key events (newest first)",
            ("at", "actor", "operation", "KEK", "member", "details"),
            [
                (
                    when(e.at),
                    e.actor,
                    e.operation,
                    "-" if e.kek_version is None else str(e.kek_version),
                    e.member_id or "-",
                    ", ".join(f"{k}={v}" for k, v in sorted(e.details.items())),
                )
                for e in found
            ],
        )
        return ExitCode.OK

    _run(work)


# --- maintain -----------------------------------------------------------------------------

_DURATION = re.compile(r"(\d+)([smhdw])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_duration(value: str) -> timedelta:
    """'90d', '12h', '30m', '45s', '2w' -> timedelta."""
    match = _DURATION.fullmatch(value.strip())
    if match is None:
        raise typer.BadParameter("use a number and a unit: s, m, h, d or w (e.g. 90d)")
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


@keys_app.command(epilog=EXIT_CODES_HELP)
def maintain(
    actor: ActorOption,
    rotate_after: Annotated[
        str | None,
        typer.Option(
            help="Rotate when the active KEK version is older than this (e.g. 90d); "
            "default: PRIVACY_VAULT_KEK_ROTATION_DAYS."
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, max=MAX_BATCH)] = DEFAULT_BATCH,
) -> None:
    """The scheduled horizon job (cron, a Kubernetes CronJob): rotate when due, re-wrap
    everything, destroy every old version that no longer wraps a key.

    Safe to run as often as you like. Bounds how long backups of shredded members'
    keys stay decryptable.
    """
    horizon = (
        parse_duration(rotate_after)
        if rotate_after is not None
        else timedelta(days=load_settings().kek_rotation_days)
    )
    valid_actor(actor)

    async def work(keys: KeyAdmin, out: Output) -> ExitCode:
        done = await keys.maintain(actor, rotate_after=horizon, batch_size=batch_size)
        if out.tty:
            out.console.print(
                f"rotated: {done['rotated']}, re-wrapped: {done['rewrapped']}, "
                f"destroyed versions: {done['destroyed']}"
            )
        else:
            out.line("maintained", **done)
        return ExitCode.OK

    _run(work)
