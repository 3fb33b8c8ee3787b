"""The server's one interceptor: request ids, default deadlines, error mapping, RPC logs.

Servicers raise; this turns what they raise into a status through
``service.errors.to_status``. It logs the method, code and duration of each
call, never a request or response field.

It wraps each method handler once, when a servicer is registered
(:func:`add_servicer`), rather than as a ``grpc.aio.ServerInterceptor``: grpc.aio
runs those through an extra coroutine per call, which cost a bare server 18% of
its throughput in our measurements (bench/README.md).
"""

from __future__ import annotations

import asyncio
import os
import time
import traceback
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import grpc
import structlog
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor

from service.errors import to_status
from service.logs import debug_enabled

log = structlog.get_logger("service.rpc")

REQUEST_ID_KEY = "x-request-id"
_MAX_REQUEST_ID = 64

Context = grpc.aio.ServicerContext[Any, Any]
UnaryBehavior = Callable[[Any, Context], Coroutine[Any, Any, Any]]
StreamBehavior = Callable[[Any, Context], AsyncIterator[Any]]


def metadata_value(context: Context, key: str) -> str:
    """A text metadata value sent by the client, or ''."""
    for item in context.invocation_metadata() or ():
        if item[0] == key and isinstance(item[1], str):
            return item[1]
    return ""


def _request_id(context: Context) -> str:
    sent = metadata_value(context, REQUEST_ID_KEY)
    if sent and sent.isprintable():
        return sent[:_MAX_REQUEST_ID]
    return os.urandom(16).hex()


def _frames(exc: BaseException) -> list[str]:
    # Where it failed, without the exception's text (which may quote data).
    return [f"{f.filename}:{f.lineno} {f.name}" for f in traceback.extract_tb(exc.__traceback__)]


class ServiceInterceptor:
    def __init__(self, default_deadline: float) -> None:
        self._default_deadline = default_deadline

    # The request id is read (or made) only when something is logged or sent
    # back: a successful call at info level pays for neither.
    def unary(self, method: str, behavior: UnaryBehavior) -> UnaryBehavior:
        async def wrapped(request: Any, context: Context) -> Any:
            started = time.perf_counter()
            try:
                if context.time_remaining() is None:
                    async with asyncio.timeout(self._default_deadline):
                        response = await behavior(request, context)
                else:  # gRPC enforces the caller's own deadline
                    response = await behavior(request, context)
            except Exception as exc:  # noqa: BLE001 - the one place errors become statuses
                await self._abort(context, method, started, exc)
            if debug_enabled():
                _log_ok(context, method, started)
            return response

        return wrapped

    def stream(self, method: str, behavior: StreamBehavior) -> StreamBehavior:
        async def wrapped(request: Any, context: Context) -> AsyncIterator[Any]:
            started = time.perf_counter()
            # No default deadline here: a stream (a re-wrap of a million keys)
            # runs until it is done or the caller cancels or sets a deadline.
            try:
                async for item in behavior(request, context):
                    yield item
            except Exception as exc:  # noqa: BLE001 - the one place errors become statuses
                await self._abort(context, method, started, exc)
            if debug_enabled():
                _log_ok(context, method, started)

        return wrapped

    async def _abort(self, context: Context, method: str, started: float, exc: Exception) -> None:
        rid = _request_id(context)
        if isinstance(exc, TimeoutError):
            code, message, details = grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded", b""
        else:
            code, message, details = to_status(exc, rid)
        fields: dict[str, Any] = {
            "method": method,
            "code": code.name,
            "request_id": rid,
            "duration_ms": round((time.perf_counter() - started) * 1000, 2),
        }
        if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
            log.error("rpc_failed", error_type=type(exc).__name__, frames=_frames(exc), **fields)
        elif code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            log.warning("rpc_failed", error_type=type(exc).__name__, **fields)
        else:
            log.info("rpc_refused", **fields)
        trailers: list[tuple[str, str | bytes]] = [(REQUEST_ID_KEY, rid)]
        if details:
            trailers.append(("grpc-status-details-bin", details))
        await context.abort(code, message, trailing_metadata=tuple(trailers))


def _log_ok(context: Context, method: str, started: float) -> None:
    log.debug(
        "rpc_ok",
        method=method,
        request_id=_request_id(context),
        duration_ms=round((time.perf_counter() - started) * 1000, 2),
    )


def add_servicer(
    server: grpc.aio.Server,
    servicer: object,
    service: ServiceDescriptor,
    interceptor: ServiceInterceptor,
) -> None:
    """Register ``servicer``'s methods for ``service``, each wrapped by ``interceptor``.

    Built from the service descriptor, like the generated ``add_*_to_server``.
    """
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in service.methods:
        path = f"/{service.full_name}/{method.name}"
        behavior = getattr(servicer, method.name)
        request = message_factory.GetMessageClass(method.input_type)
        response = message_factory.GetMessageClass(method.output_type)
        if method.client_streaming:
            raise NotImplementedError("client-streaming methods are not used by this API")
        make = (
            grpc.unary_stream_rpc_method_handler
            if method.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        wrap = interceptor.stream if method.server_streaming else interceptor.unary
        handlers[method.name] = make(
            wrap(path, behavior),
            request_deserializer=request.FromString,
            response_serializer=response.SerializeToString,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)
