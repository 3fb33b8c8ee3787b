"""``privacy-vault policy``: the privacy officer publishes privacy policy versions.

``publish`` records a version (its number, the date it takes effect, the SHA-256 of
the text file given, the opt-in purposes it materially changes) in the database the
servers read, with ``--actor``; ``list`` shows the versions. The members concerned
are mailed by the sidecar (see vault.consents for when a version applies). Output
and exit codes as ``privacy-vault keys`` (JSON lines off a terminal).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
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

EXIT_CODES_HELP = exit_codes_help(refused="the version number is taken")
#: The longest policy text read (a policy is a few pages, not megabytes).
MAX_TEXT_BYTES = 4 * 1024 * 1024

policy_app = typer.Typer(
    name="policy",
    help=(
        "The privacy officer's policy versions: publish one (members whose consent to a "
        "changed purpose predates it are asked again), list them. Uses the server's "
        "PRIVACY_VAULT_* settings. " + EXIT_CODES_HELP
    ),
    no_args_is_help=True,
    add_completion=False,
)


def _text_sha256(path: Path) -> str:
    """The SHA-256 of the policy text file; exit 2 if it cannot be read or is too big."""
    try:
        with path.open("rb") as text:
            data = text.read(MAX_TEXT_BYTES + 1)
    except OSError as exc:
        Output().error(ExitCode.USAGE, f"the policy text cannot be read ({type(exc).__name__})")
        raise typer.Exit(ExitCode.USAGE) from None
    if len(data) > MAX_TEXT_BYTES or not data.strip():
        Output().error(ExitCode.USAGE, "the policy text must be 1 byte to 4 MiB")
        raise typer.Exit(ExitCode.USAGE)
    return hashlib.sha256(data).hexdigest()


@policy_app.command(epilog=EXIT_CODES_HELP)
def publish(
    version: Annotated[str, typer.Option("--version", help="The version number, e.g. 2.")],
    effective_date: Annotated[
        str,
        typer.Option("--effective-date", help="YYYY-MM-DD: it applies from 00:00 UTC of that day."),
    ],
    text: Annotated[
        Path, typer.Option("--text", help="The policy text file (its SHA-256 is recorded).")
    ],
    actor: ActorOption,
    changed: Annotated[
        list[str] | None,
        typer.Option(
            "--changed",
            help="An opt-in purpose the version materially changes (repeat for several; "
            "none: a version that changes nothing materially).",
        ),
    ] = None,
) -> None:
    """Publish a privacy policy version."""
    valid_actor(actor)
    digest = _text_sha256(text)

    async def work(vault: Vault, out: Output) -> ExitCode:
        row = await vault.consents.publish(version, effective_date, digest, changed or [], actor)
        if out.tty:
            changes = ", ".join(row.changed_purposes) or "nothing materially"
            out.console.print(
                f"published policy version {row.version}, effective {when(row.effective_at)}; "
                f"changes: {changes}"
            )
        else:
            out.line(
                "published",
                version=row.version,
                published_at=row.published_at,
                effective_at=row.effective_at,
                text_sha256=row.text_sha256,
                changed_purposes=list(row.changed_purposes),
                published_by=row.published_by,
            )
        return ExitCode.OK

    run_vault_command(work)


@policy_app.command("list", epilog=EXIT_CODES_HELP)
def list_versions() -> None:
    """The published versions, oldest first."""

    async def work(vault: Vault, out: Output) -> ExitCode:
        rows = await vault.consents.versions()
        if not out.tty:
            for r in rows:
                out.line(
                    "policy_version",
                    version=r.version,
                    published_at=r.published_at,
                    effective_at=r.effective_at,
                    text_sha256=r.text_sha256,
                    changed_purposes=list(r.changed_purposes),
                    published_by=r.published_by,
                )
            return ExitCode.OK
        out.table(
            f"policy versions ({len(rows)})",
            ("version", "published", "effective", "changes", "by"),
            [
                (
                    r.version,
                    when(r.published_at),
                    when(r.effective_at),
                    ", ".join(r.changed_purposes) or "-",
                    r.published_by,
                )
                for r in rows
            ],
        )
        return ExitCode.OK

    run_vault_command(work)
