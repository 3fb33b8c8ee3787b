"""The one map from vault errors to gRPC statuses (like Vault's RespondErrorCommon).

Servicers never pick status codes: they let errors rise, and the interceptor in
``service.interceptors`` calls :func:`to_status`. Anything that is not a
``VaultError`` becomes a bare INTERNAL: its text may hold anything, so it is not sent.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from vault import errors as ve

DOMAIN = "privacyvault.v1"
#: What one error may carry back: a status travels in a trailer, which clients refuse
#: past a few KiB (grpc's default limit for all metadata is 8 KiB).
MAX_VIOLATIONS = 20
MAX_DESCRIPTION = 200
MAX_MESSAGE = 300
MAX_DETAILS_BYTES = 2048


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


class MalformedRequest(ServiceError):
    """The request bytes do not parse as the method's message (bad wire format,
    invalid UTF-8 in a string field, nesting past the parser's limit), or the call
    ended without sending one. The bytes are never quoted."""

    reason = "MALFORMED_REQUEST"

    def __init__(self, message: str = "the request message could not be parsed") -> None:
        super().__init__(message)


_CODES: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (ve.InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (ve.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (ve.NotFound, grpc.StatusCode.NOT_FOUND),
    (ve.AuthenticationFailed, grpc.StatusCode.UNAUTHENTICATED),
    (ve.MemberSessionRequired, grpc.StatusCode.UNAUTHENTICATED),
    (ve.PurposeNotAllowed, grpc.StatusCode.PERMISSION_DENIED),
    (ve.PreconditionFailed, grpc.StatusCode.FAILED_PRECONDITION),
    # Too many failed logins from one client IP: RetryInfo says when the window frees.
    (ve.TooManyAttempts, grpc.StatusCode.RESOURCE_EXHAUSTED),
    # Too much work queued: refused at once, with RetryInfo saying when to retry.
    (ve.Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ve.DecryptionError, grpc.StatusCode.INTERNAL),
    (ve.KeyUnavailable, grpc.StatusCode.UNAVAILABLE),
    (ve.StorageUnavailable, grpc.StatusCode.UNAVAILABLE),
    # The member kept changing under a per-member key rotation: retry.
    (ve.KeyChanged, grpc.StatusCode.ABORTED),
    (ve.Conflict, grpc.StatusCode.ABORTED),  # a deadlock or serialization failure: retry
    (AdminUnauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (MalformedRequest, grpc.StatusCode.INVALID_ARGUMENT),
)


def _packed(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def _bad_request(violations: tuple[ve.FieldViolation, ...]) -> any_pb2.Any:
    # Bounded in count and size, so no request can make its own error too big to send.
    bad = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(
                field=v.field[:MAX_DESCRIPTION], description=v.description[:MAX_DESCRIPTION]
            )
            for v in violations[:MAX_VIOLATIONS]
        ]
    )
    while len(bad.field_violations) > 1 and bad.ByteSize() > MAX_DETAILS_BYTES:
        del bad.field_violations[-1]
    return _packed(bad)


#: Errors told apart by an ErrorInfo reason alone (no metadata: nothing to say
#: about the account, which these must not reveal).
_REASONS: tuple[tuple[type[ve.VaultError], str], ...] = (
    (ve.MemberSessionRequired, "MEMBER_SESSION_REQUIRED"),
    # Wrong password, unknown login ID, locked account: one and the same.
    (ve.AuthenticationFailed, "WRONG_CREDENTIALS"),
)


def _error_info(reason: str) -> any_pb2.Any:
    return _packed(error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN))


def _retry_info(seconds: float) -> any_pb2.Any:
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(round(seconds * 1e9))
    return _packed(error_details_pb2.RetryInfo(retry_delay=delay))


def _details(exc: ve.VaultError) -> list[any_pb2.Any]:
    if isinstance(exc, ve.IdempotencyKeyReused):
        return [_bad_request(exc.violations), _error_info("IDEMPOTENCY_KEY_REUSED")]
    if isinstance(exc, ve.TooManyAttempts):
        return [_retry_info(exc.retry_after), _error_info("TOO_MANY_ATTEMPTS")]
    if isinstance(exc, ve.InvalidInput):
        return [_bad_request(exc.violations)]
    for kind, reason in _REASONS:
        if isinstance(exc, kind):
            return [_error_info(reason)]
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
    if isinstance(exc, ve.Overloaded):
        return [
            _retry_info(exc.retry_after),
            _packed(
                error_details_pb2.ErrorInfo(
                    reason="OVERLOADED", domain=DOMAIN, metadata={"resource": exc.resource}
                )
            ),
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
    elif isinstance(exc, MalformedRequest):
        info = error_details_pb2.ErrorInfo(reason=exc.reason, domain=DOMAIN)
        message, details = exc.message, [_packed(info)]
    elif isinstance(exc, ServiceError):
        message, details = exc.message, []
    else:
        message, details = "internal error", []
    if request_id and code == grpc.StatusCode.INTERNAL:
        details.append(_packed(error_details_pb2.RequestInfo(request_id=request_id)))
    message = message[:MAX_MESSAGE]
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=details)
    return code, message, status.SerializeToString()
