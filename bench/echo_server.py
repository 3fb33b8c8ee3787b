"""The baseline: a bare grpc.aio server answering MemberService.GetMember with a constant member.

It serves the real method path with the real protobuf (de)serializers, so the driver calls it
with the very stub and requests it sends to the service: both sides pay the same HTTP/2
framing, protobuf parsing and serialization, and a response of the same shape and size
(an IDENTIFICATION view: member_id, login_id, name, email, timestamps, two consents). Raw
bytes would make the baseline cheaper than any protobuf servicer can be and inflate the
gap; the difference measured against GetMember is then exactly the service's own work
(authorization, store lookup, DEK unwrap, field decryption, interceptors).

Configured like the service, from PRIVACY_VAULT_LISTEN_ADDRESS and, for the mTLS
comparison (bench/run.py --tls), PRIVACY_VAULT_TLS_CERT_FILE, PRIVACY_VAULT_TLS_KEY_FILE and
PRIVACY_VAULT_TLS_CLIENT_CA_FILE (client certificates required); it serves grpc.health.v1
for readiness and uses a default ``grpc.aio.server()`` on asyncio's own event loop
(``PRIVACY_VAULT_EVENT_LOOP=uvloop`` puts it on uvloop, the service's default loop). The
service sets only limits (message sizes, no SO_REUSEPORT), no throughput tuning, so
neither side is tuned.
It also answers MemberService.Authenticate and SignUp the barest way a gRPC server can
check or hash a password: argon2-cffi's verify of the request's password against one
hash made at start, or its hash of the request's password, on a thread pool of one
thread per usable CPU (the service's default pool), with the argon2 costs of
PRIVACY_VAULT_ARGON2_* (the service's); the answers have the service's shape (a member
id, and a 43-character session token). Against raw argon2 they are the floor that the
gRPC framework and the client's own work leave on the machine; against the service's
RPCs, the difference is the service's own work around the hash (for a login: failure
counters, lookups, DEK, session, access log, the write; for a sign-up: validation, blind
indexes, a new DEK, the encrypted fields, the write).

Run: ``python bench/echo_server.py`` (the privacyvault stubs must be importable).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
from argon2 import PasswordHasher, Type
from argon2.exceptions import VerificationError
from driver import PASSWORD
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from privacyvault.v1 import member_pb2
from vault.passwords import usable_cpus

_CREATED = Timestamp(seconds=1_700_000_000)
_SEEN = Timestamp(seconds=1_750_000_000)
_TEMPLATE = member_pb2.Member(
    login_id="bench-member-0001",
    name="Bench Member",
    email="bench-member-0001@example.com",
    created_at=_CREATED,
    last_seen_at=_SEEN,
    consents=[
        member_pb2.Consent(
            purpose=purpose, granted=True, policy_version="2025-01-01", recorded_at=_CREATED
        )
        for purpose in (member_pb2.PURPOSE_INQUIRY, member_pb2.PURPOSE_STATISTICS)
    ],
)


async def get_member(
    request: member_pb2.GetMemberRequest, context: Any
) -> member_pb2.GetMemberResponse:
    member = member_pb2.Member()
    member.CopyFrom(_TEMPLATE)
    member.member_id = request.member_id
    return member_pb2.GetMemberResponse(member=member)


class _Passwords:
    """argon2id on a thread pool, the barest way: Authenticate verifies the request's
    password against one hash made at start, SignUp hashes it and answers a new id."""

    def __init__(self, password: str) -> None:
        env = os.environ.get
        self._hasher = PasswordHasher(
            time_cost=int(env("PRIVACY_VAULT_ARGON2_TIME_COST", "2")),
            memory_cost=int(env("PRIVACY_VAULT_ARGON2_MEMORY_COST", "19456")),
            parallelism=int(env("PRIVACY_VAULT_ARGON2_PARALLELISM", "1")),
            hash_len=32,
            salt_len=16,
            type=Type.ID,
        )
        self._encoded = self._hasher.hash(password)
        # The service pool's default size (affinity and cgroup quota).
        self._pool = ThreadPoolExecutor(usable_cpus(), thread_name_prefix="argon2")
        self._member_id = str(uuid.uuid4())

    def _verify(self, password: str) -> bool:
        try:
            return bool(self._hasher.verify(self._encoded, password))
        except VerificationError:
            return False

    async def authenticate(
        self, request: member_pb2.AuthenticateRequest, context: Any
    ) -> member_pb2.AuthenticateResponse:
        loop = asyncio.get_running_loop()
        if not await loop.run_in_executor(self._pool, self._verify, request.password):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "wrong password")
        return member_pb2.AuthenticateResponse(
            member_id=self._member_id, session_token=secrets.token_urlsafe(32)
        )

    async def sign_up(
        self, request: member_pb2.SignUpRequest, context: Any
    ) -> member_pb2.SignUpResponse:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._pool, self._hasher.hash, request.password)
        return member_pb2.SignUpResponse(member_id=str(uuid.uuid4()))


def _mtls_credentials() -> grpc.ServerCredentials | None:
    """The same TLS as the service's (mTLS, client certificates required), if configured."""
    files = [os.environ.get(f"PRIVACY_VAULT_TLS_{n}_FILE") for n in ("CERT", "KEY", "CLIENT_CA")]
    if not all(files):
        return None
    cert, key, ca = (Path(f).read_bytes() for f in files if f)
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=True
    )


async def serve(address: str) -> None:
    server = grpc.aio.server()
    passwords = _Passwords(PASSWORD)
    handlers = {
        "GetMember": grpc.unary_unary_rpc_method_handler(
            get_member,
            request_deserializer=member_pb2.GetMemberRequest.FromString,
            response_serializer=member_pb2.GetMemberResponse.SerializeToString,
        ),
        "Authenticate": grpc.unary_unary_rpc_method_handler(
            passwords.authenticate,
            request_deserializer=member_pb2.AuthenticateRequest.FromString,
            response_serializer=member_pb2.AuthenticateResponse.SerializeToString,
        ),
        "SignUp": grpc.unary_unary_rpc_method_handler(
            passwords.sign_up,
            request_deserializer=member_pb2.SignUpRequest.FromString,
            response_serializer=member_pb2.SignUpResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("privacyvault.v1.MemberService", handlers),)
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    credentials = _mtls_credentials()
    if credentials is None:
        server.add_insecure_port(address)
    else:
        server.add_secure_port(address, credentials)
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=1)


if __name__ == "__main__":
    address = os.environ.get("PRIVACY_VAULT_LISTEN_ADDRESS", "127.0.0.1:50051")
    # asyncio's own loop, grpc.aio's default, unless bench/run.py --echo-event-loop uvloop.
    if os.environ.get("PRIVACY_VAULT_EVENT_LOOP") == "uvloop":
        import uvloop

        uvloop.run(serve(address))
    else:
        asyncio.run(serve(address))
