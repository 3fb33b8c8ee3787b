"""Small helpers for tests that talk gRPC: a test server's settings, building requests
(member and admin), reading error details."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

from privacyvault import errors
from privacyvault.v1 import member_pb2 as pb
from privacyvault.v1.member_pb2_grpc import MemberServiceStub
from service.config import Settings
from service.server import RunningServer
from vault import CHEAPEST

CLIENT_IP = (("x-client-ip", "203.0.113.7"),)
#: The metadata key the member's own-rights calls carry their session in.
SESSION_KEY = "x-member-session"
Metadata = tuple[tuple[str, str], ...]
#: The admin token of the test servers that serve KeyAdminService (``admin_settings``).
ADMIN_TOKEN = "test-admin-token-0123456789abcdef"
_counter = itertools.count(1)


def embedded_settings(data_dir: Path, **overrides: Any) -> Settings:
    """Settings for a test server: port 0, the cheapest argon2, no shutdown grace, and
    no in-process lifecycle sidecar (it would run rounds on real time); SQLite in
    ``data_dir`` unless ``database_url`` is given."""
    fields: dict[str, Any] = {
        "data_dir": data_dir,
        "listen_address": "127.0.0.1:0",
        "argon2_time_cost": CHEAPEST.time_cost,
        "argon2_memory_cost": CHEAPEST.memory_cost,
        "argon2_parallelism": CHEAPEST.parallelism,
        "shutdown_grace_seconds": 0,
        "sidecar_in_process": False,
    }
    return Settings(**(fields | overrides))


#: For tests that send many wrong passwords on purpose (the field-limit walk, the
#: fuzzer) and must keep logging in: no account lock and no per-IP throttle within
#: the test (every wrong password counts, vault.login_guard).
NO_LOCKOUT: dict[str, Any] = {"login_lock_after": 99, "login_ip_failure_limit": 1_000_000}


def admin_metadata(actor: str) -> tuple[tuple[str, str], tuple[str, str]]:
    """What an admin call sends: the bearer token and the actor it is recorded under."""
    return (("authorization", f"Bearer {ADMIN_TOKEN}"), ("x-actor", actor))


def sign_up_request(**overrides: object) -> pb.SignUpRequest:
    """A valid sign-up with unique login ID and e-mail; override any field."""
    n = next(_counter)
    fields: dict[str, object] = {
        "login_id": f"member{n:05d}",
        "password": "a long passphrase 1",
        "name": f"Member Number{n}",
        "email": f"member{n:05d}@example.com",
        "birth_date": "1990-04-01",
    }
    fields.update(overrides)
    return pb.SignUpRequest(**fields)  # type: ignore[arg-type]


async def member_session(
    members: MemberServiceStub, request: pb.SignUpRequest, password: str | None = None
) -> Metadata:
    """Log the member of ``request`` in (Authenticate, recorded in their access log)
    and return what their own-rights calls send: ``(("x-member-session", token),)``."""
    auth = await members.Authenticate(
        pb.AuthenticateRequest(login_id=request.login_id, password=password or request.password),
        metadata=CLIENT_IP,
    )
    assert auth.session_token
    return ((SESSION_KEY, auth.session_token),)


async def vault_session(server: RunningServer, member_id: str) -> Metadata:
    """A session started by the server's vault itself (``Vault.sessions.start``, what
    Authenticate does after the password check), for tests whose assertions count the
    member's access-log entries: an Authenticate would add one. Tests of the login
    itself use :func:`member_session`."""
    return ((SESSION_KEY, await server.vault.sessions.start(member_id)),)


async def signed_in(members: MemberServiceStub, **overrides: object) -> tuple[str, Metadata]:
    """A new member (``sign_up_request(**overrides)``), logged in: (member id, session)."""
    request = sign_up_request(**overrides)
    member_id = (await members.SignUp(request)).member_id
    return member_id, await member_session(members, request)


def rich_status(error: grpc.aio.AioRpcError) -> status_pb2.Status:
    """The google.rpc.Status an error carries in its trailers (its code and message
    the call's own: grpcio-status checks them)."""
    status = errors.rich_status(error)
    assert status is not None, "the error carries no google.rpc.Status"
    return status


def _detail(error: grpc.aio.AioRpcError, kind: type[errors.M]) -> errors.M:
    found = errors.error_detail(rich_status(error), kind)
    assert found is not None, f"no {kind.DESCRIPTOR.name} detail"
    return found


def field_violations(error: grpc.aio.AioRpcError) -> dict[str, str]:
    bad = _detail(error, error_details_pb2.BadRequest)
    return {v.field: v.description for v in bad.field_violations}


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    return _detail(error, error_details_pb2.ErrorInfo)


def precondition_violation(
    error: grpc.aio.AioRpcError,
) -> error_details_pb2.PreconditionFailure.Violation:
    """The one violation of the PreconditionFailure detail an error carries."""
    failure = _detail(error, error_details_pb2.PreconditionFailure)
    assert len(failure.violations) == 1
    return failure.violations[0]
