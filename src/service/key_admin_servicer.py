"""KeyAdminService: the security team's key operations. Errors rise to the interceptor.

Registered only when the server has an admin token. Every method first calls
:meth:`KeyAdminServicer._actor`: the ``authorization`` metadata must carry that
token (else UNAUTHENTICATED, one message whether it is missing or wrong) and
``x-actor`` must say who is calling (recorded in the key event).
"""

from __future__ import annotations

import hmac
import re
from collections.abc import AsyncIterator
from typing import Protocol

from privacyvault.v1 import key_admin_pb2 as pb
from privacyvault.v1 import key_admin_pb2_grpc
from service.convert import event_pb, kek_version_pb, progress_pb, status_version_pb
from service.errors import AdminUnauthenticated
from service.field_limits import check_field_limits
from service.interceptors import Context, metadata_value
from vault.errors import FieldViolation, InvalidInput
from vault.keyadmin import (
    DEFAULT_BATCH,
    MAX_BATCH,
    DestroyPlan,
    KekVersionRow,
    KeyEvent,
    KeyStatus,
    RewrapProgress,
)

AUTHORIZATION_KEY = "authorization"
ACTOR_KEY = "x-actor"
_BEARER = "bearer"
_ACTOR = re.compile(r"[A-Za-z0-9._@-]{1,64}")
DEFAULT_EVENTS, MAX_EVENTS = 100, 1000


class KeyAdminVault(Protocol):
    """The slice of ``vault.keys`` this servicer needs."""

    async def status(self) -> KeyStatus: ...
    async def events(self, limit: int = ...) -> list[KeyEvent]: ...
    async def rotate(self, actor: str) -> KekVersionRow: ...
    def rewrap(
        self, actor: str, *, batch_size: int = ..., dry_run: bool = ...
    ) -> AsyncIterator[RewrapProgress]: ...
    async def plan_destroy(self, version: int) -> DestroyPlan: ...
    async def destroy_version(self, version: int, actor: str) -> KekVersionRow: ...
    async def rotate_member_key(self, member_id: str, actor: str) -> int: ...


def check_actor(actor: str, field: str = ACTOR_KEY) -> str:
    """Who runs a key operation: 1-64 characters of A-Z a-z 0-9 . _ @ -."""
    if not _ACTOR.fullmatch(actor):
        raise InvalidInput(
            [FieldViolation(field, "must be 1-64 characters of A-Z, a-z, 0-9, '.', '_', '@', '-'")]
        )
    return actor


class KeyAdminServicer(key_admin_pb2_grpc.KeyAdminServiceServicer):
    def __init__(self, keys: KeyAdminVault, admin_token: str) -> None:
        if not admin_token:
            raise ValueError("the key admin API needs a non-empty admin token")
        self._keys = keys
        self._token = admin_token.encode()

    def __repr__(self) -> str:
        return "<KeyAdminServicer>"

    def _actor(self, context: Context) -> str:
        """Authenticate the call, then say who made it. The token check comes first:
        an unauthenticated caller learns nothing about the rest of the request."""
        scheme, _, token = metadata_value(context, AUTHORIZATION_KEY).partition(" ")
        # compare_digest on the token alone: the time taken does not depend on
        # how much of it matches.
        valid = hmac.compare_digest(token.strip().encode(), self._token)
        if scheme.lower() != _BEARER or not valid:
            raise AdminUnauthenticated
        return check_actor(metadata_value(context, ACTOR_KEY))

    async def GetKeyStatus(
        self, request: pb.GetKeyStatusRequest, context: Context
    ) -> pb.GetKeyStatusResponse:
        self._actor(context)
        status = await self._keys.status()
        return pb.GetKeyStatusResponse(
            provider=status.provider,
            active_version=status.active_version,
            versions=[status_version_pb(v) for v in status.versions],
        )

    async def RotateKek(
        self, request: pb.RotateKekRequest, context: Context
    ) -> pb.RotateKekResponse:
        actor = self._actor(context)
        row = await self._keys.rotate(actor)
        return pb.RotateKekResponse(
            version=kek_version_pb(row.version, row.state, row.created_at, row.destroyed_at),
            # Rotation adds the highest version and the highest is the active one.
            previous_version=row.version - 1,
        )

    async def RewrapMemberKeys(
        self, request: pb.RewrapMemberKeysRequest, context: Context
    ) -> AsyncIterator[pb.RewrapMemberKeysResponse]:
        actor = self._actor(context)
        if not 0 <= request.batch_size <= MAX_BATCH:
            raise InvalidInput(
                [FieldViolation("batch_size", f"must be 0-{MAX_BATCH} (0: {DEFAULT_BATCH})")]
            )
        progress = self._keys.rewrap(
            actor, batch_size=request.batch_size or DEFAULT_BATCH, dry_run=request.dry_run
        )
        async for step in progress:
            yield pb.RewrapMemberKeysResponse(progress=progress_pb(step))

    async def DestroyKekVersion(
        self, request: pb.DestroyKekVersionRequest, context: Context
    ) -> pb.DestroyKekVersionResponse:
        actor = self._actor(context)
        if request.version < 1:
            raise InvalidInput([FieldViolation("version", "must be a KEK version (1 or more)")])
        if request.dry_run:
            plan = await self._keys.plan_destroy(request.version)
            return pb.DestroyKekVersionResponse(
                version=request.version, allowed=plan.allowed, reason=plan.reason
            )
        # The store re-checks in the destroying transaction and refuses (saying why)
        # with FAILED_PRECONDITION: a plan read here first could be stale.
        row = await self._keys.destroy_version(request.version, actor)
        return pb.DestroyKekVersionResponse(
            version=row.version, destroyed=True, allowed=True, reason="destroyed"
        )

    async def RotateMemberKey(
        self, request: pb.RotateMemberKeyRequest, context: Context
    ) -> pb.RotateMemberKeyResponse:
        actor = self._actor(context)
        check_field_limits(request)  # after the token check: strangers learn nothing
        if not request.member_id:
            raise InvalidInput([FieldViolation("member_id", "must not be empty")])
        dek_id = await self._keys.rotate_member_key(request.member_id, actor)
        return pb.RotateMemberKeyResponse(dek_id=dek_id)

    async def ListKeyEvents(
        self, request: pb.ListKeyEventsRequest, context: Context
    ) -> pb.ListKeyEventsResponse:
        self._actor(context)
        if not 0 <= request.limit <= MAX_EVENTS:
            raise InvalidInput([FieldViolation("limit", f"must be 0-{MAX_EVENTS}")])
        events = await self._keys.events(request.limit or DEFAULT_EVENTS)
        return pb.ListKeyEventsResponse(events=[event_pb(e) for e in events])
