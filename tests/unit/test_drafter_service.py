"""The Drafter and Verifier gRPC services over real loopback gRPC with tiny models:
trees over the stream equal the in-process proposer's, bad input gets INVALID_ARGUMENT
and leaves the services healthy, sessions are bounded and freed, and a drafter that dies
mid-generation never changes the verifier's output."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import replace

import grpc
import pytest
import torch
from aerie_common.draft_tree import DraftTree
from aerie_common.grpc_utils import GrpcService
from aerie_common.tensors import to_chunks
from aerie_common.thread_governor import ThreadGovernor
from aerie_drafter.proposer import DraftSession, TreeShape
from aerie_drafter.server import SERVICE_NAME as DRAFTER_SERVICE
from aerie_drafter.server import DrafterServicer
from aerie_proto.v1 import drafter_pb2, drafter_pb2_grpc, verifier_pb2, verifier_pb2_grpc
from aerie_verifier.drafter_client import GrpcDrafterFactory, InProcessDrafter
from aerie_verifier.engine import Engine
from aerie_verifier.sampling import SamplingParams
from aerie_verifier.server import SERVICE_NAME as VERIFIER_SERVICE
from aerie_verifier.server import VerifierServicer
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import build_tiny_llama

from .test_speculative import VOCAB, generate, prompts, random_head

SHAPE = TreeShape(depth=3, top_k=3, total_tokens=8)
WIDTH = 3 * 64  # three captured layers of the tiny target


class ServerThread:
    """A grpc.aio service on its own event loop in a background thread."""

    def __init__(self, register, service_name: str, port: int = 0):
        self.register, self.service_name, self.port = register, service_name, port
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._start())
        self.ready.set()
        self.loop.run_forever()

    async def _start(self):
        self.service = GrpcService(self.register, [self.service_name])
        self.port = await self.service.start("127.0.0.1", self.port)
        await self.service.set_serving(True)

    def start(self) -> ServerThread:
        self.thread.start()
        assert self.ready.wait(10)
        return self

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self):
        asyncio.run_coroutine_threadsafe(self.service.server.stop(0), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def target():
    return build_tiny_llama(VOCAB, seed=3, layers=8)


@pytest.fixture(scope="module")
def head(target):
    return random_head(target)


def start_drafter(head, max_sessions=8, port=0) -> tuple[ServerThread, DrafterServicer]:
    servicer = DrafterServicer(head, SHAPE, max_sessions, "test")
    server = ServerThread(
        lambda s: drafter_pb2_grpc.add_DrafterServicer_to_server(servicer, s), DRAFTER_SERVICE, port
    ).start()
    return server, servicer


@pytest.fixture
def drafter(head):
    server, servicer = start_drafter(head)
    yield server, servicer
    server.stop()


def channel_stub(addr):
    channel = grpc.insecure_channel(addr)
    return channel, drafter_pb2_grpc.DrafterStub(channel)


def is_serving(addr) -> bool:
    with grpc.insecure_channel(addr) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return response.status == health_pb2.HealthCheckResponse.SERVING


def features(rows, seed=0, width=WIDTH):
    return torch.randn(rows, width, generator=torch.Generator().manual_seed(seed))


def start_request(token_ids, hidden, chunk_bytes=1 << 20, **tree) -> list[drafter_pb2.DraftRequest]:
    chunks = to_chunks(hidden, chunk_bytes)
    start = drafter_pb2.DraftStart(
        request_id="r", token_ids=token_ids, tree=drafter_pb2.TreeShape(**tree), hidden_states=chunks[0]
    )
    return [drafter_pb2.DraftRequest(start=start)] + [
        drafter_pb2.DraftRequest(hidden_states_part=c) for c in chunks[1:]
    ]


def extend_request(token_ids, hidden) -> list[drafter_pb2.DraftRequest]:
    chunks = to_chunks(hidden)
    extend = drafter_pb2.DraftExtend(accepted_token_ids=token_ids, hidden_states=chunks[0])
    return [drafter_pb2.DraftRequest(extend=extend)] + [
        drafter_pb2.DraftRequest(hidden_states_part=c) for c in chunks[1:]
    ]


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


@pytest.mark.parametrize("context_ngram", [False, True], ids=["head", "head+context"])
def test_trees_over_grpc_equal_the_in_process_proposer(drafter, head, context_ngram):
    server, _ = drafter
    shape = replace(SHAPE, context_ngram=context_ngram)
    factory = GrpcDrafterFactory(server.addr, shape)
    assert tuple(factory.capture_layer_ids()) == head.config.capture_layer_ids
    remote, local = factory.open("r"), InProcessDrafter(DraftSession(head), shape)
    base = torch.randint(3, VOCAB, (30,), generator=torch.Generator().manual_seed(0)).tolist()
    token_ids = base + base[10:14]  # ends as it did before base[14]
    hidden = features(len(token_ids) - 1)
    tree, expected = remote.start(token_ids, hidden), local.start(token_ids, hidden)
    assert (tree.token_ids, tree.parents) == (expected.token_ids, expected.parents)
    assert tree.scores == pytest.approx(expected.scores)  # float32 on the wire
    root_children = [t for t, parent in zip(tree.token_ids, tree.parents, strict=True) if parent == -1]
    assert (base[14] in root_children) == context_ngram  # the verifier's choice reached the drafter
    more, more_hidden = [7, 8, 9], features(3, seed=1)
    assert remote.extend(more, more_hidden) == local.extend(more, more_hidden)
    remote.close()


def test_unset_tree_fields_take_the_drafters_defaults(head):
    servicer = DrafterServicer(head, replace(SHAPE, context_ngram=True), 1, "test")
    assert servicer._tree_shape(drafter_pb2.TreeShape()) == replace(SHAPE, context_ngram=True)
    asked = servicer._tree_shape(drafter_pb2.TreeShape(depth=2, context_ngram=False))
    assert asked == TreeShape(2, SHAPE.top_k, SHAPE.total_tokens, context_ngram=False)


def test_all_head_work_of_all_sessions_runs_on_one_compute_thread(head):
    """One thread does every session's torch work, never the event loop's (see
    aerie_common.torch_threads for why a second torch thread slows every forward)."""
    threads = []

    class RecordingSession(DraftSession):
        def start(self, token_ids, hidden):
            threads.append(threading.current_thread())
            super().start(token_ids, hidden)

        def propose(self, shape):
            threads.append(threading.current_thread())
            return super().propose(shape)

    class RecordingGovernor(ThreadGovernor):
        # its rounds, where it may change the thread count: the compute thread's own
        def start_round(self):
            threads.append(("round", threading.current_thread()))

        def end_round(self, waited_s=0.0):
            threads.append(("round", threading.current_thread()))

    servicer = DrafterServicer(
        head,
        SHAPE,
        8,
        "test",
        new_session=lambda counts: RecordingSession(head),
        thread_governor=RecordingGovernor(2, lambda n: None),
    )
    server = ServerThread(
        lambda s: drafter_pb2_grpc.add_DrafterServicer_to_server(servicer, s), DRAFTER_SERVICE
    ).start()
    try:
        factory = GrpcDrafterFactory(server.addr, SHAPE)
        sessions = [factory.open(f"r{i}") for i in range(3)]
        for i, remote in enumerate(sessions):
            remote.start(torch.randint(3, VOCAB, (12,)).tolist(), features(11, seed=i))
        for remote in sessions:
            remote.extend([5, 6], features(2))
            remote.close()
    finally:
        server.stop()
    rounds = [thread for kind, thread in (t for t in threads if isinstance(t, tuple))]
    threads = [t for t in threads if not isinstance(t, tuple)]
    assert len(threads) == 9  # 3 starts, 6 proposals
    assert len(rounds) == 12  # each of the 6 trees' work is a governed round
    assert len(set(threads + rounds)) == 1
    assert threads[0] is not server.thread and threads[0].name.startswith("drafter-compute")


def test_hidden_states_split_over_several_messages(drafter, head):
    server, _ = drafter
    channel, stub = channel_stub(server.addr)
    token_ids = torch.randint(3, VOCAB, (40,)).tolist()
    hidden = features(39)
    requests = start_request(token_ids, hidden, chunk_bytes=4096)
    assert len(requests) > 5  # the tensor really travels in parts
    response = next(stub.DraftSession(iter(requests), timeout=10))
    expected = InProcessDrafter(DraftSession(head), SHAPE).start(token_ids, hidden)
    assert list(response.tree.token_ids) == expected.token_ids
    channel.close()


def bad_streams():
    ok_tokens, ok_hidden = [5, 6, 7, 8], features(3)
    start = start_request(ok_tokens, ok_hidden)
    wrong_bytes = start_request(ok_tokens, ok_hidden)
    wrong_bytes[0].start.hidden_states.data = wrong_bytes[0].start.hidden_states.data[:-4]
    wrong_dtype = start_request(ok_tokens, ok_hidden)
    wrong_dtype[0].start.hidden_states.dtype = "int8"
    nan_hidden = ok_hidden.clone()
    nan_hidden[1, 3] = float("nan")
    huge_shape = start_request(ok_tokens, ok_hidden)
    del huge_shape[0].start.hidden_states.shape[:]
    huge_shape[0].start.hidden_states.shape.extend([1 << 40, WIDTH])
    part_first = [drafter_pb2.DraftRequest(hidden_states_part=to_chunks(ok_hidden)[0])]
    unfinished = start_request(ok_tokens, ok_hidden)
    unfinished[0].start.hidden_states.more = True
    return {
        "extend before start": extend_request([5], features(1)),
        "token out of vocabulary": start_request([5, 6, 7, VOCAB + 10], ok_hidden),
        "negative token": start_request([5, -6, 7, 8], ok_hidden),
        "too few hidden rows": start_request(ok_tokens, features(2)),
        "wrong hidden width": start_request(ok_tokens, features(3, width=WIDTH - 1)),
        "bytes do not match the shape": wrong_bytes,
        "unknown dtype": wrong_dtype,
        "NaN in hidden states": start_request(ok_tokens, nan_hidden),
        "absurd shape": huge_shape,
        "a part with nothing before it": part_first,
        "stream ends inside a tensor": unfinished,
        "empty request": [drafter_pb2.DraftRequest()],
        "tree too deep": start_request(ok_tokens, ok_hidden, depth=999),
        "two starts": start + start,
        "extend rows do not match tokens": start + extend_request([1, 2], features(1)),
        "only one token": start_request([5], features(0)),
    }


def test_malformed_draft_streams_get_invalid_argument(drafter):
    server, servicer = drafter
    channel, stub = channel_stub(server.addr)
    for name, requests in bad_streams().items():
        with pytest.raises(grpc.RpcError) as error:
            list(stub.DraftSession(iter(requests), timeout=10))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, error.value.details())
    assert is_serving(server.addr)
    wait_for(lambda: servicer.live_sessions == 0)
    assert servicer.sessions_closed == {"ended": 0, "cancelled": 0, "invalid": len(bad_streams()), "error": 0}
    # And a well-formed session still works.
    response = next(stub.DraftSession(iter(start_request([5, 6, 7, 8], features(3))), timeout=10))
    assert len(response.tree.token_ids) == SHAPE.total_tokens
    channel.close()


def test_sessions_are_bounded_and_freed_on_cancel(head):
    server, servicer = start_drafter(head, max_sessions=2)
    channel, stub = channel_stub(server.addr)
    try:
        held = []
        for _ in range(2):
            outgoing: queue.Queue = queue.Queue()  # left open: the session stays live
            for request in start_request([5, 6, 7, 8], features(3)):
                outgoing.put(request)
            call = stub.DraftSession(iter(outgoing.get, None), timeout=30)
            next(call)  # the session is live and has answered its first tree
            held.append(call)
        info = stub.GetInfo(drafter_pb2.DrafterInfoRequest(), timeout=5)
        assert (info.live_sessions, info.max_sessions) == (2, 2)
        with pytest.raises(grpc.RpcError) as error:
            list(stub.DraftSession(iter(start_request([5, 6, 7, 8], features(3))), timeout=10))
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        held[0].cancel()
        wait_for(lambda: stub.GetInfo(drafter_pb2.DrafterInfoRequest(), timeout=5).live_sessions == 1)
        response = next(stub.DraftSession(iter(start_request([5, 6, 7, 8], features(3))), timeout=10))
        assert response.tree.token_ids
        held[1].cancel()
        wait_for(lambda: servicer.live_sessions == 0)
        # /metrics tells the same story: one refused, three let go of by their callers
        # (ended or cancelled, depending on when the hang-up reached the drafter).
        assert servicer.sessions_rejected == 1
        closed = servicer.sessions_closed
        assert closed["ended"] + closed["cancelled"] == servicer.sessions_total == 3, closed
        assert closed["invalid"] == closed["error"] == 0
    finally:
        channel.close()
        server.stop()


@pytest.fixture
def make_engine(target, tiny_tokenizer):
    engines = []

    def make(factory, breaker_cooldown_s=10.0):
        engine = Engine(
            target,
            tiny_tokenizer,
            max_running=4,
            drafter_factory=factory,
            breaker_cooldown_s=breaker_cooldown_s,
        )
        engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop()


def test_greedy_over_grpc_is_lossless(drafter, make_engine):
    server, servicer = drafter
    plain = make_engine(None)
    speculative = make_engine(GrpcDrafterFactory(server.addr, SHAPE))
    for prompt in prompts(4, seed=5):
        params = SamplingParams(max_tokens=24)
        expected, _ = generate(plain, prompt, params, speculative=False)
        tokens, final = generate(speculative, prompt, params, speculative=True)
        assert tokens == expected
        assert final.speculative.drafts > 0
    wait_for(lambda: servicer.live_sessions == 0)
    assert servicer.sessions_total == 4


def test_an_untrained_head_is_declined_unless_asked_for(head, make_engine):
    """A drafter serving an untrained head would only slow decoding down: the verifier
    decodes plainly without opening a session or blaming the drafter, unless told to
    accept it (AERIE_DRAFTER_HEAD=untrained)."""
    servicer = DrafterServicer(head, SHAPE, 8, "untrained")
    server = ServerThread(
        lambda s: drafter_pb2_grpc.add_DrafterServicer_to_server(servicer, s), DRAFTER_SERVICE
    ).start()
    try:
        plain = make_engine(None)
        declining = make_engine(GrpcDrafterFactory(server.addr, SHAPE, accept_untrained=False))
        accepting = make_engine(GrpcDrafterFactory(server.addr, SHAPE, accept_untrained=True))
        prompt, params = [5, 6, 7, 8, 9], SamplingParams(max_tokens=16)
        expected, _ = generate(plain, prompt, params, speculative=False)

        tokens, final = generate(declining, prompt, params, speculative=True)
        assert tokens == expected
        assert final.speculative.drafts == 0
        assert servicer.sessions_total == 0
        assert declining.breaker.allow()  # not counted as a drafter failure

        tokens, final = generate(accepting, prompt, params, speculative=True)
        assert tokens == expected
        assert final.speculative.drafts > 0
        assert servicer.sessions_total == 1
    finally:
        server.stop()


def test_killing_the_drafter_mid_generation_keeps_the_output(head, make_engine):
    server, servicer = start_drafter(head)
    port = server.port
    plain = make_engine(None)
    factory = GrpcDrafterFactory(server.addr, SHAPE, step_timeout_s=2.0)
    speculative = make_engine(factory, breaker_cooldown_s=0.5)
    prompt, params = [5, 6, 7, 8, 9], SamplingParams(max_tokens=120)
    expected, _ = generate(plain, prompt, params, speculative=False)

    done, events = threading.Event(), []

    def on_event(event):
        events.append(event)
        if event.finish_reason is not None:
            done.set()

    speculative.submit("killed", prompt, params, on_event, speculative=True)
    wait_for(lambda: sum(len(e.token_ids) for e in events) >= 10)
    server.stop()
    assert done.wait(60)
    assert [t for e in events for t in e.token_ids] == expected
    assert speculative.breaker.failures >= 1
    assert speculative.totals.drafter_fallbacks == 1  # aerie:verifier_drafter_fallbacks_total

    # Speculation resumes by itself once the drafter is back.
    revived, _ = start_drafter(head, port=port)
    try:
        deadline = time.monotonic() + 15  # breaker cooldown, then the channel's reconnect backoff
        while True:
            tokens, final = generate(speculative, prompt, SamplingParams(max_tokens=20), speculative=True)
            assert tokens == expected[:20]
            if final.speculative.drafts > 0:
                break
            assert time.monotonic() < deadline, "speculation did not resume"
            time.sleep(0.2)
    finally:
        revived.stop()


def test_malformed_generate_requests_get_invalid_argument(target, tiny_tokenizer):
    engine = Engine(target, tiny_tokenizer, max_running=2)
    engine.start()
    servicer = VerifierServicer(engine, "tiny", "cpu", "float32")
    server = ServerThread(
        lambda s: verifier_pb2_grpc.add_VerifierServicer_to_server(servicer, s), VERIFIER_SERVICE
    ).start()
    try:
        with grpc.insecure_channel(server.addr) as channel:
            stub = verifier_pb2_grpc.VerifierStub(channel)
            bad = {
                "token out of vocabulary": verifier_pb2.GenerateRequest(prompt_token_ids=[5, VOCAB + 1]),
                "negative token": verifier_pb2.GenerateRequest(prompt_token_ids=[-1]),
                "negative temperature": verifier_pb2.GenerateRequest(
                    prompt_token_ids=[5], sampling=verifier_pb2.SamplingParams(temperature=-1)
                ),
                "top_p above 1": verifier_pb2.GenerateRequest(
                    prompt_token_ids=[5], sampling=verifier_pb2.SamplingParams(top_p=1.5)
                ),
                "prompt past the context": verifier_pb2.GenerateRequest(prompt_token_ids=[5] * 600),
                "empty stop string": verifier_pb2.GenerateRequest(
                    prompt_token_ids=[5], sampling=verifier_pb2.SamplingParams(stop=[""])
                ),
            }
            for name, request in bad.items():
                with pytest.raises(grpc.RpcError) as error:
                    list(stub.Generate(request, timeout=10))
                assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
            assert is_serving(server.addr)
            good = list(
                stub.Generate(
                    verifier_pb2.GenerateRequest(
                        prompt_token_ids=[5, 6], sampling=verifier_pb2.SamplingParams(max_tokens=3)
                    ),
                    timeout=10,
                )
            )
            assert sum(len(r.token_ids) for r in good) == 3
    finally:
        server.stop()
        engine.stop()


class SlowSession:
    def __init__(self, context_counts=None):
        pass

    def start(self, token_ids, hidden):
        pass

    def extend(self, token_ids, hidden):
        pass

    def close(self):
        pass

    def propose(self, shape):
        time.sleep(1.0)
        return DraftTree([7], [-1], [0.0])


class CyclicSession(SlowSession):
    def propose(self, shape):
        return DraftTree([7, 8], [1, 0], [0.0, 0.0])


@pytest.mark.parametrize("session", [SlowSession, CyclicSession], ids=["slow", "malformed"])
def test_slow_or_malformed_drafts_over_grpc_fall_back(head, make_engine, session):
    servicer = DrafterServicer(head, SHAPE, 8, "test", new_session=session)
    server = ServerThread(
        lambda s: drafter_pb2_grpc.add_DrafterServicer_to_server(servicer, s), DRAFTER_SERVICE
    ).start()
    try:
        plain = make_engine(None)
        speculative = make_engine(GrpcDrafterFactory(server.addr, SHAPE, step_timeout_s=0.3))
        expected, _ = generate(plain, [5, 6, 7], SamplingParams(max_tokens=16), speculative=False)
        tokens, final = generate(speculative, [5, 6, 7], SamplingParams(max_tokens=16), speculative=True)
        assert tokens == expected
        assert final.speculative.drafts == 0
        assert speculative.breaker.failures == 1
        assert speculative.totals.drafter_fallbacks == 1
        wait_for(lambda: servicer.live_sessions == 0)  # the verifier closed the stream
    finally:
        server.stop()


class PausedSession(DraftSession):
    def propose(self, shape):
        time.sleep(0.2)
        return super().propose(shape)


def test_the_drafter_reports_its_own_time_so_the_hop_is_the_rest_of_the_wait(head):
    servicer = DrafterServicer(head, SHAPE, 8, "test", new_session=lambda counts: PausedSession(head))
    server = ServerThread(
        lambda s: drafter_pb2_grpc.add_DrafterServicer_to_server(servicer, s), DRAFTER_SERVICE
    ).start()
    try:
        remote = GrpcDrafterFactory(server.addr, SHAPE).open("r")
        for call in (lambda: remote.start([5, 6, 7], features(2)), lambda: remote.extend([8], features(1))):
            hop_before, started = remote.hop_seconds, time.perf_counter()
            call()
            waited = time.perf_counter() - started
            assert waited >= 0.2
            # the 0.2 s of drafting is the drafter's, not the hop's
            assert 0 < remote.hop_seconds - hop_before <= waited - 0.2
        remote.close()
    finally:
        server.stop()
