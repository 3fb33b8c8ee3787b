"""The vault's error tree.

Every error the vault raises on purpose is a :class:`VaultError` subclass; caller
mistakes in the Python API itself stay plain ``ValueError``/``TypeError``. No
message here ever carries a submitted value, a plaintext or key material: the
gRPC layer turns these into statuses one-for-one (``service.errors``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One invalid request field; ``description`` says what is wrong, never the value."""

    field: str
    description: str


class VaultError(Exception):
    """Base of the vault's errors; never raised bare."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(VaultError):
    """The request is malformed; ``violations`` names each bad field."""

    def __init__(self, violations: Iterable[FieldViolation]) -> None:
        self.violations = tuple(violations)
        if not self.violations:
            raise ValueError("InvalidInput needs at least one violation")
        fields = ", ".join(v.field for v in self.violations)
        super().__init__(f"invalid request fields: {fields}")


class AlreadyExists(VaultError):
    """A unique field is taken. Only the field's name is said, never its value."""

    def __init__(self, field: str, what: str = "a member") -> None:
        self.field = field
        super().__init__(f"{what} with this {field} already exists")


class NotFound(VaultError):
    """The member does not exist, or has been destroyed."""

    def __init__(self, what: str = "member") -> None:
        self.what = what
        super().__init__(f"{what} not found")


class AuthenticationFailed(VaultError):
    """Wrong credentials. The same error whether the login ID or the password was wrong."""

    def __init__(self) -> None:
        super().__init__("invalid credentials")


class MemberSessionRequired(VaultError):
    """The call is one of the member's own rights and carries no live session of
    that member: one error for a missing, malformed, unknown, expired or ended
    session, another member's, and an unknown member id (no oracle)."""

    def __init__(self) -> None:
        super().__init__("this call needs the member's session (x-member-session)")


class TooManyAttempts(VaultError):
    """Too many failed logins from one client IP (across accounts): refused before
    any password is checked. ``retry_after`` is when the window frees, in seconds."""

    def __init__(self, retry_after: float) -> None:
        self.retry_after = retry_after
        super().__init__("too many failed login attempts from this client; retry later")


class IdempotencyKeyReused(InvalidInput):
    """A request_id already used for a different request (AIP-155)."""

    def __init__(self) -> None:
        super().__init__([FieldViolation("request_id", "was already used for a different request")])


class PurposeNotAllowed(VaultError):
    """The member has not consented to (or has refused) the stated purpose."""

    def __init__(self, purpose: str) -> None:
        self.purpose = purpose
        super().__init__(f"the member has not consented to the purpose {purpose}")


class ConsentOutdated(VaultError):
    """The member's consent to the stated purpose predates a policy version that
    materially changed the purpose: they must consent again (UpdateConsents)."""

    def __init__(self, purpose: str) -> None:
        self.purpose = purpose
        super().__init__(
            f"the member's consent to the purpose {purpose} predates a material change of "
            "the privacy policy; the member must consent again"
        )


class NoConsentToProvide(VaultError):
    """Provision to a third party without the member's consent to provision to that
    recipient and without a recorded legal basis (policy section 4)."""

    def __init__(self, recipient_id: str) -> None:
        self.recipient_id = recipient_id
        super().__init__(
            "the member has not consented to provision to this recipient, and no legal "
            "basis was given"
        )


class PurposeRequiredForMembership(InvalidInput):
    """A membership purpose cannot be withdrawn alone: ending it is ending the
    membership (Withdraw). ``field`` is the request field that asked for it."""

    def __init__(self, field: str, purpose: str) -> None:
        self.purpose = purpose
        super().__init__(
            [
                FieldViolation(
                    field,
                    f"{purpose} is part of membership and cannot be withdrawn alone; to end "
                    "it, withdraw from membership (MemberService.Withdraw)",
                )
            ]
        )


class PreconditionFailed(VaultError):
    """The system is not in a state that allows the operation."""

    def __init__(self, subject: str, description: str, kind: str = "STATE") -> None:
        self.subject = subject
        self.description = description
        self.kind = kind
        super().__init__(description)


class DecryptionError(VaultError):
    """Any failure to decrypt or unwrap: one opaque error, so it is no oracle."""

    def __init__(self) -> None:
        super().__init__("data could not be decrypted")


class KeyUnavailable(VaultError):
    """The key provider could not supply a key (missing version, HSM down)."""

    def __init__(self, description: str = "a key-encryption key is unavailable") -> None:
        super().__init__(description)


class StorageUnavailable(VaultError):
    """The database could not be reached; the operation may be retried."""

    def __init__(self, description: str = "the database is unavailable") -> None:
        super().__init__(description)


class Overloaded(VaultError):
    """Too much of some work (password hashing, account recovery) is already queued:
    refused at once instead of queued past every caller's deadline. ``retry_after``
    is the suggested wait in seconds; ``resource`` names the work, never a value."""

    def __init__(self, retry_after: float, resource: str) -> None:
        self.retry_after = retry_after
        self.resource = resource
        super().__init__(f"the server is busy ({resource}); retry later")


class KeyChanged(VaultError):
    """The member's DEK was rotated while an operation was under way; retry it."""

    def __init__(self) -> None:
        super().__init__("the member's key changed during the operation; retry")


class Conflict(VaultError):
    """The database rolled this transaction back to settle a conflict with a
    concurrent one (a deadlock or a serialization failure): nothing of it was
    written, and the operation may be retried."""

    def __init__(self) -> None:
        super().__init__("the operation conflicted with a concurrent one; retry")


class CorrectionPending(PreconditionFailed):
    """The read names fields a pending correction freezes (policy section 7: not
    used or provided until the correction is complete). ``fields`` are field names."""

    def __init__(self, fields: frozenset[str]) -> None:
        self.fields = tuple(sorted(fields))
        super().__init__(
            "member",
            "a correction the member requested is pending for "
            f"{', '.join(self.fields)}: not used until it is resolved",
            kind="CORRECTION_PENDING",
        )


class CorrectionNotFound(NotFound):
    """The member has no correction with that id."""

    def __init__(self) -> None:
        super().__init__("correction")


class CorrectionResolved(PreconditionFailed):
    """The correction is no longer pending (applied or closed already)."""

    def __init__(self, state: str) -> None:
        super().__init__(
            "correction", f"the correction is {state} already", kind="CORRECTION_RESOLVED"
        )
