"""The one map from vault errors to gRPC statuses (like Vault's RespondErrorCommon).

Servicers never pick status codes: they let errors rise, and the interceptor in
``service.interceptors`` calls :func:`to_status`. Anything that is not a
``VaultError`` becomes a bare INTERNAL: its text may hold anything, so it is not sent.

Every status carries a ``google.rpc.ErrorInfo`` (AIP-193) whose ``reason`` says which
error it is, in a form a program can switch on: :data:`_CODES` gives each error its
code and reason (the proto comments list the reasons per RPC).
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


class CallerNotAllowed(ServiceError):
    """The calling service has no acceptable identity, or the caller policy does not
    allow it this method or this purpose. ``metadata`` says which (the identity, the
    method, the purpose), never anything from a certificate that was not accepted."""

    def __init__(self, message: str, **metadata: str) -> None:
        super().__init__(message)
        self.metadata = metadata


class MalformedRequest(ServiceError):
    """The request bytes do not parse as the method's message (bad wire format,
    invalid UTF-8 in a string field, nesting past the parser's limit), or the call
    ended without sending one. The bytes are never quoted."""

    reason = "MALFORMED_REQUEST"

    def __init__(self, message: str = "the request message could not be parsed") -> None:
        super().__init__(message)


#: (error, status code, ErrorInfo reason), first match wins. A reason of None is
#: computed from the error (:func:`_reason`).
_CODES: tuple[tuple[type[BaseException], grpc.StatusCode, str | None], ...] = (
    (ve.IdempotencyKeyReused, grpc.StatusCode.INVALID_ARGUMENT, "IDEMPOTENCY_KEY_REUSED"),
    # Withdrawing a membership purpose alone: never valid, whatever the state (the
    # same rule SignUp applies with a field violation); Withdraw is the way.
    (
        ve.PurposeRequiredForMembership,
        grpc.StatusCode.INVALID_ARGUMENT,
        "PURPOSE_REQUIRED_FOR_MEMBERSHIP",
    ),
    (ve.InvalidInput, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    (ve.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS, None),  # LOGIN_ID_TAKEN, EMAIL_TAKEN
    (ve.CorrectionNotFound, grpc.StatusCode.NOT_FOUND, "CORRECTION_NOT_FOUND"),
    # MEMBER_NOT_FOUND, RECIPIENT_NOT_FOUND, KEK_VERSION_NOT_FOUND
    (ve.NotFound, grpc.StatusCode.NOT_FOUND, None),
    # The same reason for a wrong login ID or a wrong password: no oracle.
    # ... and for a locked account (vault.login_guard).
    (ve.AuthenticationFailed, grpc.StatusCode.UNAUTHENTICATED, "WRONG_CREDENTIALS"),
    # Missing, unknown, expired, ended or another member's session: one answer.
    (ve.MemberSessionRequired, grpc.StatusCode.UNAUTHENTICATED, "MEMBER_SESSION_REQUIRED"),
    (ve.PurposeNotAllowed, grpc.StatusCode.PERMISSION_DENIED, "PURPOSE_NOT_CONSENTED"),
    # A grant that predates a policy version in force: the member must answer again.
    (ve.ConsentOutdated, grpc.StatusCode.PERMISSION_DENIED, "CONSENT_OUTDATED"),
    # Provision to a third party with neither the member's consent nor a legal basis
    # (no metadata: the caller knows the recipient it named, and nothing is echoed).
    (ve.NoConsentToProvide, grpc.StatusCode.PERMISSION_DENIED, "NO_CONSENT_TO_PROVIDE"),
    # A pending correction freezes the fields (policy section 7); metadata "fields".
    (ve.CorrectionPending, grpc.StatusCode.FAILED_PRECONDITION, "CORRECTION_PENDING"),
    (ve.CorrectionResolved, grpc.StatusCode.FAILED_PRECONDITION, "CORRECTION_RESOLVED"),
    (ve.PreconditionFailed, grpc.StatusCode.FAILED_PRECONDITION, None),
    # Too much work queued: refused at once, with RetryInfo saying when to retry.
    (ve.Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED, "OVERLOADED"),
    # Too many failed logins from one client IP: RetryInfo says when the window frees.
    (ve.TooManyAttempts, grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_ATTEMPTS"),
    (ve.DecryptionError, grpc.StatusCode.INTERNAL, "DECRYPTION_FAILED"),
    (ve.KeyUnavailable, grpc.StatusCode.UNAVAILABLE, "KEY_UNAVAILABLE"),
    (ve.StorageUnavailable, grpc.StatusCode.UNAVAILABLE, "STORAGE_UNAVAILABLE"),
    # The member kept changing under a per-member key rotation: retry.
    (ve.KeyChanged, grpc.StatusCode.ABORTED, "KEY_CHANGED"),
    # A deadlock or serialization failure: retry.
    (ve.Conflict, grpc.StatusCode.ABORTED, "TRANSACTION_CONFLICT"),
    (AdminUnauthenticated, grpc.StatusCode.UNAUTHENTICATED, "ADMIN_TOKEN_INVALID"),
    (CallerNotAllowed, grpc.StatusCode.PERMISSION_DENIED, "CALLER_NOT_ALLOWED"),
    (MalformedRequest, grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED_REQUEST"),
    (TimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED"),
)
#: Anything else: a bug or a failure whose text may hold anything.
INTERNAL_REASON = "INTERNAL"
#: NotFound's ``what`` -> reason (anything else names a KEK version).
_NOT_FOUND_REASONS = {"member": "MEMBER_NOT_FOUND", "recipient": "RECIPIENT_NOT_FOUND"}
#: PreconditionFailed kinds that name a KEK version's state.
_PRECONDITION_REASONS = {"ACTIVE": "KEK_VERSION_ACTIVE", "IN_USE": "KEK_VERSION_IN_USE"}


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


def _retry_info(seconds: float) -> any_pb2.Any:
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(round(seconds * 1e9))
    return _packed(error_details_pb2.RetryInfo(retry_delay=delay))


def _details(exc: ve.VaultError) -> list[any_pb2.Any]:
    if isinstance(exc, ve.PurposeRequiredForMembership):
        info = error_details_pb2.ErrorInfo(
            reason="PURPOSE_REQUIRED_FOR_MEMBERSHIP",
            domain=DOMAIN,
            metadata={"purpose": exc.purpose, "use": "MemberService/Withdraw"},
        )
        return [_bad_request(exc.violations), _packed(info)]
    if isinstance(exc, ve.InvalidInput):
        return [_bad_request(exc.violations)]
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
    if isinstance(exc, ve.PurposeNotAllowed | ve.ConsentOutdated):
        return [
            _packed(
                error_details_pb2.ErrorInfo(
                    reason=_reason(exc), domain=DOMAIN, metadata={"purpose": exc.purpose}
                )
            )
        ]
    if isinstance(exc, ve.TooManyAttempts):
        return [_retry_info(exc.retry_after)]  # the ErrorInfo comes from the table
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


def _entry(exc: BaseException) -> tuple[grpc.StatusCode, str | None] | None:
    for kind, code, reason in _CODES:
        if isinstance(exc, kind):
            return code, reason
    return None


def code_for(exc: BaseException) -> grpc.StatusCode:
    entry = _entry(exc)
    return grpc.StatusCode.INTERNAL if entry is None else entry[0]


def _reason(exc: BaseException) -> str:
    """The ErrorInfo reason of ``exc`` (AIP-193: UPPER_SNAKE_CASE, at most 63 characters)."""
    entry = _entry(exc)
    if entry is None:
        return INTERNAL_REASON
    if entry[1] is not None:
        return entry[1]
    if isinstance(exc, ve.AlreadyExists):
        return f"{exc.field.upper()}_TAKEN"
    if isinstance(exc, ve.NotFound):
        return _NOT_FOUND_REASONS.get(exc.what, "KEK_VERSION_NOT_FOUND")
    if isinstance(exc, ve.PreconditionFailed):
        default = "FAILED_PRECONDITION" if exc.kind == "STATE" else exc.kind
        return _PRECONDITION_REASONS.get(exc.kind, default)
    return entry[0].name


def _with_error_info(exc: BaseException, details: list[any_pb2.Any]) -> list[any_pb2.Any]:
    """``details`` with an ErrorInfo, added when none of them is one."""
    if any(d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR) for d in details):
        return details
    metadata = exc.metadata if isinstance(exc, CallerNotAllowed) else {}
    if isinstance(exc, ve.CorrectionPending):
        metadata = {"fields": ",".join(exc.fields)}  # field names, never values
    info = error_details_pb2.ErrorInfo(reason=_reason(exc), domain=DOMAIN, metadata=metadata)
    return [*details, _packed(info)]


def to_status(exc: BaseException, request_id: str = "") -> tuple[grpc.StatusCode, str, bytes]:
    """(code, message, serialized google.rpc.Status) for an exception; the Status
    always carries an ErrorInfo."""
    code = code_for(exc)
    if isinstance(exc, ve.VaultError):
        message, details = exc.message, _details(exc)
    elif isinstance(exc, ServiceError):
        message, details = exc.message, []
    elif isinstance(exc, TimeoutError):
        message, details = "deadline exceeded", []
    else:
        message, details = "internal error", []
    details = _with_error_info(exc, details)
    if request_id and code == grpc.StatusCode.INTERNAL:
        details.append(_packed(error_details_pb2.RequestInfo(request_id=request_id)))
    message = message[:MAX_MESSAGE]
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=details)
    return code, message, status.SerializeToString()
