"""The one map from vault errors to gRPC statuses (like Vault's RespondErrorCommon).

Servicers never pick status codes: they let errors rise, and the interceptor in
``service.interceptors`` calls :func:`to_status`. Anything that is not a
``VaultError`` becomes a bare INTERNAL: its text may hold anything, so it is not sent.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from vault import errors as ve

DOMAIN = "privacyvault.v1"


class ServiceError(Exception):
    """Base of the errors the service layer itself raises (the vault raises
    ``VaultError``); like those, its message is sent and never holds a value."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class AdminUnauthenticated(ServiceError):
    """The admin token is missing or wrong: one message for both, so no oracle."""

    def __init__(self) -> None:
        super().__init__("the key admin API needs a valid admin token")


_CODES: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (ve.InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (ve.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (ve.NotFound, grpc.StatusCode.NOT_FOUND),
    (ve.AuthenticationFailed, grpc.StatusCode.UNAUTHENTICATED),
    (ve.PurposeNotAllowed, grpc.StatusCode.PERMISSION_DENIED),
    (ve.PreconditionFailed, grpc.StatusCode.FAILED_PRECONDITION),
    (ve.DecryptionError, grpc.StatusCode.INTERNAL),
    (ve.KeyUnavailable, grpc.StatusCode.UNAVAILABLE),
    (ve.StorageUnavailable, grpc.StatusCode.UNAVAILABLE),
    # The member kept changing under a per-member key rotation: retry.
    (ve.KeyChanged, grpc.StatusCode.ABORTED),
    (ve.Conflict, grpc.StatusCode.ABORTED),  # a deadlock or serialization failure: retry
    (AdminUnauthenticated, grpc.StatusCode.UNAUTHENTICATED),
)


def _packed(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def _details(exc: ve.VaultError) -> list[any_pb2.Any]:
    if isinstance(exc, ve.InvalidInput):
        return [
            _packed(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field=v.field, description=v.description
                        )
                        for v in exc.violations
                    ]
                )
            )
        ]
    if isinstance(exc, ve.AlreadyExists):
        return [
            _packed(
                error_details_pb2.ErrorInfo(
                    reason=f"{exc.field.upper()}_TAKEN",
                    domain=DOMAIN,
                    metadata={"field": exc.field},
                )
            )
        ]
    if isinstance(exc, ve.PurposeNotAllowed):
        return [
            _packed(
                error_details_pb2.ErrorInfo(
                    reason="PURPOSE_NOT_CONSENTED", domain=DOMAIN, metadata={"purpose": exc.purpose}
                )
            )
        ]
    if isinstance(exc, ve.PreconditionFailed):
        return [
            _packed(
                error_details_pb2.PreconditionFailure(
                    violations=[
                        error_details_pb2.PreconditionFailure.Violation(
                            type=exc.kind, subject=exc.subject, description=exc.description
                        )
                    ]
                )
            )
        ]
    return []


def code_for(exc: BaseException) -> grpc.StatusCode:
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


def to_status(exc: BaseException, request_id: str = "") -> tuple[grpc.StatusCode, str, bytes]:
    """(code, message, serialized google.rpc.Status) for an exception."""
    code = code_for(exc)
    if isinstance(exc, ve.VaultError):
        message, details = exc.message, _details(exc)
    elif isinstance(exc, ServiceError):
        message, details = exc.message, []
    else:
        message, details = "internal error", []
    if request_id and code == grpc.StatusCode.INTERNAL:
        details.append(_packed(error_details_pb2.RequestInfo(request_id=request_id)))
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=details)
    return code, message, status.SerializeToString()
