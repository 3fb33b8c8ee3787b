"""Prometheus metrics on an address of their own (``PRIVACY_VAULT_METRICS_ADDRESS``).

- gRPC, with go-grpc-prometheus's names and labels, so its dashboards and alerts work
  unchanged: ``grpc_server_started_total``, ``grpc_server_handled_total`` (with
  ``grpc_code`` spelt as Go spells it: ``OK``, ``NotFound``...),
  ``grpc_server_handling_seconds`` and ``grpc_server_msg_{received,sent}_total``, by
  ``grpc_type``, ``grpc_service`` and ``grpc_method``. Recorded by a layer the request
  wrapper adds at registration (:meth:`Metrics.unary`), not by a grpc.aio
  ServerInterceptor (see service.interceptors); with metrics off it is not there at all.
- The vault's counts (:class:`vault.activity.Activity`: sign-ups, shreds by reason,
  login failures, lockouts, re-wraps), read at scrape time.
- Refusals by the caller policy and by consent, by caller (the calling service's
  SPIFFE ID: a service, not a person), method and purpose.
- The sidecar's rounds, and gauges that need the database (KEK versions and the keys
  each wraps, keys awaiting re-wrap, the outbox, the lifecycle's due counts), read at a
  scrape at most every ``PRIVACY_VAULT_METRICS_REFRESH_SECONDS`` (their cost is a few
  counting queries per interval, whatever the scrape rate, and none per RPC).

No label ever holds a member id, login ID, e-mail address, name or IP address: label
values are method names, status codes, fixed reasons, purposes and caller identities.
Each server has a registry of its own (tests run several in one process).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol
from wsgiref.simple_server import WSGIServer

import grpc
import structlog
from prometheus_client import (
    GC_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from service.errors import CallerNotAllowed, ServiceError
from vault import errors as ve
from vault.activity import Activity
from vault.calls import current_caller
from vault.keyadmin import KeyStatus
from vault.lifecycle import Lifecycle, RoundReport

log = structlog.get_logger("service.metrics")

#: go-grpc-prometheus's label values: Go's codes.Code.String().
GO_CODES = {
    grpc.StatusCode.OK: "OK",
    grpc.StatusCode.CANCELLED: "Canceled",
    grpc.StatusCode.UNKNOWN: "Unknown",
    grpc.StatusCode.INVALID_ARGUMENT: "InvalidArgument",
    grpc.StatusCode.DEADLINE_EXCEEDED: "DeadlineExceeded",
    grpc.StatusCode.NOT_FOUND: "NotFound",
    grpc.StatusCode.ALREADY_EXISTS: "AlreadyExists",
    grpc.StatusCode.PERMISSION_DENIED: "PermissionDenied",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "ResourceExhausted",
    grpc.StatusCode.FAILED_PRECONDITION: "FailedPrecondition",
    grpc.StatusCode.ABORTED: "Aborted",
    grpc.StatusCode.OUT_OF_RANGE: "OutOfRange",
    grpc.StatusCode.UNIMPLEMENTED: "Unimplemented",
    grpc.StatusCode.INTERNAL: "Internal",
    grpc.StatusCode.UNAVAILABLE: "Unavailable",
    grpc.StatusCode.DATA_LOSS: "DataLoss",
    grpc.StatusCode.UNAUTHENTICATED: "Unauthenticated",
}
#: Prometheus's DefBuckets (go-grpc-prometheus's default), with 1 and 2.5 ms below:
#: a read from the DEK cache is faster than the first default bucket.
HANDLING_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
ROUND_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0)
#: Distinct callers named in the denial counter; past it they count as "other", so a
#: CA issuing many identities cannot grow the series without bound.
MAX_CALLERS = 200
OTHER_CALLER = "other"
UNIDENTIFIED = "unidentified"
#: How long a scrape waits for the database-backed gauges before serving the last ones.
REFRESH_TIMEOUT = 10.0
#: The RoundReport fields the sidecar's round counts, as the step label says them.
ROUND_COUNTS = (
    "shredded",
    "notices",
    "correction_notices",
    "retained_destroyed",
    "access_log_purged",
    "counters_purged",
    "kek_rotated",
    "kek_versions_destroyed",
)
MAIL_OUTCOMES = ("sent", "dropped", "retried", "failed")

Context = grpc.aio.ServicerContext[Any, Any]
Handler = Callable[[Any, Context], Any]


class MetricsUnavailable(ServiceError):
    """The metrics address cannot be listened on: the start is refused."""


def status_code(exc: BaseException, context: Context) -> grpc.StatusCode:
    """The status a call that raised ``exc`` ended with: the request wrapper has
    aborted with it (AbortError), or the call was cancelled (by the client, or by
    grpc at its deadline)."""
    if isinstance(exc, grpc.aio.AbortError):
        code = context.code()
        return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


def split_path(path: str) -> tuple[str, str]:
    """ "/privacyvault.v1.MemberService/GetMember" -> (full service name, method)."""
    service, _, method = path.lstrip("/").partition("/")
    return service, method


@dataclass(slots=True)
class _Rpc:
    """One method's series, bound once at registration: a call does no label lookup."""

    started: Callable[[], None]
    received: Callable[[], None]
    sent: Callable[[], None]
    seconds: Callable[[float], None]
    handled_family: Counter
    labels: tuple[str, str, str]
    handled: dict[grpc.StatusCode, Callable[[], None]] = field(default_factory=dict)

    def done(self, code: grpc.StatusCode, started: float) -> None:
        inc = self.handled.get(code)
        if inc is None:
            inc = self.handled[code] = self.handled_family.labels(
                *self.labels, GO_CODES.get(code, "Unknown")
            ).inc
        inc()
        self.seconds(time.perf_counter() - started)


class _RpcFamilies:
    """go-grpc-prometheus's server metrics."""

    def __init__(self, registry: CollectorRegistry) -> None:
        rpc_labels = ("grpc_type", "grpc_service", "grpc_method")
        self.started = Counter(
            "grpc_server_started", "RPCs started on the server.", rpc_labels, registry=registry
        )
        self.handled = Counter(
            "grpc_server_handled",
            "RPCs completed on the server, regardless of success or failure.",
            (*rpc_labels, "grpc_code"),
            registry=registry,
        )
        self.seconds = Histogram(
            "grpc_server_handling_seconds",
            "Response latency (seconds) of gRPC that had been application-level handled "
            "by the server.",
            rpc_labels,
            buckets=HANDLING_BUCKETS,
            registry=registry,
        )
        self.received = Counter(
            "grpc_server_msg_received",
            "RPC messages received on the server.",
            rpc_labels,
            registry=registry,
        )
        self.sent = Counter(
            "grpc_server_msg_sent",
            "gRPC messages sent on the server.",
            rpc_labels,
            registry=registry,
        )


class _SidecarFamilies:
    """The lifecycle sidecar's rounds and the mail they relayed."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.rounds = Counter(
            "privacy_vault_sidecar_rounds",
            "Lifecycle sidecar rounds by outcome: done, lease_held_elsewhere, failed.",
            ("outcome",),
            registry=registry,
        )
        self.round_seconds = Histogram(
            "privacy_vault_sidecar_round_seconds",
            "How long a lifecycle sidecar round took (rounds this process ran).",
            buckets=ROUND_BUCKETS,
            registry=registry,
        )
        self.lease = Gauge(
            "privacy_vault_sidecar_lease_held",
            "1 while this process's sidecar holds the lifecycle lease (as of its last round).",
            registry=registry,
        )
        self.processed = Counter(
            "privacy_vault_lifecycle_processed",
            "What the sidecar's rounds did, by step (members shredded, notices sent...).",
            ("step",),
            registry=registry,
        )
        self.mail = Counter(
            "privacy_vault_mail",
            "Outbox mail relayed, by outcome: sent, dropped (member gone), retried, failed "
            "(given up).",
            ("outcome",),
            registry=registry,
        )


class Metrics:
    """A process's metrics: one registry, served over HTTP once :meth:`serve` ran."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.registry.register(GC_COLLECTOR)
        self._rpcs = _RpcFamilies(self.registry)
        self._sidecar = _SidecarFamilies(self.registry)
        self._denials = Counter(
            "privacy_vault_policy_denials",
            "Calls refused by the caller policy (reason caller_policy) or for want of the "
            "member's consent to the purpose (reason consent).",
            ("caller", "method", "purpose", "reason"),
            registry=self.registry,
        )
        self._callers: set[str] = set()
        self._http: WSGIServer | None = None
        self.port: int | None = None

    # --- gRPC --------------------------------------------------------------------------
    def _rpc(self, path: str, grpc_type: str) -> _Rpc:
        labels, f = (grpc_type, *split_path(path)), self._rpcs
        return _Rpc(
            started=f.started.labels(*labels).inc,
            received=f.received.labels(*labels).inc,
            sent=f.sent.labels(*labels).inc,
            seconds=f.seconds.labels(*labels).observe,
            handled_family=f.handled,
            labels=labels,
        )

    def unary(self, path: str, handler: Handler) -> Handler:
        """``handler`` (the request wrapper of a unary method), counted and timed."""
        rpc = self._rpc(path, "unary")
        started, received, sent, done = rpc.started, rpc.received, rpc.sent, rpc.done
        ok, cancelled = grpc.StatusCode.OK, grpc.StatusCode.CANCELLED

        async def measured(requests: Any, context: Context) -> Any:
            started()
            begun = time.perf_counter()
            try:
                response = await handler(requests, context)
            except BaseException as exc:
                code = status_code(exc, context)
                if code is not cancelled:  # the request was read (all but a rare empty call)
                    received()
                done(code, begun)
                raise
            received()
            sent()
            done(ok, begun)
            return response

        return measured

    def stream(self, path: str, handler: Callable[[Any, Context], AsyncIterator[Any]]) -> Handler:
        """``handler`` (the request wrapper of a server-streaming method), counted and timed."""
        rpc = self._rpc(path, "server_stream")
        started, received, sent, done = rpc.started, rpc.received, rpc.sent, rpc.done

        async def measured(requests: Any, context: Context) -> AsyncIterator[Any]:
            started()
            begun = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                received()
                async for item in handler(requests, context):
                    sent()
                    yield item
            except BaseException as exc:
                code = status_code(exc, context)
                raise
            finally:
                done(code, begun)

        return measured

    def denied(self, path: str, exc: BaseException) -> None:
        """Count a refusal by the caller policy or for want of consent (others pass)."""
        if isinstance(exc, CallerNotAllowed):
            meta = exc.metadata
            caller, reason = meta.get("identity", UNIDENTIFIED), "caller_policy"
            method, purpose = meta.get("method", ""), meta.get("purpose", "")
        elif isinstance(exc, ve.PurposeNotAllowed):
            caller, method, purpose, reason = current_caller(), "", exc.purpose, "consent"
        else:
            return
        if not method:
            service, name = split_path(path)
            method = f"{service.rpartition('.')[2]}/{name}"
        if caller not in self._callers:
            if len(self._callers) >= MAX_CALLERS:
                caller = OTHER_CALLER
            else:
                self._callers.add(caller)
        self._denials.labels(caller, method, purpose, reason).inc()

    # --- the vault and the sidecar -------------------------------------------------------
    def watch_vault(self, activity: Activity) -> None:
        """Serve the vault's counts (read at each scrape)."""
        self.registry.register(_ActivityCollector(activity))

    def watch_store(
        self,
        keys: KeyStatusSource,
        outbox: OutboxDepthSource,
        lifecycle: Lifecycle | None,
        *,
        refresh_seconds: float,
        now: Callable[[], Any],
    ) -> None:
        """Serve the gauges read from the database (at most every ``refresh_seconds``)."""
        loop = asyncio.get_running_loop()
        self.registry.register(
            _StoreGauges(loop, keys, outbox, lifecycle, refresh_seconds=refresh_seconds, now=now)
        )

    def sidecar_round(self, outcome: str, seconds: float, report: RoundReport | None) -> None:
        """The sidecar's hook after each round (service.sidecar.RoundHook)."""
        f = self._sidecar
        f.rounds.labels(outcome).inc()
        if outcome == "lease_held_elsewhere":
            f.lease.set(0)
            return
        f.round_seconds.observe(seconds)
        if report is None:
            return
        f.lease.set(1)
        counts = report.as_dict()
        for step in ROUND_COUNTS:
            f.processed.labels(step).inc(int(counts[step]))
        for outcome_ in MAIL_OUTCOMES:
            f.mail.labels(outcome_).inc(int(counts[f"mail_{outcome_}"]))

    # --- the endpoint ----------------------------------------------------------------------
    def serve(self, address: str) -> int:
        """Serve ``/metrics`` on ``address`` (host:port) in a thread; the port bound."""
        host, _, port = address.rpartition(":")
        try:
            self._http, _ = start_http_server(int(port), host.strip("[]"), registry=self.registry)
        except OSError as exc:  # in use, or not an address of this host
            raise MetricsUnavailable(
                f"PRIVACY_VAULT_METRICS_ADDRESS {address} cannot be listened on: {exc.strerror}"
            ) from None
        self.port = int(self._http.server_port)
        log.info("metrics_listener_started", port=self.port)
        return self.port

    async def close(self) -> None:
        if self._http is not None:
            http, self._http = self._http, None
            await asyncio.to_thread(http.shutdown)  # waits for its loop: off the event loop
            http.server_close()


class KeyStatusSource(Protocol):
    """``vault.keys``: the KEK versions and the keys each wraps."""

    async def status(self) -> KeyStatus: ...


class OutboxDepthSource(Protocol):
    """``vault.outbox``: how much mail waits."""

    async def outbox_depth(self, now: Any) -> tuple[int, int]: ...


class _ActivityCollector(Collector):
    def __init__(self, activity: Activity) -> None:
        self._activity = activity

    def collect(self) -> Iterable[Metric]:
        a = self._activity.snapshot()
        for name, doc, value in (
            ("privacy_vault_sign_ups", "Members signed up.", a.sign_ups),
            (
                "privacy_vault_login_failures",
                "Failed password checks (wrong, unknown login ID, or during a lock).",
                a.login_failures,
            ),
            ("privacy_vault_login_lockouts", "Failures that locked an account.", a.lockouts),
            (
                "privacy_vault_login_throttled",
                "Logins refused because the client IP had too many failures.",
                a.login_throttled,
            ),
            (
                "privacy_vault_keys_rewrapped",
                "Keys moved to the active KEK version by re-wraps in this process.",
                a.keys_rewrapped,
            ),
            ("privacy_vault_kek_rotations", "KEK rotations by this process.", a.kek_rotations),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        shreds = CounterMetricFamily(
            "privacy_vault_shreds", "Members crypto-shredded, by reason.", labels=("reason",)
        )
        for reason, count in sorted(a.shreds.items()):
            shreds.add_metric((reason,), count)
        yield shreds


@dataclass(slots=True)
class _StoreReading:
    keys: KeyStatus | None = None
    outbox: tuple[int, int] | None = None
    due: RoundReport | None = None
    at: float = float("-inf")


class _StoreGauges(Collector):
    """Database-backed gauges. A scrape runs in the HTTP server's thread; the queries
    run on the event loop (where the vault lives), at most once per interval, and a
    scrape that finds the loop busy past REFRESH_TIMEOUT serves the last reading."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        keys: KeyStatusSource,
        outbox: OutboxDepthSource,
        lifecycle: Lifecycle | None,
        *,
        refresh_seconds: float,
        now: Callable[[], Any],
    ) -> None:
        self._loop = loop
        self._keys, self._outbox, self._lifecycle = keys, outbox, lifecycle
        self._refresh = refresh_seconds
        self._now = now
        self._reading = _StoreReading()

    async def _read(self) -> _StoreReading:
        due = None
        if self._lifecycle is not None:
            due = await self._lifecycle.run_round(dry_run=True)  # counts only, bounded
        return _StoreReading(
            await self._keys.status(),
            await self._outbox.outbox_depth(self._now()),
            due,
            time.monotonic(),
        )

    def _fresh(self) -> _StoreReading:
        if time.monotonic() - self._reading.at < self._refresh or self._loop.is_closed():
            return self._reading
        try:
            if _on_loop(self._loop):  # never wait for the loop from the loop itself
                return self._reading
            future = asyncio.run_coroutine_threadsafe(self._read(), self._loop)
            self._reading = future.result(REFRESH_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - a scrape serves what it has
            log.warning("metrics_refresh_failed", error=type(exc).__name__)
        return self._reading

    def collect(self) -> Iterator[Metric]:
        reading = self._fresh()
        if reading.keys is not None:
            yield from _key_gauges(reading.keys)
        if reading.outbox is not None:
            waiting, due = reading.outbox
            yield GaugeMetricFamily(
                "privacy_vault_outbox_messages", "Mail waiting in the outbox.", value=waiting
            )
            yield GaugeMetricFamily(
                "privacy_vault_outbox_due_messages",
                "Mail in the outbox whose next attempt is due.",
                value=due,
            )
        if reading.due is not None and self._lifecycle is not None:
            family = GaugeMetricFamily(
                "privacy_vault_lifecycle_due",
                "What the next sidecar round would do, by step (a dry run's counts).",
                labels=("step",),
            )
            for step in self._lifecycle.steps:
                if step.name != "counters_purged":  # a dry run does not count those
                    family.add_metric((step.name,), reading.due.count(step))
            yield family


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def _key_gauges(status: KeyStatus) -> Iterator[Metric]:
    states = GaugeMetricFamily(
        "privacy_vault_kek_versions", "KEK versions by state.", labels=("state",)
    )
    by_state: dict[str, int] = {"active": 0, "decrypt_only": 0, "destroyed": 0}
    for v in status.versions:
        by_state[v.state] = by_state.get(v.state, 0) + 1
    for state, count in by_state.items():
        states.add_metric((state,), count)
    yield states
    yield GaugeMetricFamily(
        "privacy_vault_kek_active_version", "The active KEK version.", value=status.active_version
    )
    keys = GaugeMetricFamily(
        "privacy_vault_kek_version_keys",
        "Keys wrapped under each KEK version not destroyed, by kind (member, index, retained).",
        labels=("version", "state", "kind"),
    )
    pending = 0
    for v in status.versions:
        if v.state == "destroyed":
            continue  # it wraps nothing, and old versions would pile up as series
        for kind, count in (
            ("member", v.member_keys),
            ("index", v.index_keys),
            ("retained", v.retained_keys),
        ):
            keys.add_metric((str(v.version), v.state, kind), count)
        if v.version != status.active_version:
            pending += v.member_keys + v.index_keys + v.retained_keys
    yield keys
    yield GaugeMetricFamily(
        "privacy_vault_rewrap_pending_keys",
        "Keys not yet under the active KEK version (what a re-wrap would move).",
        value=pending,
    )
