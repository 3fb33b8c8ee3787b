"""``privacy-vault retention``: the privacy officer's tools for the separated storage.

Withdrawn members' data kept under a retention rule (policy section 6) is reachable
only here and by the sidecar, never through the member API. ``list`` and
``events`` show ids, dates, reasons and counts only; ``disclose`` decrypts one
member's retained data for a use the law requires and ``destroy`` ends the
retention early, and both need a stated ``--basis`` (e.g. a case reference),
recorded with the actor before anything happens. Output and exit codes as
``privacy-vault keys`` (JSON lines off a terminal).
"""

from __future__ import annotations

from typing import Annotated

import typer

from service.cli_common import (
    ActorOption,
    ExitCode,
    Output,
    exit_codes_help,
    run_vault_command,
    valid_actor,
    when,
)
from vault import Vault
from vault.retention import disclosure_json

EXIT_CODES_HELP = exit_codes_help(refused="no retention database configured")

retention_app = typer.Typer(
    name="retention",
    help=(
        "The privacy officer's tools for withdrawn members' retained data (the separated "
        "storage): list, disclose when the law requires it, destroy early, audit trail. "
        "Uses the server's PRIVACY_VAULT_* settings. " + EXIT_CODES_HELP
    ),
    no_args_is_help=True,
    add_completion=False,
)

BasisOption = Annotated[
    str,
    typer.Option(
        "--basis",
        help="Why (the legal basis, e.g. a case or request reference; no personal data). "
        "Recorded with the actor.",
    ),
]
MemberArgument = Annotated[str, typer.Argument(help="The withdrawn member's id.")]


@retention_app.command("list", epilog=EXIT_CODES_HELP)
def list_retained(
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="At most this many.")] = 100,
    after: Annotated[
        str | None, typer.Option(help="Continue after this member id (paging).")
    ] = None,
) -> None:
    """Retained members: id, when retained, destroy-after date, reason. No personal data."""

    async def work(vault: Vault, out: Output) -> ExitCode:
        rows = await vault.retention.list_retained(limit, after)
        if not out.tty:
            for r in rows:
                out.line(
                    "retained",
                    member_id=r.member_id,
                    retained_at=r.retained_at,
                    destroy_after=r.destroy_after,
                    reason=r.reason,
                    confirmed=r.confirmed,
                    kek_version=r.kek_version,
                    access_entries=r.access_entries,
                )
            return ExitCode.OK
        out.table(
            f"retained members ({len(rows)})",
            ("member id", "retained", "destroy after", "reason", "access log"),
            [
                (
                    r.member_id + ("" if r.confirmed else " (unconfirmed)"),
                    when(r.retained_at),
                    when(r.destroy_after),
                    r.reason,
                    str(r.access_entries),
                )
                for r in rows
            ],
        )
        return ExitCode.OK

    run_vault_command(work)


@retention_app.command(epilog=EXIT_CODES_HELP)
def disclose(member_id: MemberArgument, basis: BasisOption, actor: ActorOption) -> None:
    """Print one retained member's data as JSON, for a use the law requires. The
    disclosure (who, when, the basis) is recorded first."""
    valid_actor(actor)

    async def work(vault: Vault, out: Output) -> ExitCode:
        document = await vault.retention.disclose(member_id, actor, basis)
        # The one output of this tool that holds personal data, and only on request.
        out.console.file.write(disclosure_json(document) + "\n")
        return ExitCode.OK

    run_vault_command(work)


@retention_app.command(epilog=EXIT_CODES_HELP)
def destroy(member_id: MemberArgument, basis: BasisOption, actor: ActorOption) -> None:
    """Destroy one retained member's data now, before its date."""
    valid_actor(actor)

    async def work(vault: Vault, out: Output) -> ExitCode:
        record = await vault.retention.destroy(member_id, actor, basis)
        if out.tty:
            out.console.print(f"destroyed the retained data of {record.member_id}")
        else:
            out.line(
                "destroyed",
                member_id=record.member_id,
                destroyed_at=record.destroyed_at,
                items=dict(record.items),
            )
        return ExitCode.OK

    run_vault_command(work)


@retention_app.command(epilog=EXIT_CODES_HELP)
def events(
    member_id: Annotated[str | None, typer.Argument(help="Only this member's.")] = None,
) -> None:
    """The audit trail of retained data: disclosures and early destructions."""

    async def work(vault: Vault, out: Output) -> ExitCode:
        rows = await vault.retention.events(member_id)
        if not out.tty:
            for e in rows:
                out.line(
                    "event",
                    at=e.at,
                    actor=e.actor,
                    operation=e.operation,
                    member_id=e.member_id,
                    basis=e.basis,
                )
            return ExitCode.OK
        out.table(
            "retention events",
            ("at", "actor", "operation", "member id", "basis"),
            [(when(e.at), e.actor, e.operation, e.member_id, e.basis) for e in rows],
        )
        return ExitCode.OK

    run_vault_command(work)
