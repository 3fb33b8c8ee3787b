"""ConsentService and PolicyAdminService: proto in, vault call, proto out.

ConsentService's RPCs are all the member's own rights: the servicer wraps them with
the session check (service.member_rights.CONSENT_RIGHTS) itself, so it cannot be
registered without it. PolicyAdminService is the privacy officer's: the caller
policy names who may call it. Errors rise to the interceptor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from privacyvault.v1 import consent_pb2 as pb
from privacyvault.v1 import consent_pb2_grpc
from service.convert import consent_event_pb, consent_state_pb, policy_version_pb
from service.interceptors import Context
from service.member_rights import CONSENT_RIGHTS, SessionCheck, guard
from vault import ConsentChoice
from vault.calls import current_caller
from vault.consents import ConsentHistoryPage, ConsentState, PolicyVersionRow


class ConsentsApi(Protocol):
    """Vault.consents, as the servicers use it."""

    async def current(self, member_id: str) -> list[ConsentState]: ...
    async def update(
        self, member_id: str, choices: Sequence[ConsentChoice]
    ) -> list[ConsentState]: ...
    async def history(
        self, member_id: str, page_size: int, page_token: str
    ) -> ConsentHistoryPage: ...
    async def publish(
        self,
        version: str,
        effective_date: str,
        text_sha256: str,
        changed_purposes: Sequence[str],
        actor: str,
    ) -> PolicyVersionRow: ...
    async def versions(self) -> list[PolicyVersionRow]: ...


class ConsentServicer(consent_pb2_grpc.ConsentServiceServicer):
    def __init__(self, consents: ConsentsApi, sessions: SessionCheck) -> None:
        self._consents = consents
        for name in CONSENT_RIGHTS:
            setattr(self, name, guard(name, getattr(self, name), sessions, CONSENT_RIGHTS))

    async def GetConsents(
        self, request: pb.GetConsentsRequest, context: Context
    ) -> pb.GetConsentsResponse:
        states = await self._consents.current(request.member_id)
        return pb.GetConsentsResponse(consents=[consent_state_pb(s) for s in states])

    async def UpdateConsents(
        self, request: pb.UpdateConsentsRequest, context: Context
    ) -> pb.UpdateConsentsResponse:
        choices = [ConsentChoice(c.purpose_key, c.granted, "purpose_key") for c in request.changes]
        states = await self._consents.update(request.member_id, choices)
        return pb.UpdateConsentsResponse(consents=[consent_state_pb(s) for s in states])

    async def ListConsentHistory(
        self, request: pb.ListConsentHistoryRequest, context: Context
    ) -> pb.ListConsentHistoryResponse:
        page = await self._consents.history(
            request.member_id, request.page_size, request.page_token
        )
        return pb.ListConsentHistoryResponse(
            events=[consent_event_pb(e) for e in page.events],
            next_page_token=page.next_page_token,
        )


class PolicyAdminServicer(consent_pb2_grpc.PolicyAdminServiceServicer):
    def __init__(self, consents: ConsentsApi) -> None:
        self._consents = consents

    async def PublishPolicyVersion(
        self, request: pb.PublishPolicyVersionRequest, context: Context
    ) -> pb.PublishPolicyVersionResponse:
        # The publisher is the calling identity the caller policy allowed.
        row = await self._consents.publish(
            request.version,
            request.effective_date,
            request.text_sha256,
            list(request.changed_purposes),
            current_caller(),
        )
        return pb.PublishPolicyVersionResponse(version=policy_version_pb(row))

    async def ListPolicyVersions(
        self, request: pb.ListPolicyVersionsRequest, context: Context
    ) -> pb.ListPolicyVersionsResponse:
        versions = await self._consents.versions()
        return pb.ListPolicyVersionsResponse(versions=[policy_version_pb(v) for v in versions])
