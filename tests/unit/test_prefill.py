"""The prefill's two shortcuts. The prefix cache (prefix_cache.py): a request that starts
from an earlier request's keys and values decodes as a cold one does, hands the drafter the
same features, and reports how many prompt tokens it found cached. Chunked prefill: a long
prompt beside a running stream goes in a chunk a round, the stream decoding in between,
with the same output, drafter features and prompt logprobs as a whole prefill."""

from __future__ import annotations

import time

import pytest
import torch
from aerie_verifier.engine import Engine, make_slots
from aerie_verifier.kv_cache import GrowingCache
from aerie_verifier.prefix_cache import PrefixCache, common_length
from aerie_verifier.sampling import SamplingParams

from tests.conftest import build_tiny_llama

from .spec_helpers import Factory, OracleDrafter, request_events
from .test_speculative import VOCAB

LAYERS = 2
ROW_BYTES = LAYERS * 2 * 4 * 4  # keys and values of one token: [1, 1 head, 1, 4 dims] fp32 per layer


def kv(rows: int, fill: float = 0.0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Keys and values of ``rows`` tokens, row r of every layer filled with ``fill + r``."""
    row_values = fill + torch.arange(rows, dtype=torch.float32)[None, None, :, None].expand(1, 1, rows, 4)
    return [(row_values.clone(), -row_values.clone()) for _ in range(LAYERS)]


def test_common_length():
    assert common_length(torch.tensor([1, 2, 3]), torch.tensor([1, 2, 4, 5])) == 2
    assert common_length(torch.tensor([1, 2]), torch.tensor([1, 2, 4])) == 2
    assert common_length(torch.tensor([7]), torch.tensor([1])) == 0
    assert common_length(torch.tensor([], dtype=torch.long), torch.tensor([1])) == 0


def test_the_longest_shared_beginning_is_found_short_of_the_last_token():
    cache = PrefixCache(max_bytes=10**6)
    cache.store([1, 2, 3, 4, 5], kv(5))
    cache.store([1, 2, 9, 9], kv(4, fill=100))
    found = cache.match([1, 2, 3, 4, 7, 8])
    assert found.length == 4
    assert torch.equal(found.layers[0][0][0, 0, :, 0], torch.tensor([0.0, 1, 2, 3]))
    assert torch.equal(found.layers[1][1][0, 0, :, 0], -torch.tensor([0.0, 1, 2, 3]))
    assert cache.match([1, 2, 9, 9, 5]).length == 4
    # the prompt's last token is never taken from the cache: its logits must be computed
    assert cache.match([1, 2, 3, 4, 5]).length == 4
    assert cache.match([1]) is None
    assert cache.match([8, 1, 2, 3]) is None
    assert (cache.queried_tokens, cache.hit_tokens) == (6 + 5 + 5 + 1 + 4, 4 + 4 + 4)


def test_entries_are_copies_of_what_was_stored():
    cache = PrefixCache(max_bytes=10**6)
    layers = kv(3)
    cache.store([1, 2, 3], layers)
    layers[0][0].fill_(-7)  # the request's own cache is written in place after storing
    assert torch.equal(cache.match([1, 2, 3, 4]).layers[0][0][0, 0, :, 0], torch.tensor([0.0, 1, 2]))


def test_an_entry_that_another_extends_is_dropped_and_one_held_already_is_not_stored():
    cache = PrefixCache(max_bytes=10**6)
    cache.store([1, 2, 3], kv(3))
    cache.store([1, 2, 3, 4, 5], kv(5))  # a chat's next turn: it holds all of the first
    assert len(cache) == 1 and cache.nbytes == 5 * ROW_BYTES
    cache.store([1, 2, 3, 4], kv(4, fill=50))  # held already, within the longer entry
    assert len(cache) == 1
    assert cache.match([1, 2, 3, 4, 5, 6]).layers[0][0][0, 0, -1, 0] == 4  # the first copy
    cache.store([1, 2, 8], kv(3))
    assert len(cache) == 2 and cache.nbytes == 8 * ROW_BYTES


def test_the_least_recently_used_go_first_when_the_bytes_run_out():
    cache = PrefixCache(max_bytes=10 * ROW_BYTES)
    cache.store([1, 1, 1, 1], kv(4))
    cache.store([2, 2, 2, 2], kv(4))
    assert cache.match([1, 1, 1, 1, 5]) is not None  # used: now the most recent
    cache.store([3, 3, 3, 3], kv(4))
    assert cache.nbytes == 8 * ROW_BYTES
    assert cache.match([2, 2, 2, 2, 5]) is None
    assert cache.match([1, 1, 1, 1, 5]) is not None and cache.match([3, 3, 3, 3, 5]) is not None
    cache.store(list(range(11)), kv(11))  # larger than the whole budget: not kept, nothing evicted
    assert len(cache) == 2 and cache.nbytes == 8 * ROW_BYTES


def test_a_speculative_match_needs_the_features_of_the_same_layers():
    cache = PrefixCache(max_bytes=10**6)
    features = torch.arange(5 * 3, dtype=torch.float32).reshape(5, 3)
    cache.store([1, 2, 3, 4, 5, 6, 7], kv(7), features, (1, 2))  # features of the first 5 rows only
    found = cache.match([1, 2, 3, 4, 5, 6, 7, 8], (1, 2))
    assert found.length == 5 and torch.equal(found.features, features)
    assert cache.match([1, 2, 3, 4, 5, 6, 7, 8]).length == 7  # a plain request needs none
    assert cache.match([1, 2, 3, 4, 5, 6, 7, 8], (0, 2)) is None  # another drafter's layers
    # a plain request's entry does not hide one with features
    cache.store([1, 2, 3, 4, 5, 6, 7, 8, 9], kv(9))
    assert len(cache) == 2
    assert cache.match([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], (1, 2)).length == 5


# -- the engine ------------------------------------------------------------------


@pytest.fixture(scope="module")
def target():
    return build_tiny_llama(VOCAB, seed=11, layers=6, ctx=256)


def prompt_of(length: int, seed: int) -> list[int]:
    return torch.randint(3, VOCAB, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def started(engine: Engine) -> Engine:
    engine.start()
    return engine


def tokens_of(events) -> list[int]:
    return [t for e in events for t in e.token_ids]


@pytest.mark.parametrize("slots", [0, 2], ids=["growing cache", "slots"])
def test_a_chats_next_turn_starts_from_the_first_turns_cache(target, tiny_tokenizer, slots):
    cached = started(
        Engine(target, tiny_tokenizer, slots=make_slots(target, slots, 200), prefix_cache=PrefixCache(10**8))
    )
    cold = started(Engine(target, tiny_tokenizer))
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    try:
        first = prompt_of(30, seed=1)
        events = request_events(cached, first, params, speculative=False)
        assert events[0].cached_prompt_tokens == 0
        reply = tokens_of(events)
        second = [*first, *reply, *prompt_of(9, seed=2)]
        events = request_events(cached, second, params, speculative=False)
        # every token but the reply's last, which was decided and never fed
        assert events[0].cached_prompt_tokens == len(first) + len(reply) - 1
        assert tokens_of(events) == tokens_of(request_events(cold, second, params, speculative=False))
        # the same prompt again: all of it but its last token
        assert request_events(cached, second, params, False)[-1].cached_prompt_tokens == len(second) - 1
    finally:
        cached.stop()
        cold.stop()


def test_a_cached_prefix_gives_the_logits_of_a_whole_prefill(target):
    prompt = prompt_of(40, seed=3)
    whole = target(input_ids=torch.tensor([prompt])).logits[0, -1]
    cache = GrowingCache()
    target(input_ids=torch.tensor([prompt[:25]]), past_key_values=cache)
    prefix_cache = PrefixCache(10**8)
    prefix_cache.store(prompt[:25], [(layer.keys, layer.values) for layer in cache.layers])
    found = prefix_cache.match(prompt)
    resumed = GrowingCache()
    for layer_idx, (keys, values) in enumerate(found.layers):
        resumed.update(keys, values, layer_idx)
    logits = target(input_ids=torch.tensor([prompt[25:]]), past_key_values=resumed).logits[0, -1]
    torch.testing.assert_close(logits, whole, atol=1e-5, rtol=1e-5)


class RecordingOracle(OracleDrafter):
    """The oracle, keeping the features each draft session started from."""

    started_with: list[torch.Tensor] = []

    def start(self, token_ids, hidden):
        RecordingOracle.started_with.append(hidden.clone())
        return super().start(token_ids, hidden)


@pytest.mark.parametrize("slots", [0, 2], ids=["growing cache", "slots"])
def test_a_speculative_request_gives_the_drafter_the_features_of_a_cold_start(target, tiny_tokenizer, slots):
    def engine(prefix_cache):
        return started(
            Engine(
                target,
                tiny_tokenizer,
                drafter_factory=Factory(lambda: RecordingOracle(target, 3), capture_layer_ids=(1, 3, 4)),
                slots=make_slots(target, slots, 200),
                prefix_cache=prefix_cache,
            )
        )

    cached, cold = engine(PrefixCache(10**8)), engine(None)
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    try:
        first = prompt_of(20, seed=4)
        reply = tokens_of(request_events(cached, first, params, speculative=True))
        second = [*first, *reply, *prompt_of(6, seed=5)]
        RecordingOracle.started_with.clear()
        events = request_events(cached, second, params, speculative=True)
        assert events[0].cached_prompt_tokens >= len(first) + len(reply) - 1
        assert tokens_of(events) == tokens_of(request_events(cold, second, params, speculative=True))
        warm_features, cold_features = RecordingOracle.started_with
        assert warm_features.shape[0] == len(second)
        torch.testing.assert_close(warm_features, cold_features, atol=1e-5, rtol=1e-5)
        # a plain request's cache serves plain requests, not speculative ones (no features)
        third = prompt_of(15, seed=6)
        request_events(cached, third, params, speculative=False)
        assert request_events(cached, [*third, 7], params, speculative=True)[0].cached_prompt_tokens == 0
        assert request_events(cached, [*third, 8], params, speculative=False)[0].cached_prompt_tokens == 15
    finally:
        cached.stop()
        cold.stop()


def test_prompt_logprobs_are_scored_whole_without_the_cache(target, tiny_tokenizer):
    engine = started(Engine(target, tiny_tokenizer, prefix_cache=PrefixCache(10**8)))
    try:
        prompt = prompt_of(12, seed=7)
        request_events(engine, prompt, SamplingParams(max_tokens=2), speculative=False)
        params = SamplingParams(max_tokens=2, prompt_logprobs=True, logprobs=True)
        first = request_events(engine, prompt, params, speculative=False)[0]
        assert first.cached_prompt_tokens == 0 and len(first.prompt_logprobs) == len(prompt)
    finally:
        engine.stop()


def test_the_choices_of_one_request_share_the_prompts_prefill(target, tiny_tokenizer):
    """n > 1: the choices arrive together; the first's prefill serves the others."""
    engine = Engine(target, tiny_tokenizer, max_running=4, prefix_cache=PrefixCache(10**8))
    prompt = prompt_of(25, seed=8)
    events = [[] for _ in range(3)]
    for choice, sink in enumerate(events):
        engine.submit(
            f"r-{choice}", prompt, SamplingParams(max_tokens=4, seed=choice, temperature=1.0), sink.append
        )
    engine.start()  # all three are admitted in the same round
    try:
        deadline = time.monotonic() + 60
        while not all(sink and sink[-1].finish_reason for sink in events):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert [sink[0].cached_prompt_tokens for sink in events] == [0, 24, 24]
    finally:
        engine.stop()


# -- chunked prefill ---------------------------------------------------------------


class Timeline:
    """Every event of several requests, in the order the engine emitted them."""

    def __init__(self):
        self.order: list[tuple[str, object]] = []

    def sink(self, name: str):
        def on_event(event):
            self.order.append((name, event))

        return on_event

    def events(self, name: str) -> list:
        return [event for who, event in self.order if who == name]

    def wait(self, name: str, timeout_s: float = 60) -> list:
        deadline = time.monotonic() + timeout_s
        while not (self.events(name) and self.events(name)[-1].finish_reason):
            assert time.monotonic() < deadline, f"{name} did not finish"
            time.sleep(0.005)
        return self.events(name)


def beside_a_stream(engine: Engine, prompt: list[int], params: SamplingParams, speculative=False):
    """``prompt`` submitted while another request is decoding; returns its events and how
    many events the other request had from its submission to its first event."""
    timeline = Timeline()
    stream = SamplingParams(max_tokens=250, ignore_eos=True)
    engine.submit("stream", prompt_of(5, seed=20), stream, timeline.sink("stream"))
    while len(timeline.events("stream")) < 2:
        time.sleep(0.001)
    timeline.order.append(("submitted", None))
    engine.submit("long", prompt, params, timeline.sink("long"), speculative=speculative)
    events = timeline.wait("long")
    who = [name for name, _ in timeline.order]
    meanwhile = who[who.index("submitted") : who.index("long")].count("stream")
    timeline.wait("stream")
    return events, meanwhile


@pytest.mark.parametrize("chunk", [8, 0], ids=["chunked", "whole"])
def test_a_long_prompt_prefills_in_chunks_while_another_stream_decodes(target, tiny_tokenizer, chunk):
    engine = started(Engine(target, tiny_tokenizer, max_running=2, prefill_chunk_tokens=chunk))
    alone = started(Engine(target, tiny_tokenizer))
    prompt = prompt_of(64, seed=21)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    try:
        events, streamed_meanwhile = beside_a_stream(engine, prompt, params)
        # 64 tokens in chunks of 8 take 8 rounds, each of which also decodes the stream
        assert streamed_meanwhile >= 7 if chunk else streamed_meanwhile <= 2
        assert tokens_of(events) == tokens_of(request_events(alone, prompt, params, speculative=False))
    finally:
        engine.stop()
        alone.stop()


def test_chunked_prefill_gives_the_drafter_and_prompt_logprobs_what_a_whole_one_does(target, tiny_tokenizer):
    def engine(chunk):
        factory = Factory(lambda: RecordingOracle(target, 3), capture_layer_ids=(1, 3, 4))
        return started(
            Engine(target, tiny_tokenizer, max_running=2, drafter_factory=factory, prefill_chunk_tokens=chunk)
        )

    chunked, whole = engine(5), engine(0)
    prompt = prompt_of(33, seed=22)
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    try:
        RecordingOracle.started_with.clear()
        events, streamed_meanwhile = beside_a_stream(chunked, prompt, params, speculative=True)
        assert streamed_meanwhile >= 6
        in_chunks = RecordingOracle.started_with[-1]
        expected = request_events(whole, prompt, params, speculative=True)
        assert in_chunks.shape[0] == len(prompt)
        torch.testing.assert_close(in_chunks, RecordingOracle.started_with[-1], atol=1e-5, rtol=1e-5)
        assert tokens_of(events) == tokens_of(expected)

        scored = SamplingParams(max_tokens=2, prompt_logprobs=True, logprobs=True, top_logprobs=2)
        events, _ = beside_a_stream(chunked, prompt, scored)
        reference = request_events(whole, prompt, scored, speculative=False)[0].prompt_logprobs
        assert [e.token_id for e in events[0].prompt_logprobs] == prompt
        for got, want in zip(events[0].prompt_logprobs[1:], reference[1:], strict=True):
            assert got.logprob == pytest.approx(want.logprob, abs=1e-4)
    finally:
        chunked.stop()
        whole.stop()
