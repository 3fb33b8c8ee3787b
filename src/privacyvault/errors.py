"""Reading the service's rich errors: every error is a ``google.rpc.Status`` in the
``grpc-status-details-bin`` trailer, whose details are ``google.rpc`` messages
(``ErrorInfo`` on every error, ``BadRequest`` on INVALID_ARGUMENT, ``RetryInfo``,
``PreconditionFailure``...). grpcio-status decodes the Status; this adds the one step
it leaves to every caller, finding a detail by its type::

    from google.rpc import error_details_pb2
    from privacyvault.errors import error_detail

    try:
        await members.SignUp(request)
    except grpc.aio.AioRpcError as error:
        info = error_detail(error, error_details_pb2.ErrorInfo)  # info.reason
        bad = error_detail(error, error_details_pb2.BadRequest)
        if bad is not None:
            problems = {v.field: v.description for v in bad.field_violations}

Written by hand (not generated); it needs only grpcio, grpcio-status and
googleapis-common-protos, so it ships in the client-only distribution too.
"""

from __future__ import annotations

from typing import TypeVar, cast

import grpc
from google.protobuf.message import Message
from google.rpc import status_pb2
from grpc_status import rpc_status

__all__ = ["error_detail", "rich_status"]

M = TypeVar("M", bound=Message)


def rich_status(error: grpc.RpcError) -> status_pb2.Status | None:
    """The ``google.rpc.Status`` an error carries, or None when it carries none (an
    error raised by the channel itself, e.g. UNAVAILABLE before any answer).

    ``error`` is what a call raised: ``grpc.aio.AioRpcError`` or the synchronous
    API's ``grpc.RpcError`` (both answer ``code()``, ``details()`` and
    ``trailing_metadata()``). Raises ValueError when the trailer contradicts the
    call's own code or message (grpcio-status's check).
    """
    return rpc_status.from_call(cast(grpc.Call, error))


def error_detail(error: grpc.RpcError | status_pb2.Status, kind: type[M]) -> M | None:
    """The first detail of type ``kind`` (e.g. ``error_details_pb2.BadRequest``) in
    the error's Status (or in a Status already decoded), or None."""
    status = error if isinstance(error, status_pb2.Status) else rich_status(error)
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(kind.DESCRIPTOR):
            found = kind()
            detail.Unpack(found)
            return found
    return None
