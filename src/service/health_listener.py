"""The plaintext health-only listener (``PRIVACY_VAULT_HEALTH_LISTEN_ADDRESS``).

Kubernetes' native gRPC probe and most load-balancer checks speak neither TLS nor
mTLS, while production serves the API over mTLS only. This second listener serves
``grpc.health.v1`` and nothing else, from the same health servicer as the API port,
so a draining server reports NOT_SERVING on both.
"""

from __future__ import annotations

import grpc
import structlog
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health

from service.interceptors import ServiceInterceptor, add_servicer

log = structlog.get_logger("service.health_listener")

#: Health requests are a service name: a small bound, few streams, short idle time.
_OPTIONS = [
    ("grpc.max_receive_message_length", 4096),
    ("grpc.so_reuseport", 0),
    ("grpc.max_concurrent_streams", 8),
    ("grpc.max_allowed_incoming_connections", 64),
    ("grpc.max_connection_idle_ms", 60_000),
    ("grpc.server_handshake_timeout_ms", 5_000),
]


async def start_health_listener(
    address: str | None,
    health_servicer: health.aio.HealthServicer,
    health_service: ServiceDescriptor,
    interceptor: ServiceInterceptor,
) -> grpc.aio.Server | None:
    """Serve ``health_servicer`` alone on ``address`` in plaintext; None when unset."""
    if address is None:
        return None
    server = grpc.aio.server(options=_OPTIONS, maximum_concurrent_rpcs=64)
    # Through the interceptor as on the API port, so a call that sends no message ends.
    add_servicer(server, health_servicer, health_service, interceptor, ("Check", "Watch"))
    port = server.add_insecure_port(address)
    await server.start()
    log.info("health_listener_started", port=port)
    return server
