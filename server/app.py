"""The composition root of the gRPC server: services, interceptors, health, reflection, TLS,
and a graceful stop (health NOT_SERVING first, then in-flight calls get a grace period)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from config.settings import Settings
from server import (
    bonuses,
    campaigns,
    codes,
    customers,
    formulas,
    jobs,
    listeners,
    metrics,
    products,
    promotions,
    reward_types,
    rewards,
)
from server.admission import Admission, core_options
from server.auth import Authenticator
from server.deps import Dependencies
from server.interceptors import CallObserver, ServiceInterceptor

log = logging.getLogger("promo.server")

# Every servicer module exposes SERVICE_NAME, ROLES (method -> roles) and register(server, deps).
SERVICE_MODULES = (reward_types, promotions, rewards, campaigns, listeners, customers,
                   formulas, products, bonuses, codes, jobs)
SERVICE_NAMES = tuple(name for module in SERVICE_MODULES
                      for name in getattr(module, "SERVICE_NAMES", (module.SERVICE_NAME,)))
METHOD_ROLES: dict[str, set[str]] = {
    method: roles for module in SERVICE_MODULES for method, roles in module.ROLES.items()}

__all__ = ["Dependencies", "ListenError", "RunningServer", "start_server"]


class ListenError(RuntimeError):
    """The gRPC address cannot be listened on (the port is in use, or the host is not an
    address of this machine)."""


@dataclass
class RunningServer:
    server: aio.Server
    health: health.aio.HealthServicer
    port: int
    address: str

    async def stop(self, grace: float) -> None:
        """Stop taking new calls (health NOT_SERVING), let in-flight calls finish in ``grace``."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        log.info("server stopped", extra={"address": self.address})


def _credentials(settings: Settings) -> grpc.ServerCredentials | None:
    if not settings.tls_enabled:
        return None
    assert settings.tls_cert_file is not None and settings.tls_key_file is not None
    key = settings.tls_key_file.read_bytes()
    cert = settings.tls_cert_file.read_bytes()
    ca = settings.tls_client_ca_file.read_bytes() if settings.tls_client_ca_file else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                       require_client_auth=ca is not None)


async def start_server(settings: Settings, deps: Dependencies, *,
                       observer: CallObserver | None = None) -> RunningServer:
    """Build and start the server on settings.grpc_host:grpc_port (port 0 picks a free one)."""
    authenticator = Authenticator(settings.api_keys, METHOD_ROLES)
    observer = observer or metrics.RPC_METRICS  # Prometheus counters (server/metrics.py)
    admission = Admission(settings.max_calls_in_flight)
    metrics.watch_admission(admission)
    server = aio.server(interceptors=[ServiceInterceptor(authenticator, observer, admission)],
                        options=[("grpc.so_reuseport", 0),
                                 # A batch of 10,000 events with attributes can pass 4 MB.
                                 ("grpc.max_receive_message_length", 32 * 1024 * 1024),
                                 *core_options(settings.max_calls_in_flight)])
    deps.settings = settings
    deps.queue_name = settings.queue_name
    deps.secret_box = settings.secret_box()
    for module in SERVICE_MODULES:
        module.register(server, deps)

    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)

    target = f"{settings.grpc_host}:{settings.grpc_port}"
    credentials = _credentials(settings)
    try:
        if credentials is None:
            port = server.add_insecure_port(target)
        else:
            port = server.add_secure_port(target, credentials)
    except RuntimeError as exc:  # grpc's "Failed to bind to address ..."
        raise ListenError(f"could not listen on {target}") from exc
    if port == 0:
        raise ListenError(f"could not listen on {target}")
    await server.start()
    for name in (*SERVICE_NAMES, ""):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    address = f"{settings.grpc_host}:{port}"
    log.info("server listening", extra={"address": address, "tls": settings.tls_enabled,
                                        "api_keys": len(settings.api_keys)})
    if not settings.api_keys:
        log.warning("no API keys configured: every call except health and reflection will be "
                    "rejected with UNAUTHENTICATED; set PROMO_API_KEYS")
    return RunningServer(server=server, health=health_servicer, port=port, address=address)
