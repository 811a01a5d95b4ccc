"""gRPC plumbing every service shares: server setup with health and reflection,
channel options, and draining on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

log = logging.getLogger(__name__)

# Hidden states of a long prompt are megabytes; raise the 4 MiB default deliberately
# on both ends. Larger tensors are still chunked (see drafter.proto).
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

_MESSAGE_SIZE_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
CHANNEL_OPTIONS = [
    *_MESSAGE_SIZE_OPTIONS,
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # With a "dns:///" target naming a headless Kubernetes Service, spread calls over every
    # pod the name resolves to; with one address this is the same as pick_first.
    ("grpc.lb_policy_name", "round_robin"),
    # A restarted peer is found again within seconds, not gRPC's default of up to 2 minutes.
    ("grpc.max_reconnect_backoff_ms", 5_000),
]
SERVER_OPTIONS = [
    *_MESSAGE_SIZE_OPTIONS,
    # Accept the clients' 30 s keepalive pings on idle connections. gRPC servers refuse
    # pings more often than every 5 minutes by default and answer with GOAWAY
    # ("too_many_pings"), which fails calls that start at that moment with UNAVAILABLE.
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
]


def insecure_channel(addr: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(addr, options=CHANNEL_OPTIONS)


class GrpcService:
    """A grpc.aio server with the standard health service and reflection.

    ``register`` adds the service's own servicers; ``service_names`` are the full names
    reported by health and reflection.
    """

    def __init__(self, register: Callable[[grpc.aio.Server], None], service_names: Iterable[str]):
        self.server = grpc.aio.server(options=SERVER_OPTIONS)
        register(self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.service_names = list(service_names)
        reflection.enable_server_reflection(
            [*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server
        )
        self._stopping = asyncio.Event()

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ["", *self.service_names]:
            await self.health.set(name, status)

    async def start(self, host: str, port: int) -> int:
        bound = self.server.add_insecure_port(f"{host}:{port}")
        if bound == 0:
            raise RuntimeError(f"could not bind {host}:{port}")
        # grpc's health servicer reports SERVING by default; start NOT_SERVING so nobody is
        # routed here before the service says it is ready.
        await self.set_serving(False)
        await self.server.start()
        return bound

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)

    async def serve_until_signalled(self, drain_timeout_s: float, on_drain: Callable[[], None] | None = None):
        """Serve until SIGTERM/SIGINT, then drain: health goes NOT_SERVING first, new calls
        are refused, and in-flight calls get ``drain_timeout_s`` to finish."""
        self.install_signal_handlers()
        await self._stopping.wait()
        log.info("draining: health NOT_SERVING, waiting up to %.0fs for in-flight calls", drain_timeout_s)
        await self.set_serving(False)
        if on_drain is not None:
            on_drain()
        await self.server.stop(grace=drain_timeout_s)
        log.info("stopped")


def split_host_port(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host or "0.0.0.0", int(port)
