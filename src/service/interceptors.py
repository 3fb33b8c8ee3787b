"""The server's one interceptor: request ids, default deadlines, error mapping, RPC logs.

Servicers raise; this turns what they raise into a status through
``service.errors.to_status``. It logs the method, code and duration of each
call, never a request or response field.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import structlog

from service.errors import to_status

log = structlog.get_logger("service.rpc")
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")

_REQUEST_ID_KEY = "x-request-id"
_MAX_REQUEST_ID = 64


def _request_id(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == _REQUEST_ID_KEY and isinstance(value, str) and value.isprintable():
            return value[:_MAX_REQUEST_ID]
    return uuid.uuid4().hex


def _frames(exc: BaseException) -> list[str]:
    # Where it failed, without the exception's text (which may quote data).
    return [f"{f.filename}:{f.lineno} {f.name}" for f in traceback.extract_tb(exc.__traceback__)]


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, default_deadline: float) -> None:
        self._default_deadline = default_deadline

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method: str = handler_call_details.method
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(method, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(method, handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _timeout(self, context: grpc.aio.ServicerContext[Any, Any]) -> float | None:
        return self._default_deadline if context.time_remaining() is None else None

    def _unary(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            rid = _request_id(context)
            token = request_id_var.set(rid)
            started = time.perf_counter()
            try:
                async with asyncio.timeout(self._timeout(context)):
                    response = await behavior(request, context)
            except Exception as exc:  # noqa: BLE001 - the one place errors become statuses
                await self._abort(context, method, rid, started, exc)
            finally:
                request_id_var.reset(token)
            _log_ok(method, rid, started)
            return response

        return wrapped

    def _stream(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def wrapped(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            rid = _request_id(context)
            token = request_id_var.set(rid)
            started = time.perf_counter()
            try:
                async with asyncio.timeout(self._timeout(context)):
                    async for item in behavior(request, context):
                        yield item
            except Exception as exc:  # noqa: BLE001 - the one place errors become statuses
                await self._abort(context, method, rid, started, exc)
            finally:
                request_id_var.reset(token)
            _log_ok(method, rid, started)

        return wrapped

    async def _abort(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        method: str,
        rid: str,
        started: float,
        exc: Exception,
    ) -> None:
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
        trailers: list[tuple[str, str | bytes]] = [(_REQUEST_ID_KEY, rid)]
        if details:
            trailers.append(("grpc-status-details-bin", details))
        await context.abort(code, message, trailing_metadata=tuple(trailers))


def _log_ok(method: str, rid: str, started: float) -> None:
    log.debug(
        "rpc_ok",
        method=method,
        request_id=rid,
        duration_ms=round((time.perf_counter() - started) * 1000, 2),
    )
