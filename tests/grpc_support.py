"""Small helpers for tests that talk gRPC: building requests, reading error details."""

from __future__ import annotations

import itertools

import grpc
from google.rpc import error_details_pb2, status_pb2

from privacyvault.v1 import member_pb2 as pb

CLIENT_IP = (("x-client-ip", "203.0.113.7"),)
_counter = itertools.count(1)


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


def rich_status(error: grpc.aio.AioRpcError) -> status_pb2.Status:
    """The google.rpc.Status an error carries in its trailers."""
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            assert status.code == error.code().value[0]
            assert status.message == error.details()
            return status
    raise AssertionError("the error carries no google.rpc.Status")


def field_violations(error: grpc.aio.AioRpcError) -> dict[str, str]:
    status = rich_status(error)
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            return {v.field: v.description for v in bad.field_violations}
    raise AssertionError("no BadRequest detail")


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    status = rich_status(error)
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    raise AssertionError("no ErrorInfo detail")
