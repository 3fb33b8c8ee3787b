"""Optional OpenTelemetry tracing (``PRIVACY_VAULT_OTEL_ENABLED``; the ``otel`` extra).

A server span per RPC, a child of the caller's trace when the call carries W3C trace
context (``traceparent``/``tracestate`` metadata); no span for health checks (probes
every few seconds would bury the traces) nor reflection (not wrapped at all). Its
attributes are the RPC's service and method, the status code and the calling
service's identity: never a request or response field, nor an exception's text.
While a span is open, log lines carry its ``trace_id`` and ``span_id``.

OpenTelemetry is imported only here, and only when tracing is switched on: the base
install does not need it, and with tracing off the request wrapper has no tracing
layer at all (service.interceptors.CallLayer). Spans go to OTLP, configured by the
standard ``OTEL_EXPORTER_OTLP_*`` variables; ``OTEL_SERVICE_NAME`` names the service
(default ``privacy-vault``).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health

from service import logs
from service.errors import ServiceError
from service.metrics import split_path, status_code
from vault.calls import INTERNAL, current_caller

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
    from opentelemetry.trace import Span, Tracer

Context = grpc.aio.ServicerContext[Any, Any]
Handler = Callable[[Any, Context], Any]

SERVICE_NAME = "privacy-vault"
#: Methods that get no span: the health service (probes).
UNTRACED_SERVICES = frozenset({health.SERVICE_NAME})
_TRACE_KEYS = frozenset({"traceparent", "tracestate"})
#: OpenTelemetry's semantic conventions: these codes are the server's failure (ERROR);
#: the rest are the caller's (the span's status stays unset).
SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


class TracingUnavailable(ServiceError):
    """Tracing is on but OpenTelemetry is not installed."""


def _carrier(context: Context) -> dict[str, str]:
    return {
        key: value
        for key, value in context.invocation_metadata() or ()
        if key in _TRACE_KEYS and isinstance(value, str)
    }


def _add_trace_ids(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    from opentelemetry import trace

    span = trace.get_current_span().get_span_context()
    if span.is_valid:
        event["trace_id"] = trace.format_trace_id(span.trace_id)
        event["span_id"] = trace.format_span_id(span.span_id)
    return event


class Tracing:
    """The tracer of one server, and the call layer that opens its spans."""

    def __init__(self, processor: SpanProcessor | None = None) -> None:
        """``processor`` receives the ended spans; default: a batch processor
        exporting over OTLP (tests give an in-memory exporter's)."""
        try:
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.trace import SpanKind, Status, StatusCode
            from opentelemetry.trace.propagation.tracecontext import (
                TraceContextTextMapPropagator,
            )

            if processor is None:
                processor = _otlp_processor()
        except ImportError as exc:
            raise TracingUnavailable(
                "PRIVACY_VAULT_OTEL_ENABLED needs OpenTelemetry: pip install 'privacy-vault[otel]'"
            ) from exc
        attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": SERVICE_NAME}
        self.provider: TracerProvider = TracerProvider(resource=Resource.create(attributes))
        self.provider.add_span_processor(processor)
        # A provider of our own, not the global one: two servers in a process (tests)
        # keep their spans apart, and nothing else's set-up is touched.
        self._tracer: Tracer = self.provider.get_tracer("privacy-vault")
        self._extract = TraceContextTextMapPropagator().extract
        self._server = SpanKind.SERVER
        self._status, self._error = Status, StatusCode.ERROR
        logs.add_processor(_add_trace_ids)

    def close(self) -> None:
        logs.remove_processor(_add_trace_ids)
        self.provider.shutdown()  # flushes what is still batched

    def _end(self, span: Span, code: grpc.StatusCode) -> None:
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        caller = current_caller()
        if caller != INTERNAL:
            span.set_attribute("privacy_vault.caller", caller)
        if code in SERVER_ERRORS:
            span.set_status(self._status(self._error, code.name))

    def _start(self, name: str, attributes: dict[str, str], context: Context) -> Any:
        return self._tracer.start_as_current_span(
            name,
            context=self._extract(_carrier(context)),
            kind=self._server,
            attributes=attributes,
            record_exception=False,  # its text is not vetted for personal data
            set_status_on_exception=False,
        )

    def unary(self, path: str, handler: Handler) -> Handler:
        service, method = split_path(path)
        if service in UNTRACED_SERVICES:
            return handler
        name, attributes = path.lstrip("/"), _attributes(service, method)
        start, end, ok = self._start, self._end, grpc.StatusCode.OK

        async def traced(requests: Any, context: Context) -> Any:
            with start(name, attributes, context) as span:
                try:
                    response = await handler(requests, context)
                except BaseException as exc:
                    end(span, status_code(exc, context))
                    raise
                end(span, ok)
                return response

        return traced

    def stream(self, path: str, handler: Callable[[Any, Context], AsyncIterator[Any]]) -> Handler:
        service, method = split_path(path)
        if service in UNTRACED_SERVICES:
            return handler
        name, attributes = path.lstrip("/"), _attributes(service, method)
        start, end = self._start, self._end

        async def traced(requests: Any, context: Context) -> AsyncIterator[Any]:
            with start(name, attributes, context) as span:
                code = grpc.StatusCode.OK
                try:
                    async for item in handler(requests, context):
                        yield item
                except BaseException as exc:
                    code = status_code(exc, context)
                    raise
                finally:
                    end(span, code)

        return traced


def _attributes(service: str, method: str) -> dict[str, str]:
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}


def _otlp_processor() -> SpanProcessor:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    return BatchSpanProcessor(OTLPSpanExporter())
