"""``privacy-vault recipients``: the privacy officer's registry of third parties that
may receive members' data (policy section 4).

``register`` records a recipient (its id, legal entity, contact address, the
purposes and fields it may receive, the legal basis and the contract reference) in
the database the servers read, with ``--actor``; ``list`` shows them. A
registration is never changed: members consent to provision to the recipient as
registered (see vault.disclosures). Output and exit codes as ``privacy-vault keys``.
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
from vault.disclosures import RecipientRow
from vault.purposes import provision_key

EXIT_CODES_HELP = exit_codes_help(refused="the recipient id is taken")

recipients_app = typer.Typer(
    name="recipients",
    help=(
        "The privacy officer's recipients registry: register a third party that may "
        "receive members' data (with their consent or a legal basis), list them. Uses "
        "the server's PRIVACY_VAULT_* settings. " + EXIT_CODES_HELP
    ),
    no_args_is_help=True,
    add_completion=False,
)


def _line(out: Output, event: str, r: RecipientRow) -> None:
    out.line(
        event,
        recipient_id=r.recipient_id,
        legal_entity=r.legal_entity,
        contact_email=r.contact_email,
        purposes=list(r.purposes),
        fields=list(r.fields),
        legal_basis=r.legal_basis,
        contract_reference=r.contract_reference,
        registered_at=r.registered_at,
        registered_by=r.registered_by,
        consent_purpose_key=provision_key(r.recipient_id),
    )


@recipients_app.command(epilog=EXIT_CODES_HELP)
def register(
    recipient_id: Annotated[
        str, typer.Option("--id", help="2-48 characters of a-z, 0-9 and '_', e.g. acme_delivery.")
    ],
    legal_entity: Annotated[str, typer.Option("--legal-entity", help="The legal entity's name.")],
    contact_email: Annotated[
        str, typer.Option("--contact-email", help="Where correction notices go.")
    ],
    purposes: Annotated[
        list[str],
        typer.Option("--purpose", help="A catalogue purpose it may receive for (repeat)."),
    ],
    fields: Annotated[
        list[str],
        typer.Option("--field", help="login_id, name, email or mobile_phone (repeat)."),
    ],
    legal_basis: Annotated[
        str, typer.Option("--legal-basis", help="What provision to it rests on.")
    ],
    contract_reference: Annotated[
        str, typer.Option("--contract", help="The provision contract's reference.")
    ],
    actor: ActorOption,
) -> None:
    """Register a recipient."""
    valid_actor(actor)

    async def work(vault: Vault, out: Output) -> ExitCode:
        row = await vault.disclosures.register(
            recipient_id,
            legal_entity,
            contact_email,
            purposes,
            fields,
            legal_basis,
            contract_reference,
            actor,
        )
        if out.tty:
            out.console.print(
                f"registered recipient {row.recipient_id} ({row.legal_entity}); members "
                f"consent to provision to it as {provision_key(row.recipient_id)}"
            )
        else:
            _line(out, "registered", row)
        return ExitCode.OK

    run_vault_command(work)


@recipients_app.command("list", epilog=EXIT_CODES_HELP)
def list_recipients() -> None:
    """The registered recipients, by id."""

    async def work(vault: Vault, out: Output) -> ExitCode:
        rows = await vault.disclosures.recipients()
        if not out.tty:
            for r in rows:
                _line(out, "recipient", r)
            return ExitCode.OK
        out.table(
            f"recipients ({len(rows)})",
            ("id", "legal entity", "purposes", "fields", "contract", "registered"),
            [
                (
                    r.recipient_id,
                    r.legal_entity,
                    ", ".join(r.purposes),
                    ", ".join(r.fields),
                    r.contract_reference,
                    when(r.registered_at),
                )
                for r in rows
            ],
        )
        return ExitCode.OK

    run_vault_command(work)
