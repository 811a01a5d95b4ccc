"""Chat with memory when the memory service fails: refused connections, a peer that
accepts the connection and never answers, a slow namespace lookup, questions slower than
the chat's memory budget or than each call's memory timeout. Chat answers anyway, with the
user's own messages, the response's ``memory.skipped`` says why (in the body, or in the
first chunk of a stream), and the gateway waits no longer than the configured limit.

The verifier is the fake of test_gateway (a real gRPC server with canned replies); the
memory service is test_gateway_memory's fake, with faults added.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from aerie_gateway.app import create_app
from aerie_gateway.settings import GatewaySettings
from aerie_proto.v1 import memory_pb2_grpc, verifier_pb2_grpc

from tests.unit.test_gateway import REPLY_WORDS, FakeVerifier, asgi_client, chat_body, free_port, sse_payloads
from tests.unit.test_gateway_memory import FakeMemory

# A fault lasts FAULT_S; the gateway is configured to give up after LIMIT_S. SLACK_S is
# what a loaded machine may add; LIMIT_S + SLACK_S stays well below FAULT_S, so a gateway
# that waited for the fault to end fails the timing checks.
FAULT_S = 8.0
LIMIT_S = 1.0
SLACK_S = 3.0
GENEROUS_S = 30.0  # a limit that is not the one under test
QUESTION = "Who governs Naxpry?"  # the fake memory knows the answer


class FaultyMemory(FakeMemory):
    """The fake memory service, with a delay before its namespace lookup or its answers.
    Delays end early at teardown, so no server thread outlives the tests."""

    def __init__(self):
        super().__init__()
        self.namespace_delay_s = 0.0
        self.query_delay_s = 0.0
        self.released = threading.Event()

    def GetNamespace(self, request, context):
        self.released.wait(self.namespace_delay_s)
        return super().GetNamespace(request, context)

    def Query(self, request, context):
        self.released.wait(self.query_delay_s)
        return super().Query(request, context)


@pytest.fixture(scope="module")
def fakes() -> Iterator[tuple[FakeVerifier, FaultyMemory, str]]:
    verifier, memory = FakeVerifier(), FaultyMemory()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    verifier_pb2_grpc.add_VerifierServicer_to_server(verifier, server)
    memory_pb2_grpc.add_MemoryServicer_to_server(memory, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield verifier, memory, f"127.0.0.1:{port}"
    memory.released.set()
    server.stop(grace=None)


@pytest.fixture
def silent_peer() -> Iterator[str]:
    """An address whose listener never accepts: TCP connects (the kernel's backlog), but
    no HTTP/2 answer ever comes, as with a hung process or a black-holed route."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield f"127.0.0.1:{listener.getsockname()[1]}"


@pytest.fixture
def memory_fault(fakes, silent_peer):
    """Sets up one fault; returns the gateway settings that go with it and what
    ``memory.skipped`` must say."""
    _, memory, addr = fakes

    def arrange(fault: str) -> tuple[dict, str]:
        limits = dict(health_timeout_s=GENEROUS_S, memory_timeout_s=GENEROUS_S, memory_chat_budget_s=LIMIT_S)
        past_budget = f"memory took longer than {LIMIT_S:g}s"
        if fault == "refused":
            # gRPC reports a refused connection as UNAVAILABLE after about a second of
            # connection attempts; with no tighter limit, that is what chat says.
            limits.update(memory_chat_budget_s=GENEROUS_S)
            return dict(limits, memory_addr=f"127.0.0.1:{free_port()}"), "memory unavailable (UNAVAILABLE"
        if fault == "silent":
            return dict(limits, memory_addr=silent_peer), past_budget
        if fault == "slow namespace lookup":
            memory.namespace_delay_s = FAULT_S
            return dict(limits, memory_addr=addr), past_budget
        if fault == "questions past the budget":
            memory.query_delay_s = FAULT_S
            return dict(limits, memory_addr=addr), past_budget
        assert fault == "questions past the memory timeout"
        memory.query_delay_s = FAULT_S
        limits.update(memory_timeout_s=LIMIT_S, memory_chat_budget_s=GENEROUS_S)
        return dict(limits, memory_addr=addr), "memory unavailable (DEADLINE_EXCEEDED"

    yield arrange
    memory.namespace_delay_s = memory.query_delay_s = 0.0


FAULTS = [
    "refused",
    "silent",
    "slow namespace lookup",
    "questions past the budget",
    "questions past the memory timeout",
]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("fault", FAULTS)
async def test_chat_answers_without_memory_and_says_why(fakes, memory_fault, fault, stream):
    verifier, _, addr = fakes
    overrides, skipped = memory_fault(fault)
    settings = GatewaySettings(
        **{
            "verifier_addr": addr,
            "drafter_addr": addr,
            "redis_url": f"redis://127.0.0.1:{free_port()}/0",  # chat never touches Redis
            "api_keys": "",
            "served_model_name": "",
            "grpc_timeout_s": GENEROUS_S,
            **overrides,
        }
    )
    body = chat_body(QUESTION, memory={"namespace": "ns"}, stream=stream)
    async with asgi_client(create_app(settings)) as client:
        started = time.monotonic()
        response = await client.post("/v1/chat/completions", json=body)
        elapsed = time.monotonic() - started
    assert response.status_code == 200, response.text

    if stream:
        payloads = sse_payloads(response.text)
        assert payloads[-1] == "[DONE]"
        chunks = [json.loads(p) for p in payloads[:-1]]
        info, completion_id = chunks[0]["memory"], chunks[0]["id"]
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    else:
        completion = response.json()
        info, completion_id = completion["memory"], completion["id"]
        text = completion["choices"][0]["message"]["content"]

    assert text == " ".join(REPLY_WORDS), "chat answered"
    assert info["skipped"].startswith(skipped) and info["skipped"].endswith("answered without it")
    assert not info["used"] and info["findings"] == []
    sent = verifier.requests[completion_id]
    assert [(m.role, m.content) for m in sent.messages] == [("user", QUESTION)], "no memory composed in"
    assert info["seconds"] < LIMIT_S + SLACK_S, "the gateway waited past its limit for the memory"
    assert elapsed < LIMIT_S + SLACK_S
