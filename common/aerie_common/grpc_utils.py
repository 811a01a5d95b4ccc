"""gRPC plumbing every service shares: server setup with health and reflection,
channel options, and draining on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from collections.abc import Callable, Iterable

import grpc
from google.protobuf.message import DecodeError
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
# Calls retried on UNAVAILABLE (the peer is down, restarting or draining): only those safe
# to repeat, because they change nothing. Not retried: Verifier/Generate and
# Drafter/DraftSession (streams with side effects; the verifier has its own fallback when
# the drafter is away), Memory/DeleteDocument and Memory/Rollback (each queues a job or
# moves the served version), and Memory/Ingest: its content-hash dedup keeps a replay from
# learning a document twice, but a replay of an ingest that did land would answer
# "duplicate" with no job id, hiding the job from the client. Clients see those as 503.
IDEMPOTENT_METHODS = {
    "grpc.health.v1.Health": ["Check"],
    "aerie.v1.Verifier": ["GetModelInfo", "Tokenize", "GetLoad"],
    "aerie.v1.Drafter": ["GetInfo"],
    "aerie.v1.Memory": ["GetJob", "GetNamespace", "Query"],
}
# Up to 3 retries within the call's own deadline. gRPC waits random(0, b) before each,
# with b = 0.2 s, then 0.4, 0.8 (capped at 2 s): exponential backoff with full jitter.
RETRY_POLICY = {
    "maxAttempts": 4,
    "initialBackoff": "0.2s",
    "maxBackoff": "2s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}
SERVICE_CONFIG = {
    "methodConfig": [
        {
            "name": [
                {"service": service, "method": method}
                for service, methods in IDEMPOTENT_METHODS.items()
                for method in methods
            ],
            "retryPolicy": RETRY_POLICY,
        }
    ]
}
CHANNEL_OPTIONS = [
    *_MESSAGE_SIZE_OPTIONS,
    ("grpc.enable_retries", 1),
    ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
    # This config is the one in force: none is taken from DNS (TXT records) for "dns:///" targets.
    ("grpc.service_config_disable_resolution", 1),
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


# The request field an INVALID_ARGUMENT is about ("documents[2].text"), carried in the
# trailing metadata, so that the gateway's OpenAI error envelope names it in `param`.
PARAM_METADATA_KEY = "aerie-param"


async def abort_invalid(context: grpc.aio.ServicerContext, message: str, param: str | None) -> None:
    """End the call with INVALID_ARGUMENT: ``message`` for the client, naming ``param``."""
    metadata = ((PARAM_METADATA_KEY, param),) if param else ()
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message, trailing_metadata=metadata)


def invalid_param(error: grpc.aio.AioRpcError) -> str | None:
    """The field ``abort_invalid`` named, if any."""
    return dict(error.trailing_metadata() or ()).get(PARAM_METADATA_KEY)


class HealthServicer(health_pb2_grpc.HealthServicer):
    """The standard gRPC health service (grpc.health.v1), written here rather than taken
    from grpc_health because its Watch streams never end: one watcher would hold
    ``server.stop`` for the whole grace period. Here, once the server drains, every status
    becomes NOT_SERVING for good, watchers are told, and their streams end."""

    def __init__(self) -> None:
        self._status: dict[str, int] = {}
        self._changed = asyncio.Condition()
        self._draining = False

    async def set(self, service: str, status: int) -> None:
        async with self._changed:
            if not self._draining:
                self._status[service] = status
                self._changed.notify_all()

    async def enter_graceful_shutdown(self) -> None:
        async with self._changed:
            self._draining = True
            self._status = dict.fromkeys(self._status, health_pb2.HealthCheckResponse.NOT_SERVING)
            self._changed.notify_all()

    async def Check(self, request, context) -> health_pb2.HealthCheckResponse:
        status = self._status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request, context) -> None:
        sent = None
        while True:
            async with self._changed:
                while (status := self._current(request.service)) == sent and not self._draining:
                    await self._changed.wait()
                draining = self._draining
            if status != sent:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                sent = status
            if draining:
                return

    def _current(self, service: str) -> int:
        return self._status.get(service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)


class GrpcService:
    """A grpc.aio server with the standard health service and reflection.

    ``register`` adds the service's own servicers; ``service_names`` are the full names
    reported by health and reflection.
    """

    def __init__(self, register: Callable[[grpc.aio.Server], None], service_names: Iterable[str]):
        self.server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=[RejectUndecodableRequests()])
        register(self.server)
        self.health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.service_names = list(service_names)
        reflection.enable_server_reflection(
            [*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server
        )

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

    async def wait_for_signal(self) -> None:
        """Return on SIGTERM or SIGINT."""
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        await stopping.wait()

    async def drain(self, drain_timeout_s: float) -> None:
        """Health goes NOT_SERVING for good (watchers are told, then their streams end),
        new calls are refused with UNAVAILABLE, and calls in flight get ``drain_timeout_s``
        to finish before they are cancelled."""
        log.info("draining: health NOT_SERVING, waiting up to %.0fs for in-flight calls", drain_timeout_s)
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace=drain_timeout_s)
        log.info("stopped")

    async def serve_until_signalled(self, drain_timeout_s: float) -> None:
        await self.wait_for_signal()
        await self.drain(drain_timeout_s)


class _Undecodable:
    """Stands in for a request message whose bytes did not parse."""

    def __init__(self, error: DecodeError):
        self.error = error


def _tolerant(deserializer: Callable[[bytes], object]) -> Callable[[bytes], object]:
    def deserialize(data: bytes) -> object:
        try:
            return deserializer(data)
        except DecodeError as exc:
            return _Undecodable(exc)

    return deserialize


async def _refuse_if_undecodable(request: object, context: grpc.aio.ServicerContext) -> None:
    if isinstance(request, _Undecodable):
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT, f"the request message does not parse: {request.error}"
        )


async def _responses(result):
    """A streaming method is an async generator, or a coroutine that calls context.write."""
    if hasattr(result, "__aiter__"):
        async for response in result:
            yield response
    else:
        await result


class RejectUndecodableRequests(grpc.aio.ServerInterceptor):
    """gRPC answers request bytes that do not parse as the method's message with UNKNOWN,
    as if the server had failed; this makes them INVALID_ARGUMENT, the caller's fault."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        deserializer, serializer = _tolerant(handler.request_deserializer), handler.response_serializer
        if handler.unary_unary:
            method = handler.unary_unary

            async def unary_unary(request, context):
                await _refuse_if_undecodable(request, context)
                return await method(request, context)

            return grpc.unary_unary_rpc_method_handler(unary_unary, deserializer, serializer)
        if handler.unary_stream:
            method = handler.unary_stream

            async def unary_stream(request, context):
                await _refuse_if_undecodable(request, context)
                async for response in _responses(method(request, context)):
                    yield response

            return grpc.unary_stream_rpc_method_handler(unary_stream, deserializer, serializer)
        if handler.stream_stream:
            method = handler.stream_stream

            async def checked(requests, context):
                async for request in requests:
                    await _refuse_if_undecodable(request, context)
                    yield request

            async def stream_stream(requests, context):
                async for response in _responses(method(checked(requests, context), context)):
                    yield response

            return grpc.stream_stream_rpc_method_handler(stream_stream, deserializer, serializer)
        return handler  # client streaming: no Aerie service has such a method
