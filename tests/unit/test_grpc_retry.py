"""gRPC retries and deadlines: channels from aerie_common.grpc_utils retry only the
idempotent calls, only on UNAVAILABLE, a bounded number of times (checked against a real
loopback server that fails on demand); and every RPC the services make carries a deadline
(checked in their source)."""

from __future__ import annotations

import ast
import threading
from collections import Counter
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from aerie_common.grpc_utils import IDEMPOTENT_METHODS, RETRY_POLICY, insecure_channel
from aerie_proto.v1 import drafter_pb2, memory_pb2, verifier_pb2
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2

REPO = Path(__file__).resolve().parents[2]
SERVICES = [
    service
    for file in (
        verifier_pb2.DESCRIPTOR,
        drafter_pb2.DESCRIPTOR,
        memory_pb2.DESCRIPTOR,
        health_pb2.DESCRIPTOR,
    )
    for service in file.services_by_name.values()
]
METHODS = {(service.full_name, method.name): method for service in SERVICES for method in service.methods}
RETRIED = sorted((service, method) for service, methods in IDEMPOTENT_METHODS.items() for method in methods)
NOT_RETRIED = sorted(set(METHODS) - set(RETRIED))
TIMEOUT_S = 20.0  # generous: only a hang would reach it


class FlakyServer:
    """Answers every method of Aerie's protos (and grpc.health.v1) with an empty reply,
    after failing the first ``failures`` attempts of each with ``code``; counts attempts."""

    def __init__(self) -> None:
        self.attempts: Counter[str] = Counter()
        self.failures = 0
        self.code = grpc.StatusCode.UNAVAILABLE
        self._lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        self.server.add_generic_rpc_handlers([self._handlers(service) for service in SERVICES])
        self.addr = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"

    def reset(self, failures: int, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        with self._lock:
            self.attempts.clear()
            self.failures, self.code = failures, code

    def _attempt(self, path: str, context: grpc.ServicerContext) -> None:
        with self._lock:
            self.attempts[path] += 1
            failing = self.attempts[path] <= self.failures
        if failing:
            context.abort(self.code, f"attempt {self.attempts[path]} fails on purpose")

    def _handlers(self, service) -> grpc.GenericRpcHandler:
        handlers = {}
        for method in service.methods:
            request_class = message_factory.GetMessageClass(method.input_type)
            reply_class = message_factory.GetMessageClass(method.output_type)
            path = f"/{service.full_name}/{method.name}"
            make = {
                (False, False): grpc.unary_unary_rpc_method_handler,
                (False, True): grpc.unary_stream_rpc_method_handler,
                (True, False): grpc.stream_unary_rpc_method_handler,
                (True, True): grpc.stream_stream_rpc_method_handler,
            }[(method.client_streaming, method.server_streaming)]
            handlers[method.name] = make(
                self._behaviour(path, method.server_streaming, reply_class),
                request_deserializer=request_class.FromString,
                response_serializer=reply_class.SerializeToString,
            )
        return grpc.method_handlers_generic_handler(service.full_name, handlers)

    def _behaviour(self, path: str, server_streaming: bool, reply_class):
        def unary_reply(request, context):
            self._attempt(path, context)
            return reply_class()

        def streamed_reply(request, context):
            self._attempt(path, context)
            yield reply_class()

        return streamed_reply if server_streaming else unary_reply


@pytest.fixture(scope="module")
def flaky():
    server = FlakyServer()
    server.server.start()
    yield server
    server.server.stop(grace=None)


async def call(channel: grpc.aio.Channel, service: str, method: str) -> None:
    """One call of ``service/method`` with an empty request, read to its end."""
    descriptor = METHODS[(service, method)]
    request_class = message_factory.GetMessageClass(descriptor.input_type)
    reply_class = message_factory.GetMessageClass(descriptor.output_type)
    path = f"/{service}/{method}"
    kinds = {
        (False, False): channel.unary_unary,
        (False, True): channel.unary_stream,
        (True, False): channel.stream_unary,
        (True, True): channel.stream_stream,
    }
    multicallable = kinds[(descriptor.client_streaming, descriptor.server_streaming)](
        path, request_serializer=request_class.SerializeToString, response_deserializer=reply_class.FromString
    )
    # A request stream sends nothing: the server fails the call on arrival, and a message
    # racing that failure would end the call INTERNAL instead of with the server's status.
    request = iter([]) if descriptor.client_streaming else request_class()
    if descriptor.server_streaming:
        _ = [reply async for reply in multicallable(request, timeout=TIMEOUT_S)]
    else:
        await multicallable(request, timeout=TIMEOUT_S)


def test_retried_methods_exist_and_exclude_the_ones_with_effects():
    assert set(RETRIED) <= set(METHODS), set(RETRIED) - set(METHODS)
    for name in ("Generate", "DraftSession", "Ingest", "DeleteDocument", "Rollback"):
        assert not any(method == name for _, method in RETRIED)
    assert RETRY_POLICY["retryableStatusCodes"] == ["UNAVAILABLE"]


@pytest.mark.parametrize(("service", "method"), RETRIED)
async def test_idempotent_call_is_retried_on_unavailable(flaky, service, method):
    flaky.reset(failures=2)
    async with insecure_channel(flaky.addr) as channel:
        await call(channel, service, method)
    assert flaky.attempts[f"/{service}/{method}"] == 3


@pytest.mark.parametrize(("service", "method"), NOT_RETRIED)
async def test_other_calls_are_attempted_once(flaky, service, method):
    flaky.reset(failures=1)
    async with insecure_channel(flaky.addr) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await call(channel, service, method)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert flaky.attempts[f"/{service}/{method}"] == 1


async def test_retries_are_bounded(flaky):
    flaky.reset(failures=100)
    async with insecure_channel(flaky.addr) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await call(channel, "aerie.v1.Memory", "GetJob")
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert flaky.attempts["/aerie.v1.Memory/GetJob"] == RETRY_POLICY["maxAttempts"]


@pytest.mark.parametrize(
    "code", [grpc.StatusCode.INTERNAL, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.NOT_FOUND]
)
async def test_only_unavailable_is_retried(flaky, code):
    flaky.reset(failures=1, code=code)
    async with insecure_channel(flaky.addr) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await call(channel, "aerie.v1.Verifier", "GetModelInfo")
    assert failed.value.code() == code
    assert flaky.attempts["/aerie.v1.Verifier/GetModelInfo"] == 1


def test_verifiers_drafter_client_retries_get_info(flaky):
    """The verifier's (synchronous) drafter channel takes the same options."""
    from aerie_verifier.drafter_client import GrpcDrafterFactory

    flaky.reset(failures=2)
    factory = GrpcDrafterFactory(flaky.addr, shape=None)
    try:
        assert factory.info(timeout_s=TIMEOUT_S) == drafter_pb2.DrafterInfo()
    finally:
        factory.channel.close()
    assert flaky.attempts["/aerie.v1.Drafter/GetInfo"] == 3


def rpc_calls_without_deadline(source: str) -> list[str]:
    """Calls of an RPC method name (``stub.Generate(...)``) that pass no ``timeout=``.
    Calls on bare ``self`` are a servicer calling its own handler, not an RPC."""
    rpc_names = {method for _, method in METHODS}
    missing = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        if node.func.attr not in rpc_names:
            continue
        if isinstance(node.func.value, ast.Name) and node.func.value.id == "self":
            continue
        if not any(keyword.arg == "timeout" for keyword in node.keywords):
            missing.append(f"line {node.lineno}: {ast.unparse(node.func)}")
    return missing


def test_the_deadline_audit_catches_a_call_without_one():
    assert rpc_calls_without_deadline("stub.GetJob(request)\nstub.Query(r, timeout=1)\n") == [
        "line 1: stub.GetJob"
    ]


def test_every_rpc_call_has_a_deadline():
    sources = [
        path
        for root in ("services", "common/aerie_common", "bench", "scripts")
        for path in (REPO / root).rglob("*.py")
    ]
    missing = {
        str(path.relative_to(REPO)): found
        for path in sources
        if (found := rpc_calls_without_deadline(path.read_text(encoding="utf-8")))
    }
    assert missing == {}
