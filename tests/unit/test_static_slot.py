"""Fixed-size KV cache slots (static_slot.py): their forwards match the growing cache's,
padding and stale entries stay invisible, and an engine with slots decodes exactly as one
without. On a CPU the slot's forward runs uncaptured, and a fullgraph trace checks that it
holds no host synchronisation or data-dependent branch; on a machine with a GPU the first
test also runs there, the forwards captured as CUDA graphs and replayed."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from aerie_common.draft_tree import DraftTree
from aerie_drafter.proposer import TreeShape, draft_slots
from aerie_verifier.drafter_client import InProcessDrafterFactory
from aerie_verifier.engine import Engine, make_slots
from aerie_verifier.kv_cache import GrowingCache
from aerie_verifier.sampling import SamplingParams
from aerie_verifier.speculative import HiddenCapture
from aerie_verifier.static_slot import MAX_ROWS, StaticSlot, row_bucket
from aerie_verifier.tree_verify import keep_cache_entries, tree_inputs

from tests.conftest import build_tiny_llama

from .spec_helpers import Factory, OracleDrafter
from .test_speculative import VOCAB, prompts, random_head

LAYERS = (0, 2, 3)
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")),
]


@pytest.fixture(scope="module")
def target():
    return build_tiny_llama(VOCAB, seed=5, layers=4, ctx=256)


@pytest.fixture
def capture(target):
    capture = HiddenCapture(target)
    yield capture
    capture.close()


class Reference:
    """The engine's growing-cache forwards, step for step."""

    def __init__(self, model, capture):
        self.model, self.capture, self.cache = model, capture, GrowingCache()
        self.device = model.device

    def prefill(self, ids):
        with self.capture.layers(LAYERS):
            logits = self.model(input_ids=torch.tensor([ids], device=self.device), past_key_values=self.cache)
            return logits.logits[0, -1], self.capture.features(LAYERS)

    def decode(self, token):
        ids = torch.tensor([[token]], device=self.device)
        return self.model(input_ids=ids, past_key_values=self.cache).logits[0, -1]

    def verify(self, root, tree):
        self.past = self.cache.get_seq_length()
        inputs = tree_inputs(root, tree, self.past, self.model.config, self.device, torch.float32)
        with self.capture.layers(LAYERS):
            logits = self.model(**inputs.model_kwargs(), past_key_values=self.cache).logits[0]
            return logits, self.capture.features(LAYERS)

    def keep(self, accepted):
        keep_cache_entries(self.cache, self.past, accepted)


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def random_tree(n, seed):
    gen = torch.Generator().manual_seed(seed)
    parents = [-1] + [int(torch.randint(-1, i, (1,), generator=gen)) for i in range(1, n)]
    return DraftTree(torch.randint(3, VOCAB, (n,), generator=gen).tolist(), parents, [0.0] * n)


def accepted_path(tree, leaf):
    path = [leaf]
    while tree.parents[path[-1]] >= 0:
        path.append(tree.parents[path[-1]])
    return path[::-1]


@pytest.mark.parametrize("device", DEVICES)
@torch.inference_mode()
def test_slot_forwards_match_the_growing_cache(target, device):
    model = target if device == "cpu" else copy.deepcopy(target).to(device)
    capture = HiddenCapture(model)
    slot = StaticSlot(model, 200, capture, cuda_graphs=True)
    assert slot.graphs.enabled == (device == "cuda")  # a CPU runs the slot uncaptured
    ref = Reference(model, capture)
    prompt = prompts(1, seed=4)[0] + [7, 8, 9]
    for got, want in zip(slot.prefill(prompt, LAYERS), ref.prefill(prompt), strict=True):
        close(got, want)
    token = 11
    for step in range(12):
        if step % 3 == 0:
            close(slot.decode(token), ref.decode(token))
            token = (token * 7) % VOCAB
            continue
        tree = random_tree(3 + 4 * step, seed=step)  # padded to 8, 16, ... rows
        logits, features = slot.verify(token, tree, LAYERS)
        want_logits, want_features = ref.verify(token, tree)
        assert logits.shape == want_logits.shape and features.shape == want_features.shape
        close(logits, want_logits)
        close(features, want_features)
        # Off the first-child chain, so entries move; sometimes nothing is accepted.
        accepted = [] if step == 4 else accepted_path(tree, len(tree) - 1)
        slot.keep(accepted)
        ref.keep(accepted)
        assert slot.length == ref.cache.get_seq_length()
        token = int(logits[0].argmax())
    close(slot.decode(token), ref.decode(token))
    assert slot.graphs.enabled == (device == "cuda")  # on a GPU: captured, no eager fallback
    capture.close()


@torch.inference_mode()
def test_a_prompt_longer_than_the_largest_tree_prefills(target, capture):
    slot = StaticSlot(target, MAX_ROWS + 100, capture, cuda_graphs=False)
    ref = Reference(target, capture)
    prompt = (list(range(3, VOCAB)) * 3)[: MAX_ROWS + 40]
    for got, want in zip(slot.prefill(prompt, LAYERS), ref.prefill(prompt), strict=True):
        close(got, want)
    close(slot.decode(9), ref.decode(9))


@torch.inference_mode()
def test_a_reused_slot_forgets_its_last_request(target, capture):
    slot = StaticSlot(target, 64, capture, cuda_graphs=False)
    slot.prefill(list(range(3, 60)))
    slot.decode(5)
    slot.reset()
    ref = Reference(target, capture)
    for got, want in zip(slot.prefill([4, 5, 6], LAYERS), ref.prefill([4, 5, 6]), strict=True):
        close(got, want)
    close(slot.decode(9), ref.decode(9))


def test_row_buckets_are_powers_of_two():
    assert [row_bucket(n) for n in (1, 2, 3, 5, 8, 9, 61, 64, 65)] == [1, 2, 4, 8, 8, 16, 64, 64, 128]
    assert MAX_ROWS >= 257


def test_fits_counts_the_rows_of_the_next_forward(target):
    slot = StaticSlot(target, 16, None, cuda_graphs=False)
    with torch.inference_mode():
        slot.prefill(list(range(3, 13)))
    assert slot.fits(6) and not slot.fits(7)


def test_the_slot_forward_traces_whole(target, capture):
    """What a CUDA graph cannot hold (reading a value back to the host, branching on one)
    also breaks a fullgraph trace; this catches it without a GPU."""
    slot = StaticSlot(target, 64, capture, cuda_graphs=False)
    with torch.inference_mode():
        slot.prefill(list(range(3, 20)), LAYERS)
    torch._dynamo.reset()
    traced = torch.compile(slot._forward, fullgraph=True, backend="eager", dynamic=False)
    rows = 8
    slot._past.fill_(slot.length)
    sees = torch.eye(rows, dtype=torch.bool)
    sees[:, 0] = True
    ids, depths = torch.arange(3, 3 + rows)[None], torch.tensor([0] + [1] * (rows - 1))
    with torch.inference_mode():
        logits, features = traced(ids, depths, sees, LAYERS)
        want_logits, want_features = slot._forward(ids, depths, sees, LAYERS)
    close(logits, want_logits)
    close(features, want_features)
    torch._dynamo.reset()


def run_requests(engine, requests):
    """Submit every (prompt, params, speculative) at once; their tokens in order."""
    done = threading.Semaphore(0)
    outputs = [[] for _ in requests]

    def on_event(i):
        def record(event):
            assert event.error is None, event.error
            outputs[i].extend(event.token_ids)
            if event.finish_reason is not None:
                done.release()

        return record

    for i, (prompt, params, speculative) in enumerate(requests):
        engine.submit(f"r{i}", prompt, params, on_event(i), speculative=speculative)
    for _ in requests:
        assert done.acquire(timeout=120)
    return outputs


@pytest.mark.parametrize(
    ("device", "drafter"),
    [("cpu", "head"), ("cpu", "oracle"), pytest.param("cuda", "head", marks=DEVICES[1].marks)],
)
def test_an_engine_with_slots_decodes_exactly_as_without(target, tiny_tokenizer, device, drafter):
    """On a GPU too, the slots' forwards replayed as CUDA graphs, with the engine's capture
    hooks and slot warm-up in play, and the head's tree growth replayed from its draft
    slots' graphs in between, as in the verifier (fp32, so that near-ties hold)."""
    model = target if device == "cpu" else copy.deepcopy(target).to(device)
    if drafter == "head":
        head = random_head(model).for_drafting(device, torch.float32)
        head_slots = draft_slots(head, True, 256)  # None on a CPU
        factory = InProcessDrafterFactory(head, TreeShape(depth=4, top_k=3, total_tokens=12), head_slots)
    else:
        factory = Factory(lambda: OracleDrafter(target, 5), capture_layer_ids=LAYERS)
    # Eight at once, four running, on two slots of 96 tokens: some requests take a slot,
    # the rest decode on growing caches beside them, batched. One fills its slot and
    # carries on eagerly; one samples.
    requests = [
        (prompt, SamplingParams(max_tokens=40 + 9 * (i % 3)), i % 4 != 3)
        for i, prompt in enumerate(prompts(6, seed=2))
    ]
    requests.append((list(range(3, 90)), SamplingParams(max_tokens=30), True))
    requests.append((prompts(1, seed=7)[0], SamplingParams(temperature=0.8, seed=5, max_tokens=40), True))
    outputs = {}
    for name, slots in (("growing", []), ("slots", make_slots(model, 2, 96))):
        engine = Engine(model, tiny_tokenizer, max_running=4, drafter_factory=factory, slots=slots)
        engine.start()
        try:
            outputs[name] = run_requests(engine, requests)
        finally:
            engine.stop()  # after the last request's retirement, which follows its last event
        if slots:
            assert len(engine._free_slots) == 2  # every request gave its slot back
            assert sum(slot.verified for slot in slots) > 0
            assert all(slot.graphs.enabled == (device == "cuda") for slot in slots)
    if device == "cuda" and drafter == "head":
        assert head_slots.made and not head_slots.graphs_failed
    assert outputs["slots"] == outputs["growing"]


def test_a_request_that_fills_its_slot_carries_on_without_it(target, tiny_tokenizer):
    """A request longer than its slot (as every one without max_tokens is) leaves it for
    a growing cache when the next tree no longer fits, and decodes on as before."""
    factory = Factory(lambda: OracleDrafter(target, 6), capture_layer_ids=LAYERS)
    prompt = list(range(3, 40))
    plain = Engine(target, tiny_tokenizer, max_running=1)
    slotted = Engine(
        target, tiny_tokenizer, max_running=1, drafter_factory=factory, slots=make_slots(target, 1, 64)
    )
    outputs = []
    for engine, speculative in ((plain, False), (slotted, True)):
        engine.start()
        try:
            outputs.append(run_requests(engine, [(prompt, SamplingParams(max_tokens=60), speculative)])[0])
        finally:
            engine.stop()
    assert outputs[1] == outputs[0] and len(outputs[0]) == 60
    assert slotted._free_slots[0].verified > 0


def test_warming_prepares_every_tree_bucket_and_leaves_the_slot_as_it_was(target, capture):
    """``warm`` asks for the plain step's graph and one per row bucket up to the largest
    tree, and running what it would capture (as a capture does, twice) changes nothing the
    slot holds."""
    asked = []

    class RunsEachCapture:  # a GraphCache stand-in: runs the function as capture() would
        enabled = True

        def get(self, key, prepare):
            asked.append(key)
            run = prepare()
            run(), run()  # the side-stream warm-up, then the captured run
            return None  # and the slot runs eagerly

    warmed, plain = StaticSlot(target, 64, capture, cuda_graphs=False), StaticSlot(target, 64, capture, False)
    prompt = list(range(3, 20))
    with torch.inference_mode():
        warmed.prefill(prompt, LAYERS)
        plain.prefill(prompt, LAYERS)
        warmed.graphs = RunsEachCapture()
        warmed.warm(tree_nodes=12, layer_ids=LAYERS)
        assert asked == [(1, ()), (2, LAYERS), (4, LAYERS), (8, LAYERS), (16, LAYERS)]
        assert warmed.length == len(prompt)
        tree = DraftTree([5, 6, 7], [-1, 0, -1], [0.0] * 3)
        got, want = warmed.verify(4, tree, LAYERS), plain.verify(4, tree, LAYERS)
        asked.clear()
        warmed.warm()
    assert asked == [(1, ())]
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


class RecordsCaptures:
    """A GraphCache stand-in that records which graphs are asked for and captures none
    (the slot then runs eagerly)."""

    enabled, failed, capture_seconds = True, False, 0.0

    def __init__(self):
        self.asked = []

    def get(self, key, prepare):
        self.asked.append(key)
        return None


@pytest.mark.parametrize("drafter_up", [True, False])
def test_an_engine_captures_its_slots_tree_graphs_before_the_first_request(
    target, tiny_tokenizer, drafter_up
):
    """With the drafter's layers and the tree's size known at start, every row bucket's
    graph is captured before any request; a drafter not up yet leaves the plain step's."""
    head = random_head(target)
    layers = tuple(head.config.capture_layer_ids)

    class Factory(InProcessDrafterFactory):
        def capture_layer_ids(self):
            if not drafter_up:
                raise ConnectionError("drafter not up yet")
            return super().capture_layer_ids()

    slots = make_slots(target, 2, 96)
    for slot in slots:
        slot.graphs = RecordsCaptures()
    engine = Engine(
        target, tiny_tokenizer, max_running=1, drafter_factory=Factory(head, TreeShape(4, 3, 12)), slots=slots
    )
    engine.start()
    try:
        run_requests(engine, [(prompts(1, seed=3)[0], SamplingParams(max_tokens=4), False)])
    finally:
        engine.stop()
    warmed = [(1, ()), (2, layers), (4, layers), (8, layers), (16, layers)] if drafter_up else [(1, ())]
    for slot in slots:
        assert slot.graphs.asked[: len(warmed)] == warmed
