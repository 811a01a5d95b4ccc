"""The reflection generator over the verifier's gRPC API (a fake verifier server): greedy,
counted, and speculative only when asked for."""

from __future__ import annotations

from concurrent import futures

import grpc
import pytest
from aerie_memory.generator import OpenAIGenerator, VerifierGenerator, make_generator
from aerie_memory.settings import MemorySettings
from aerie_proto.v1 import verifier_pb2_grpc

from tests.unit.test_gateway import REPLY_WORDS, FakeVerifier


@pytest.fixture(scope="module")
def verifier():
    fake = FakeVerifier()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    verifier_pb2_grpc.add_VerifierServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield fake, f"127.0.0.1:{port}"
    server.stop(grace=None)


@pytest.mark.parametrize("speculative", [False, True])
async def test_verifier_generator(verifier, speculative):
    fake, addr = verifier
    overrides = {"memory_generator_speculative": True} if speculative else {}
    generator = make_generator(MemorySettings(verifier_addr=addr, **overrides))
    assert isinstance(generator, VerifierGenerator)
    try:
        text = await generator([{"role": "user", "content": "Write questions."}], 3)
    finally:
        await generator.close()
    assert text == " ".join(REPLY_WORDS[:3])
    request = list(fake.requests.values())[-1]  # the latest call
    assert request.speculative is speculative
    assert request.sampling.temperature == 0.0 and request.sampling.max_tokens == 3
    assert generator.stats.calls == 1 and generator.stats.completion_tokens == 3


def test_an_openai_endpoint_replaces_the_verifier():
    generator = make_generator(MemorySettings(memory_generator_url="http://127.0.0.1:1/v1"))
    assert isinstance(generator, OpenAIGenerator)
    assert str(generator.client.base_url).rstrip("/") == "http://127.0.0.1:1/v1"
