"""The server's one interceptor: request ids, default deadlines, error mapping, RPC logs.

Servicers raise; this turns what they raise into a status through
``service.errors.to_status``. It logs the method, code and duration of each
call, never a request or response field.

It wraps each method handler once, when a servicer is registered
(:func:`add_servicer`), rather than as a ``grpc.aio.ServerInterceptor``: grpc.aio
runs those through an extra coroutine per call, which cost a bare server 18% of
its throughput in our measurements (bench/README.md).

It also reads the request itself. grpc.aio's unary handlers never run when a call
ends without a message (HEADERS with END_STREAM): grpc returns without a status and
the call stays open, holding memory, until the connection goes. So every method is
registered as request-streaming, and the wrapper reads the one message, under the
default deadline: a call that sends none, or bytes that do not parse, gets
INVALID_ARGUMENT through the one error map like any other bad request.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import re
import time
import traceback
from collections.abc import AsyncIterator, Callable, Collection, Coroutine, Sequence
from typing import Any, Protocol

import grpc
import structlog
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor

from service.errors import MalformedRequest, to_status
from service.logs import debug_enabled
from vault.calls import current_caller

log = structlog.get_logger("service.rpc")


class _WithoutSubmittedBytes(logging.Filter):
    """grpc logs a metadata value that is not UTF-8 as it came ("Invalid encoding on
    b'...'", with a traceback): the caller's bytes must not reach a log line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != "Invalid encoding on %s"


logging.getLogger("grpc._cython.cygrpc").addFilter(_WithoutSubmittedBytes())

REQUEST_ID_KEY = "x-request-id"
_MAX_REQUEST_ID = 64
# ASCII only: the id goes back in a trailer, and a header value outside visible
# ASCII makes the client fail the call with INTERNAL instead of its real status.
_SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9_.:-]+")

# What the request deserializer returns for bytes that do not parse.
_MALFORMED = object()
_EOF: object = grpc.aio.EOF

Context = grpc.aio.ServicerContext[Any, Any]
UnaryBehavior = Callable[[Any, Context], Coroutine[Any, Any, Any]]
# A stream yields its messages, or (grpc's health Watch) writes them itself.
StreamBehavior = Callable[[Any, Context], AsyncIterator[Any] | Coroutine[Any, Any, None]]


def metadata_value(context: Context, key: str) -> str:
    """A text metadata value sent by the client, or ''."""
    for item in context.invocation_metadata() or ():
        if item[0] == key and isinstance(item[1], str):
            return item[1]
    return ""


def _request_id(context: Context) -> str:
    sent = metadata_value(context, REQUEST_ID_KEY)
    if sent and _SAFE_REQUEST_ID.fullmatch(sent):
        return sent[:_MAX_REQUEST_ID]
    return os.urandom(16).hex()  # never echo an id we would not send ourselves


def _lenient(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """``parse``, returning a sentinel instead of raising: grpc calls the deserializer
    outside any handler, so its exception would become UNKNOWN with the parser's text."""

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception:  # noqa: BLE001 - DecodeError, RecursionError...: all the caller's
            return _MALFORMED

    return deserialize


def _checked(request: Any) -> Any:
    if request is _MALFORMED:
        raise MalformedRequest
    if request is _EOF:
        raise MalformedRequest("the call ended without a request message")
    return request


Accept = Callable[[Any, "Context"], Any]
#: Says who is calling and whether the caller may make this call (the caller policy):
#: raises to refuse, and sets the caller (vault.calls) for the rest of the call.
Authorize = Callable[[Any, "Context"], None]
#: Builds the ``Authorize`` of one method from its path and descriptor.
Authorization = Callable[[str, MethodDescriptor], Authorize]


def _accept_checked(request: Any, context: Context) -> Any:
    return _checked(request)


def _accepting(validate: Callable[[Any], None] | None, authorize: Authorize | None) -> Accept:
    """What the wrapper does with a parsed request: refuse the malformed, authorize the
    caller, then run the service's own ``validate`` (its field limits)."""
    if validate is None and authorize is None:
        return _accept_checked

    def accept(request: Any, context: Context) -> Any:
        checked = _checked(request)
        if authorize is not None:
            authorize(checked, context)
        if validate is not None:
            validate(checked)
        return checked

    return accept


class _SlowReads:
    """Cancels the wait for a request message after ``limit`` seconds, for calls whose
    own deadline is longer: a caller must not hold a call open by sending nothing.

    One sweep for every such call instead of a timer each: an ``asyncio.timeout`` costs
    a few microseconds per call, and callers with long deadlines are the common case.
    """

    def __init__(self, limit: float) -> None:
        self._limit = limit
        self._period = min(limit / 4, 1.0)
        self._waiting: dict[asyncio.Task[Any], float] = {}
        self._expired: set[asyncio.Task[Any]] = set()
        self._sweeper: asyncio.Task[None] | None = None

    def watch(self) -> asyncio.Task[Any]:
        task = asyncio.current_task()
        assert task is not None
        self._waiting[task] = time.monotonic() + self._limit
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        return task

    def unwatch(self, task: asyncio.Task[Any]) -> None:
        self._waiting.pop(task, None)

    def expired(self, task: asyncio.Task[Any]) -> bool:
        """Whether the sweep cancelled ``task`` (then the cancellation is taken back)."""
        if task not in self._expired:
            return False
        self._expired.discard(task)
        task.uncancel()
        return True

    async def _sweep(self) -> None:
        try:
            while self._waiting:
                await asyncio.sleep(self._period)
                now = time.monotonic()
                for task, due in list(self._waiting.items()):
                    if due <= now:
                        del self._waiting[task]
                        self._expired.add(task)
                        task.cancel()
        finally:
            self._sweeper = None

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper


def _frames(exc: BaseException) -> list[str]:
    # Where it failed, without the exception's text (which may quote data).
    return [f"{f.filename}:{f.lineno} {f.name}" for f in traceback.extract_tb(exc.__traceback__)]


class CallLayer(Protocol):
    """Something around every call of a method, added at registration (metrics,
    tracing): it returns the handler it was given, or a handler that calls it. With no
    layer a call runs the request wrapper alone, at no cost for what is switched off."""

    def unary(self, path: str, handler: Any) -> Any: ...
    def stream(self, path: str, handler: Any) -> Any: ...


#: Told of every refused call (the metrics count the caller policy's refusals).
Refused = Callable[[str, BaseException], None]


class ServiceInterceptor:
    def __init__(
        self,
        default_deadline: float,
        *,
        layers: Sequence[CallLayer] = (),
        on_refused: Refused | None = None,
    ) -> None:
        self._default_deadline = default_deadline
        self._slow_reads = _SlowReads(default_deadline)
        # Innermost first: the last layer sees the call first (tracing around metrics).
        self._layers = tuple(layers)
        self._on_refused = on_refused

    async def close(self) -> None:
        await self._slow_reads.close()

    # The request id is read (or made) only when something is logged or sent
    # back: a successful call at info level pays for neither. ``requests`` is
    # grpc's reader, unused: the one message is read here (see the module doc).
    def unary(
        self, method: str, behavior: UnaryBehavior, accept: Accept = _accept_checked
    ) -> UnaryBehavior:
        wrapped = self._unary(method, behavior, accept)
        for layer in self._layers:
            wrapped = layer.unary(method, wrapped)
        return wrapped

    def stream(
        self, method: str, behavior: StreamBehavior, accept: Accept = _accept_checked
    ) -> StreamBehavior:
        wrapped = self._stream(method, behavior, accept)
        for layer in self._layers:
            wrapped = layer.stream(method, wrapped)
        return wrapped

    def _unary(self, method: str, behavior: UnaryBehavior, accept: Accept) -> UnaryBehavior:
        default = self._default_deadline
        slow_reads = self._slow_reads

        async def wrapped(requests: Any, context: Context) -> Any:
            started = time.perf_counter()
            try:
                remaining = context.time_remaining()
                if remaining is None:
                    async with asyncio.timeout(default):
                        response = await behavior(accept(await context.read(), context), context)
                elif remaining <= default:  # gRPC enforces the caller's own deadline
                    response = await behavior(accept(await context.read(), context), context)
                else:  # ... but waits no longer than the default for the message
                    task = slow_reads.watch()
                    try:
                        request = await context.read()
                    except asyncio.CancelledError:
                        if not slow_reads.expired(task):
                            raise
                        raise TimeoutError from None
                    finally:
                        slow_reads.unwatch(task)
                    response = await behavior(accept(request, context), context)
            except grpc.aio.AbortError:
                raise  # grpc's own servicers (health) abort themselves: the status is sent
            except Exception as exc:  # noqa: BLE001 - the one place errors become statuses
                await self._abort(context, method, started, exc)
            if debug_enabled():
                _log_ok(context, method, started)
            return response

        return wrapped

    def _stream(self, method: str, behavior: StreamBehavior, accept: Accept) -> StreamBehavior:
        writes_itself = not inspect.isasyncgenfunction(behavior)

        async def wrapped(requests: Any, context: Context) -> AsyncIterator[Any]:
            started = time.perf_counter()
            # The default deadline bounds only the wait for the request: a stream (a
            # re-wrap of a million keys) runs until it is done or the caller cancels
            # or sets a deadline.
            try:
                async with asyncio.timeout(self._default_deadline):
                    request = accept(await context.read(), context)
                if writes_itself:
                    await behavior(request, context)  # type: ignore[misc]
                else:
                    async for item in behavior(request, context):  # type: ignore[union-attr]
                        yield item
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # noqa: BLE001 - the one place errors become statuses
                await self._abort(context, method, started, exc)
            if debug_enabled():
                _log_ok(context, method, started)

        return wrapped

    async def _abort(self, context: Context, method: str, started: float, exc: Exception) -> None:
        rid = _request_id(context)
        code, message, details = to_status(exc, rid)
        fields: dict[str, Any] = {
            "method": method,
            "code": code.name,
            "caller": current_caller(),
            "request_id": rid,
            "duration_ms": round((time.perf_counter() - started) * 1000, 2),
        }
        if isinstance(exc, MalformedRequest):
            fields["reason"] = exc.reason  # never the bytes
        if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
            log.error("rpc_failed", error_type=type(exc).__name__, frames=_frames(exc), **fields)
        elif code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            log.warning("rpc_failed", error_type=type(exc).__name__, **fields)
        else:
            log.info("rpc_refused", **fields)
        if self._on_refused is not None:
            self._on_refused(method, exc)
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
    methods: Collection[str] | None = None,
    validate: Callable[[Any], None] | None = None,
    authorization: Authorization | None = None,
) -> None:
    """Register ``servicer``'s methods for ``service`` (or only those named in
    ``methods``), each wrapped by ``interceptor``; ``authorization`` gives each
    method its caller check, and ``validate`` runs on every request before its
    method does. Every method of the service is registered with the check: a new
    RPC is covered (and denied until the caller policy names it).

    Built from the service descriptor, like the generated ``add_*_to_server``, but
    registered as request-streaming so the wrapper reads the request (module doc).
    """
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in service.methods:
        if methods is not None and method.name not in methods:
            continue
        path = f"/{service.full_name}/{method.name}"
        authorize = None if authorization is None else authorization(path, method)
        accept = _accepting(validate, authorize)
        behavior = getattr(servicer, method.name)
        request = message_factory.GetMessageClass(method.input_type)
        response = message_factory.GetMessageClass(method.output_type)
        if method.client_streaming:
            raise NotImplementedError("client-streaming methods are not used by this API")
        deserialize = _lenient(request.FromString)
        if method.server_streaming:
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                interceptor.stream(path, behavior, accept),
                request_deserializer=deserialize,
                response_serializer=response.SerializeToString,
            )
        else:
            handlers[method.name] = grpc.stream_unary_rpc_method_handler(
                interceptor.unary(path, behavior, accept),
                request_deserializer=deserialize,
                response_serializer=response.SerializeToString,
            )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)
