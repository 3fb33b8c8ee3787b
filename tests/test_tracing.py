"""OpenTelemetry tracing (issue 11, item 6), with the SDK's in-memory exporter: a real
gRPC call carrying W3C trace context gets a server span in the caller's trace, with
its status code; a health check gets none; no attribute holds personal data; and a
log line written during the call carries the trace id."""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Iterator

import grpc
import pytest
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_support import sign_up_request
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from privacyvault.v1 import member_pb2 as pb
from privacyvault.v1.member_pb2_grpc import MemberServiceStub
from service.config import Settings
from service.logs import configure_logging
from service.server import run_server
from service.tracing import Tracing
from vault import FrozenClock

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = (("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01"),)
MEMBER = "privacyvault.v1.MemberService"
ATTRIBUTES = {
    "rpc.system",
    "rpc.service",
    "rpc.method",
    "rpc.grpc.status_code",
    "privacy_vault.caller",
}


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    spans = InMemorySpanExporter()
    yield spans
    spans.clear()


@pytest.fixture
def tracing(exporter: InMemorySpanExporter) -> Iterator[Tracing]:
    tracer = Tracing(SimpleSpanProcessor(exporter))
    yield tracer
    tracer.close()


def _by_method(spans: tuple[ReadableSpan, ...]) -> dict[str, ReadableSpan]:
    return {str(s.attributes["rpc.method"]): s for s in spans if s.attributes}


async def test_a_call_with_trace_context_gets_a_child_span_and_logs_its_trace_id(
    server_settings: Settings,
    clock: FrozenClock,
    tracing: Tracing,
    exporter: InMemorySpanExporter,
) -> None:
    lines = io.StringIO()
    configure_logging(level="info", fmt="json", stream=lines)
    request = sign_up_request()
    missing = str(uuid.uuid4())
    async with (
        run_server(server_settings, clock=clock, tracing=tracing) as server,
        grpc.aio.insecure_channel(server.target) as channel,
    ):
        members = MemberServiceStub(channel)
        member_id = (await members.SignUp(request, metadata=TRACEPARENT)).member_id
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await members.GetMember(
                pb.GetMemberRequest(member_id=missing, purpose=pb.PURPOSE_IDENTIFICATION),
                metadata=TRACEPARENT,
            )
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
        health = health_pb2_grpc.HealthStub(channel)
        await health.Check(health_pb2.HealthCheckRequest(service=""), metadata=TRACEPARENT)
        # No trace context: a trace of its own.
        await members.GetMember(
            pb.GetMemberRequest(member_id=member_id, purpose=pb.PURPOSE_IDENTIFICATION)
        )

    spans = exporter.get_finished_spans()
    assert len(spans) == 3, "one span per API call, none for the health check"
    assert {s.attributes["rpc.service"] for s in spans if s.attributes} == {MEMBER}
    sign_up = _by_method(spans[:1])["SignUp"]
    failed = _by_method(spans[1:2])["GetMember"]
    own = spans[2]
    for span, code in ((sign_up, grpc.StatusCode.OK), (failed, grpc.StatusCode.NOT_FOUND)):
        assert span.kind == SpanKind.SERVER
        assert span.context is not None
        assert f"{span.context.trace_id:032x}" == TRACE_ID
        assert span.parent is not None
        assert f"{span.parent.span_id:016x}" == PARENT_ID
        assert span.attributes is not None
        assert span.attributes["rpc.grpc.status_code"] == code.value[0]
        assert span.attributes["privacy_vault.caller"] == "local"
        # A caller's error (NOT_FOUND) is no server error: the status stays unset.
        assert span.status.status_code == StatusCode.UNSET
        assert set(span.attributes) == ATTRIBUTES
    assert sign_up.name == f"{MEMBER}/SignUp"
    assert own.parent is None
    assert own.context is not None
    assert f"{own.context.trace_id:032x}" != TRACE_ID

    everything = " ".join(
        f"{s.name} {dict(s.attributes or {})} {s.status.description} {list(s.events)}"
        for s in spans
    )
    for secret in (request.login_id, request.email, request.name, member_id, missing):
        assert secret not in everything, "personal data in a span"

    events = [json.loads(line) for line in lines.getvalue().splitlines() if line.startswith("{")]
    refusals = [e for e in events if e["event"] == "rpc_refused"]
    assert len(refusals) == 1
    assert refusals[0]["trace_id"] == TRACE_ID
    assert refusals[0]["span_id"] == f"{failed.context.span_id:016x}"  # type: ignore[union-attr]
    # Outside a call nothing is added.
    assert all("trace_id" not in e for e in events if e["event"] == "server_started")


async def test_closing_the_tracer_takes_the_trace_ids_out_of_the_logs(
    exporter: InMemorySpanExporter,
) -> None:
    lines = io.StringIO()
    configure_logging(level="info", fmt="json", stream=lines)
    tracer = Tracing(SimpleSpanProcessor(exporter))
    log = structlog.get_logger("test")
    with tracer.provider.get_tracer("test").start_as_current_span("open"):
        log.info("while_tracing")
        tracer.close()
        log.info("after_close")
        configure_logging(level="info", fmt="json", stream=lines)
        log.info("reconfigured")
    events = {e["event"]: e for e in map(json.loads, lines.getvalue().splitlines())}
    assert len(events["while_tracing"]["trace_id"]) == 32
    assert "trace_id" not in events["after_close"]
    assert "trace_id" not in events["reconfigured"]


async def test_the_setting_turns_on_otlp_tracing(
    server_settings: Settings, clock: FrozenClock
) -> None:
    """PRIVACY_VAULT_OTEL_ENABLED builds the OTLP exporter from the otel extra; a health
    check makes no span, so nothing is sent to the (absent) collector."""
    settings = server_settings.model_copy(update={"otel_enabled": True})
    async with (
        run_server(settings, clock=clock) as server,
        grpc.aio.insecure_channel(server.target) as channel,
    ):
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
