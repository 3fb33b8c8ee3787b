"""DisclosureService and RecipientAdminService: proto in, vault call, proto out.

ListDisclosures is one of the member's own rights: the servicer wraps it with the
session check (service.member_rights.DISCLOSURE_RIGHTS) itself, so it cannot be
registered without it. Disclose is a calling service's, under the caller policy
(which also names the purposes it may state); RecipientAdminService is the privacy
officer's. Errors rise to the interceptor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from privacyvault.v1 import disclosure_pb2 as pb
from privacyvault.v1 import disclosure_pb2_grpc
from service.convert import disclosed_pb, disclosure_pb, purpose_key, recipient_pb
from service.interceptors import Context
from service.member_rights import DISCLOSURE_RIGHTS, SessionCheck, guard
from vault.calls import current_caller
from vault.disclosures import DisclosedData, DisclosurePage, LegalBasis, RecipientRow


class DisclosuresApi(Protocol):
    """Vault.disclosures, as the servicers use it."""

    async def disclose(
        self,
        member_id: str,
        recipient_id: str,
        purpose: str,
        fields: Sequence[str],
        legal: LegalBasis | None = None,
        *,
        purpose_field: str = "purpose",
    ) -> DisclosedData: ...
    async def ledger(self, member_id: str, page_size: int, page_token: str) -> DisclosurePage: ...
    async def register(
        self,
        recipient_id: str,
        legal_entity: str,
        contact_email: str,
        purposes: Sequence[str],
        fields: Sequence[str],
        legal_basis: str,
        contract_reference: str,
        actor: str,
    ) -> RecipientRow: ...
    async def recipients(self) -> list[RecipientRow]: ...


class DisclosureServicer(disclosure_pb2_grpc.DisclosureServiceServicer):
    def __init__(self, disclosures: DisclosuresApi, sessions: SessionCheck) -> None:
        self._disclosures = disclosures
        for name in DISCLOSURE_RIGHTS:
            setattr(self, name, guard(name, getattr(self, name), sessions, DISCLOSURE_RIGHTS))

    async def Disclose(self, request: pb.DiscloseRequest, context: Context) -> pb.DiscloseResponse:
        legal = None
        if request.HasField("legal_basis"):
            legal = LegalBasis(request.legal_basis.reference, request.legal_basis.approved_by)
        data = await self._disclosures.disclose(
            request.member_id,
            request.recipient_id,
            purpose_key(request.purpose, request.purpose_key),
            list(request.fields),
            legal,
            purpose_field="purpose_key" if request.purpose_key else "purpose",
        )
        return disclosed_pb(data)

    async def ListDisclosures(
        self, request: pb.ListDisclosuresRequest, context: Context
    ) -> pb.ListDisclosuresResponse:
        page = await self._disclosures.ledger(
            request.member_id, request.page_size, request.page_token
        )
        return pb.ListDisclosuresResponse(
            disclosures=[disclosure_pb(e) for e in page.entries],
            next_page_token=page.next_page_token,
        )


class RecipientAdminServicer(disclosure_pb2_grpc.RecipientAdminServiceServicer):
    def __init__(self, disclosures: DisclosuresApi) -> None:
        self._disclosures = disclosures

    async def RegisterRecipient(
        self, request: pb.RegisterRecipientRequest, context: Context
    ) -> pb.RegisterRecipientResponse:
        # The registrar is the calling identity the caller policy allowed.
        row = await self._disclosures.register(
            request.recipient_id,
            request.legal_entity,
            request.contact_email,
            list(request.purposes),
            list(request.fields),
            request.legal_basis,
            request.contract_reference,
            current_caller(),
        )
        return pb.RegisterRecipientResponse(recipient=recipient_pb(row))

    async def ListRecipients(
        self, request: pb.ListRecipientsRequest, context: Context
    ) -> pb.ListRecipientsResponse:
        rows = await self._disclosures.recipients()
        return pb.ListRecipientsResponse(recipients=[recipient_pb(r) for r in rows])
