"""Building and running the gRPC server.

:func:`run_server` starts the real server in-process (tests use it too);
:func:`serve` adds signal handling for ``privacy-vault serve``.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import structlog
from google.protobuf import descriptor_pool
from grpc_health.v1 import health, health_pb2

from privacyvault.v1 import consent_pb2, disclosure_pb2, key_admin_pb2, member_pb2, statistics_pb2
from service.caller_policy import LOCAL, PolicySource
from service.callers import CallerCheck, policy_methods
from service.config import Settings
from service.consent_servicer import ConsentServicer, PolicyAdminServicer
from service.disclosure_servicer import DisclosureServicer, RecipientAdminServicer
from service.field_limits import check_field_limits
from service.health_listener import start_health_listener
from service.interceptors import CallLayer, ServiceInterceptor, add_servicer
from service.key_admin_servicer import KeyAdminServicer
from service.member_servicer import MemberServicer
from service.metrics import Metrics
from service.reflection import enable_reflection
from service.server_certificates import ServerCertificates, TlsFiles
from service.statistics_servicer import StatisticsServicer
from service.tracing import Tracing
from service.wiring import build_sidecar, open_configured_vault, serving_metrics
from vault import Clock, Vault

log = structlog.get_logger("service.server")

MEMBER_SERVICE = member_pb2.DESCRIPTOR.services_by_name["MemberService"]
KEY_ADMIN_SERVICE = key_admin_pb2.DESCRIPTOR.services_by_name["KeyAdminService"]
CONSENT_SERVICE = consent_pb2.DESCRIPTOR.services_by_name["ConsentService"]
POLICY_ADMIN_SERVICE = consent_pb2.DESCRIPTOR.services_by_name["PolicyAdminService"]
DISCLOSURE_SERVICE = disclosure_pb2.DESCRIPTOR.services_by_name["DisclosureService"]
RECIPIENT_ADMIN_SERVICE = disclosure_pb2.DESCRIPTOR.services_by_name["RecipientAdminService"]
STATISTICS_SERVICE = statistics_pb2.DESCRIPTOR.services_by_name["StatisticsService"]
HEALTH_SERVICE = descriptor_pool.Default().FindServiceByName(health.SERVICE_NAME)
SERVICE_NAMES = (
    MEMBER_SERVICE.full_name,
    CONSENT_SERVICE.full_name,
    POLICY_ADMIN_SERVICE.full_name,
    DISCLOSURE_SERVICE.full_name,
    RECIPIENT_ADMIN_SERVICE.full_name,
    STATISTICS_SERVICE.full_name,
)
#: The services under the caller policy (health and reflection are not).
POLICY_SERVICES = (
    MEMBER_SERVICE,
    KEY_ADMIN_SERVICE,
    CONSENT_SERVICE,
    POLICY_ADMIN_SERVICE,
    DISCLOSURE_SERVICE,
    RECIPIENT_ADMIN_SERVICE,
    STATISTICS_SERVICE,
)


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    vault: Vault
    #: The metrics endpoint's port (PRIVACY_VAULT_METRICS_ADDRESS), None without one.
    metrics_port: int | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stop(self, grace: float) -> None:
        """Report NOT_SERVING so balancers drain us, then let calls in flight finish."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


def _credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS from the files in the settings, reloaded when they change (cert-manager and
    SPIRE rotate them); a set that cannot be used refuses the start."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    files = TlsFiles(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)
    return ServerCertificates(files, check_every=settings.tls_files_check_seconds).credentials()


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def server_options(settings: Settings) -> list[tuple[str, int]]:
    """grpc core's channel arguments: message sizes, and the transport bounds that keep
    a caller from holding streams, connections or memory open without end."""
    return [
        ("grpc.max_receive_message_length", settings.max_request_bytes),
        ("grpc.max_send_message_length", 4 * 1024 * 1024),
        ("grpc.so_reuseport", 0),
        # Advertised as SETTINGS_MAX_CONCURRENT_STREAMS; streams past it are reset.
        ("grpc.max_concurrent_streams", settings.max_concurrent_streams),
        # Past it, a new connection is closed as soon as it is accepted.
        ("grpc.max_allowed_incoming_connections", settings.max_connections),
        # Idle: no call open (this also closes a connection that never says a word).
        ("grpc.max_connection_idle_ms", _ms(settings.max_connection_idle_seconds)),
        # Age: GOAWAY, then the connection and whatever it still holds are closed
        # after the grace: the upper bound on any call, whatever deadline it asked for.
        ("grpc.max_connection_age_ms", _ms(settings.max_connection_age_seconds)),
        ("grpc.max_connection_age_grace_ms", _ms(settings.max_connection_age_grace_seconds)),
        # Keepalive enforcement (grpc's defaults, stated): a client pinging more often
        # than every 5 minutes without data, or at all without a call, gets GOAWAY
        # after 2 strikes. Our own pings find dead peers of open calls.
        ("grpc.http2.min_ping_interval_without_data_ms", 300_000),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        # A connection must finish its (TLS) handshake in this long.
        ("grpc.server_handshake_timeout_ms", 20_000),
        # No bandwidth-delay probing: it sizes flow-control windows for bulk transfers
        # and costs a PING round trip per burst of data; our messages are small
        # (bench/README.md: worth ~0.01-0.02 of Authenticate / raw argon2).
        ("grpc.http2.bdp_probe", 0),
    ]


def caller_check(settings: Settings) -> CallerCheck:
    """Who may call what (service.callers); an invalid policy file refuses the start."""
    policy = PolicySource(
        settings.caller_policy_file,
        policy_methods(POLICY_SERVICES),
        check_every=settings.caller_policy_check_seconds,
        purposes=settings.purposes.keys,
    )
    mutual_tls = settings.tls_client_ca_file is not None
    log.info(
        "caller_identity",
        identity="client certificate (SPIFFE ID)" if mutual_tls else f"every caller is {LOCAL}",
        policy=str(settings.caller_policy_file)
        if settings.caller_policy_file
        else "built-in development policy: every caller is allowed everything",
        trust_domain=policy.current().trust_domain,
        trust_forwarded_client_cert=settings.trust_forwarded_client_cert,
    )
    return CallerCheck(
        policy,
        mutual_tls=mutual_tls,
        trust_forwarded_client_cert=settings.trust_forwarded_client_cert,
    )


def _add_services(
    server: grpc.aio.Server,
    vault: Vault,
    settings: Settings,
    interceptor: ServiceInterceptor,
    health_servicer: health.aio.HealthServicer,
    caller_check: CallerCheck,
) -> tuple[str, ...]:
    """Register the servicers ``settings`` ask for; the names of the API services."""
    callers = caller_check.authorization
    api = (
        (MemberServicer(vault), MEMBER_SERVICE),
        (ConsentServicer(vault.consents, vault.sessions), CONSENT_SERVICE),
        (PolicyAdminServicer(vault.consents), POLICY_ADMIN_SERVICE),
        (StatisticsServicer(vault.statistics), STATISTICS_SERVICE),
        (DisclosureServicer(vault.disclosures, vault.sessions), DISCLOSURE_SERVICE),
        (RecipientAdminServicer(vault.disclosures), RECIPIENT_ADMIN_SERVICE),
    )
    for servicer, service in api:
        add_servicer(
            server,
            servicer,
            service,
            interceptor,
            validate=check_field_limits,
            authorization=callers,
        )
    service_names: tuple[str, ...] = SERVICE_NAMES
    if settings.admin_token is not None:
        keys = KeyAdminServicer(vault.keys, settings.admin_token.get_secret_value())
        add_servicer(server, keys, KEY_ADMIN_SERVICE, interceptor, authorization=callers)
        service_names = (*service_names, KEY_ADMIN_SERVICE.full_name)
    else:
        log.info("admin_api_disabled", reason="PRIVACY_VAULT_ADMIN_TOKEN is not set")
    # Through the interceptor too, so a health call that sends no message ends;
    # List is not implemented by grpc's servicer, and stays UNIMPLEMENTED.
    add_servicer(server, health_servicer, HEALTH_SERVICE, interceptor, ("Check", "Watch"))
    if settings.reflection_enabled:  # v1alpha and v1 (service.reflection)
        enable_reflection(server, (*service_names, health.SERVICE_NAME))
    return service_names


def _interceptor(
    settings: Settings, metrics: Metrics | None, tracing: Tracing | None
) -> ServiceInterceptor:
    """The request wrapper, with the layers that are on: metrics, and tracing around
    them (so a span covers what the metrics time)."""
    layers: list[CallLayer] = [layer for layer in (metrics, tracing) if layer is not None]
    return ServiceInterceptor(
        settings.default_deadline_seconds,
        layers=layers,
        on_refused=None if metrics is None else metrics.denied,
    )


@contextlib.asynccontextmanager
async def _tracing(settings: Settings, given: Tracing | None) -> AsyncIterator[Tracing | None]:
    """``given`` (a test's, with its own exporter), or the one the settings ask for."""
    if given is not None or not settings.otel_enabled:
        yield given
        return
    tracing = Tracing()
    try:
        yield tracing
    finally:
        tracing.close()


def _log_started(settings: Settings, port: int, vault: Vault, *, tls: bool) -> None:
    if settings.admin_token is not None and not tls:
        # The bearer token crosses the network in the clear without TLS.
        log.warning("admin_api_without_tls")
    log.info(
        "server_started",
        port=port,
        tls=tls,
        mtls=settings.tls_client_ca_file is not None,
        reflection=settings.reflection_enabled,
        admin_api=settings.admin_token is not None,
        environment=settings.environment,
        # What runs, not what was asked for: uvloop falls back to asyncio where missing.
        event_loop=type(asyncio.get_running_loop()).__module__.split(".")[0],
        # The default follows the CPUs the process may use (affinity, cgroup quota).
        password_workers=vault.password_stats.workers,
    )


@contextlib.asynccontextmanager
async def run_server(
    settings: Settings, *, clock: Clock | None = None, tracing: Tracing | None = None
) -> AsyncIterator[RunningServer]:
    # Before anything is opened: a bad policy or unusable TLS files refuse the start.
    callers = caller_check(settings)
    credentials = _credentials(settings)
    async with (
        _tracing(settings, tracing) as tracer,
        open_configured_vault(settings, clock=clock) as vault,
        serving_metrics(settings, vault) as metrics,
    ):
        server = grpc.aio.server(
            options=server_options(settings),
            maximum_concurrent_rpcs=settings.max_concurrent_calls,
        )
        interceptor = _interceptor(settings, metrics, tracer)
        health_servicer = health.aio.HealthServicer()
        service_names = _add_services(
            server, vault, settings, interceptor, health_servicer, callers
        )
        port = (
            server.add_secure_port(settings.listen_address, credentials)
            if credentials
            else server.add_insecure_port(settings.listen_address)
        )
        # Before the API starts, so a health address that cannot be bound leaves
        # nothing running.
        health_server = await start_health_listener(
            settings.health_listen_address, health_servicer, HEALTH_SERVICE, interceptor
        )
        await server.start()
        for name in ("", *service_names):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        running = RunningServer(
            server, port, health_servicer, vault, None if metrics is None else metrics.port
        )
        _log_started(settings, port, vault, tls=credentials is not None)
        sidecar_task: asyncio.Task[None] | None = None
        if settings.sidecar_in_process_enabled:
            # The embedded default: lifecycle sweeps in this process. Cancelling a
            # round is safe (every step is crash-safe); the lease is released.
            sidecar = build_sidecar(vault, settings, metrics=metrics)
            sidecar_task = asyncio.create_task(sidecar.run(asyncio.Event()))
        try:
            yield running
        finally:
            if sidecar_task is not None:
                sidecar_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sidecar_task
            await running.stop(settings.shutdown_grace_seconds)
            if health_server is not None:  # after the drain, so probes saw NOT_SERVING
                await health_server.stop(0)
            await interceptor.close()
            log.info("server_stopped")


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with run_server(settings):
        await stop.wait()
        log.info("shutdown_requested", grace_seconds=settings.shutdown_grace_seconds)
