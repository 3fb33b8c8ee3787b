"""MemberService: proto in, vault call, proto out. Errors rise to the interceptor.

Every request has passed the API's field limits before a method sees it: the server
registers this servicer with ``validate=check_field_limits`` (service.server). The
member's own rights check the member's session first (service.member_rights): the
servicer wraps those methods itself, so it cannot be registered without the check.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from typing import Protocol

from privacyvault.v1 import member_pb2 as pb
from privacyvault.v1 import member_pb2_grpc
from service.convert import (
    access_entry_pb,
    correction_pb,
    fill_member,
    purpose_key,
    timestamp,
)
from service.interceptors import Context, metadata_value
from service.member_rights import MEMBER_RIGHTS, OPTIONAL_SESSION, SESSION_KEY, by_member, guard
from vault import (
    AccessPage,
    ConsentChoice,
    Login,
    MemberChanges,
    MemberView,
    NewMember,
    WithdrawalOutcome,
)
from vault.corrections import Correction, CorrectionPage

CLIENT_IP_KEY = "x-client-ip"


class MemberSessionsApi(Protocol):
    """Vault.sessions, as the servicer uses it."""

    async def require(self, token: str, member_id: str) -> None: ...
    async def end(self, token: str, member_id: str) -> None: ...


class CorrectionsApi(Protocol):
    """Vault.corrections, as the servicer uses it."""

    async def request(
        self, member_id: str, fields: Iterable[str], note: str, *, by_member: bool
    ) -> Correction: ...
    async def close(
        self, member_id: str, correction_id: str, reason: str, *, by_member: bool
    ) -> Correction: ...
    async def member_corrections(
        self, member_id: str, page_size: int, page_token: str
    ) -> CorrectionPage: ...


class MemberVault(Protocol):
    """The slice of the vault this servicer needs."""

    @property
    def sessions(self) -> MemberSessionsApi: ...
    @property
    def corrections(self) -> CorrectionsApi: ...

    async def sign_up(self, new: NewMember) -> str: ...
    async def authenticate(
        self, login_id: str, password: str, client_ip: str, *, ip_field: str = ...
    ) -> Login: ...
    async def get_member(
        self, member_id: str, purpose: str, *, purpose_field: str = ...
    ) -> MemberView: ...
    async def update_member(self, member_id: str, changes: MemberChanges) -> MemberView: ...
    async def change_password(self, member_id: str, current: str, new: str) -> None: ...
    async def withdraw(self, member_id: str, password: str) -> WithdrawalOutcome: ...
    async def export_member(self, member_id: str) -> str: ...
    def stream_member(self, member_id: str) -> AsyncIterator[str]: ...
    async def record_access(
        self, member_id: str, action: str, ip: str, request_id: str = ...
    ) -> None: ...
    async def list_access(self, member_id: str, page_size: int, page_token: str) -> AccessPage: ...
    async def find_login_id(self, email: str) -> None: ...
    async def start_password_reset(self, *, login_id: str = "", email: str = "") -> None: ...
    async def complete_password_reset(self, token: str, new_password: str) -> None: ...


class MemberServicer(member_pb2_grpc.MemberServiceServicer):
    def __init__(self, vault: MemberVault) -> None:
        self._vault = vault
        for name in (*MEMBER_RIGHTS, *OPTIONAL_SESSION):
            setattr(self, name, guard(name, getattr(self, name), vault.sessions))

    async def SignUp(self, request: pb.SignUpRequest, context: Context) -> pb.SignUpResponse:
        consents = [
            ConsentChoice(
                purpose_key(
                    c.purpose,
                    c.purpose_key,
                    f"consents[{i}].purpose",
                    f"consents[{i}].purpose_key",
                ),
                c.granted,
                "purpose_key" if c.purpose_key else "purpose",
            )
            for i, c in enumerate(request.consents)
        ]
        member_id = await self._vault.sign_up(
            NewMember(
                login_id=request.login_id,
                password=request.password,
                name=request.name,
                email=request.email,
                birth_date=request.birth_date,
                mobile_phone=request.mobile_phone if request.HasField("mobile_phone") else None,
                consents=consents,
                request_id=request.request_id,
            )
        )
        return pb.SignUpResponse(member_id=member_id)

    async def Authenticate(
        self, request: pb.AuthenticateRequest, context: Context
    ) -> pb.AuthenticateResponse:
        # The field wins; the metadata key is the older way, kept as a fallback.
        ip, field = request.client_ip, "client_ip"
        if not ip:
            ip, field = metadata_value(context, CLIENT_IP_KEY), CLIENT_IP_KEY
        # One transaction records the login and starts the session.
        login = await self._vault.authenticate(
            request.login_id, request.password, ip, ip_field=field
        )
        return pb.AuthenticateResponse(member_id=login.member_id, session_token=login.session_token)

    async def GetMember(
        self, request: pb.GetMemberRequest, context: Context
    ) -> pb.GetMemberResponse:
        key = purpose_key(request.purpose, request.purpose_key)
        view = await self._vault.get_member(
            request.member_id,
            key,
            purpose_field="purpose_key" if request.purpose_key else "purpose",
        )
        response = pb.GetMemberResponse()
        fill_member(response.member, view)  # in place: no Member made and copied in
        return response

    async def UpdateMember(
        self, request: pb.UpdateMemberRequest, context: Context
    ) -> pb.UpdateMemberResponse:
        changes = MemberChanges(
            paths=frozenset(request.update_mask.paths),
            name=request.name if request.HasField("name") else None,
            email=request.email if request.HasField("email") else None,
            mobile_phone=request.mobile_phone if request.HasField("mobile_phone") else None,
            current_password=(
                request.current_password if request.HasField("current_password") else None
            ),
        )
        view = await self._vault.update_member(request.member_id, changes)
        response = pb.UpdateMemberResponse()
        fill_member(response.member, view)
        return response

    async def ChangePassword(
        self, request: pb.ChangePasswordRequest, context: Context
    ) -> pb.ChangePasswordResponse:
        await self._vault.change_password(
            request.member_id, request.current_password, request.new_password
        )
        return pb.ChangePasswordResponse()

    async def Withdraw(self, request: pb.WithdrawRequest, context: Context) -> pb.WithdrawResponse:
        outcome = await self._vault.withdraw(request.member_id, request.password)
        if outcome.retained_until is not None:
            return pb.WithdrawResponse(retained_until=timestamp(outcome.retained_until))
        assert outcome.destroyed_at is not None
        return pb.WithdrawResponse(destroyed_at=timestamp(outcome.destroyed_at))

    async def ExportMemberData(
        self, request: pb.ExportMemberDataRequest, context: Context
    ) -> pb.ExportMemberDataResponse:
        return pb.ExportMemberDataResponse(json=await self._vault.export_member(request.member_id))

    async def StreamMemberData(
        self, request: pb.StreamMemberDataRequest, context: Context
    ) -> AsyncIterator[pb.StreamMemberDataResponse]:
        async for piece in self._vault.stream_member(request.member_id):
            yield pb.StreamMemberDataResponse(json=piece)

    async def RecordAccess(
        self, request: pb.RecordAccessRequest, context: Context
    ) -> pb.RecordAccessResponse:
        await self._vault.record_access(
            request.member_id, request.action, request.ip, request.request_id
        )
        return pb.RecordAccessResponse()

    async def ListAccessHistory(
        self, request: pb.ListAccessHistoryRequest, context: Context
    ) -> pb.ListAccessHistoryResponse:
        page = await self._vault.list_access(
            request.member_id, request.page_size, request.page_token
        )
        return pb.ListAccessHistoryResponse(
            entries=[access_entry_pb(e) for e in page.entries],
            next_page_token=page.next_page_token,
        )

    async def FindLoginId(
        self, request: pb.FindLoginIdRequest, context: Context
    ) -> pb.FindLoginIdResponse:
        await self._vault.find_login_id(request.email)
        return pb.FindLoginIdResponse()

    async def StartPasswordReset(
        self, request: pb.StartPasswordResetRequest, context: Context
    ) -> pb.StartPasswordResetResponse:
        which = request.WhichOneof("account")
        await self._vault.start_password_reset(
            login_id=request.login_id if which == "login_id" else "",
            email=request.email if which == "email" else "",
        )
        return pb.StartPasswordResetResponse()

    async def CompletePasswordReset(
        self, request: pb.CompletePasswordResetRequest, context: Context
    ) -> pb.CompletePasswordResetResponse:
        await self._vault.complete_password_reset(request.token, request.new_password)
        return pb.CompletePasswordResetResponse()

    async def EndSession(
        self, request: pb.EndSessionRequest, context: Context
    ) -> pb.EndSessionResponse:
        await self._vault.sessions.end(metadata_value(context, SESSION_KEY), request.member_id)
        return pb.EndSessionResponse()

    async def RequestCorrection(
        self, request: pb.RequestCorrectionRequest, context: Context
    ) -> pb.RequestCorrectionResponse:
        correction = await self._vault.corrections.request(
            request.member_id, request.fields, request.note, by_member=by_member(context)
        )
        return pb.RequestCorrectionResponse(correction=correction_pb(correction))

    async def CloseCorrection(
        self, request: pb.CloseCorrectionRequest, context: Context
    ) -> pb.CloseCorrectionResponse:
        correction = await self._vault.corrections.close(
            request.member_id, request.correction_id, request.reason, by_member=by_member(context)
        )
        return pb.CloseCorrectionResponse(correction=correction_pb(correction))

    async def ListCorrections(
        self, request: pb.ListCorrectionsRequest, context: Context
    ) -> pb.ListCorrectionsResponse:
        page = await self._vault.corrections.member_corrections(
            request.member_id, request.page_size, request.page_token
        )
        return pb.ListCorrectionsResponse(
            corrections=[correction_pb(c) for c in page.corrections],
            next_page_token=page.next_page_token,
        )
