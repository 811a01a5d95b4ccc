"""Speculative decoding in the verifier: lossless greedy and sampling, acceptance with
known drafters, cache bookkeeping, hidden-state capture and the fallback."""

from __future__ import annotations

import time

import pytest
import torch
from aerie_common.draft_tree import DraftTree
from aerie_common.metrics import registry_for
from aerie_drafter.eagle import EagleConfig, EagleHead
from aerie_drafter.proposer import TreeShape
from aerie_verifier import engine as engine_module
from aerie_verifier.detokenize import IncrementalDetokenizer
from aerie_verifier.drafter_client import InProcessDrafterFactory
from aerie_verifier.engine import Engine, Sequence
from aerie_verifier.metrics import EngineCollector
from aerie_verifier.sampling import LogitAdjuster, SamplingParams, next_token, penalize, target_probs
from aerie_verifier.settings import VerifierSettings
from aerie_verifier.speculative import HiddenCapture, PaceGuard
from aerie_verifier.tree_verify import accept, keep_cache_entries, tree_inputs
from prometheus_client import generate_latest
from pydantic import ValidationError
from transformers import DynamicCache

from tests.conftest import build_tiny_llama

from .spec_helpers import Factory, OracleDrafter, ReplayDrafter, TargetTopKDrafter, request_events

VOCAB = 259  # the tiny byte-level tokenizer's size


@pytest.fixture(scope="module")
def target():
    return build_tiny_llama(VOCAB, seed=3, layers=8)


def random_head(target, version="3.1", seed=0):
    torch.manual_seed(seed)
    cfg = EagleConfig.for_target(target.config, draft_vocab_size=VOCAB, eagle_version=version)
    head = EagleHead(cfg, target.get_input_embeddings()).eval()
    head.set_vocab_map(torch.arange(VOCAB))
    return head


def generate(engine, prompt, params, speculative):
    events = request_events(engine, prompt, params, speculative)
    return [t for e in events for t in e.token_ids], events[-1]


def prompts(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randint(3, VOCAB, (int(torch.randint(1, 40, (1,), generator=gen)),), generator=gen).tolist()
        for _ in range(n)
    ]


@pytest.fixture
def make_engine(target, tiny_tokenizer):
    engines = []

    def make(factory, model=target):
        engine = Engine(model, tiny_tokenizer, max_running=4, max_waiting=64, drafter_factory=factory)
        engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop()


@pytest.mark.parametrize("context_ngram", [False, True], ids=["head", "head+context"])
def test_greedy_is_lossless_with_a_random_head(target, make_engine, context_ngram):
    shape = TreeShape(depth=4, top_k=3, total_tokens=10, context_ngram=context_ngram)
    engine = make_engine(InProcessDrafterFactory(random_head(target), shape))
    for i, prompt in enumerate(prompts(12)):
        params = SamplingParams(max_tokens=8 + 5 * i)
        plain, _ = generate(engine, prompt, params, speculative=False)
        spec, final = generate(engine, prompt, params, speculative=True)
        assert spec == plain
        stats = final.speculative
        if len(plain) > 1:
            assert stats.drafts > 0 and stats.draft_tokens >= stats.drafts


def test_a_stopped_engine_takes_its_capture_hooks_off_the_model(target, tiny_tokenizer):
    hooks_before = sum(len(layer._forward_pre_hooks) for layer in target.model.layers)
    factory = InProcessDrafterFactory(random_head(target), TreeShape(depth=2, top_k=2, total_tokens=2))
    engine = Engine(target, tiny_tokenizer, max_running=1, drafter_factory=factory)
    engine.start()
    generate(engine, prompts(1)[0], SamplingParams(max_tokens=4), speculative=True)
    assert sum(len(layer._forward_pre_hooks) for layer in target.model.layers) > hooks_before
    engine.stop()
    assert sum(len(layer._forward_pre_hooks) for layer in target.model.layers) == hooks_before


def test_oracle_drafter_reaches_depth_plus_one(target, make_engine):
    depth = 4
    engine = make_engine(Factory(lambda: OracleDrafter(target, depth)))
    for prompt in prompts(4, seed=1):
        params = SamplingParams(max_tokens=41)
        plain, _ = generate(engine, prompt, params, speculative=False)
        spec, final = generate(engine, prompt, params, speculative=True)
        assert spec == plain
        if len(plain) == 41:  # no EOS: every step but maybe the last accepts the full chain
            stats = final.speculative
            assert stats.mean_acceptance_length >= depth + 1 - 0.3, stats
            assert stats.accepted_per_position[depth - 1] >= stats.drafts - 1


def test_step_time_is_split_into_draft_hop_and_verify(target, make_engine):
    class SlowOracle(OracleDrafter):
        def propose(self):
            time.sleep(0.02)  # drafting takes at least this per tree, the hop nothing
            return super().propose()

    engine = make_engine(Factory(lambda: SlowOracle(target, 3)))
    _, final = generate(engine, [5, 6, 7], SamplingParams(max_tokens=20), speculative=True)
    stats = final.speculative
    # every verified tree was drafted first; the request may end before verifying its last
    assert stats.drafts <= stats.trees <= stats.drafts + 1
    assert stats.draft_seconds >= 0.02 * stats.trees
    assert stats.hop_seconds == 0.0  # in-process
    assert 0 < stats.verify_seconds

    # the engine's totals take the request's split when it retires (just after its last event)
    deadline = time.monotonic() + 10
    while engine.totals.speculative.drafts < stats.drafts and time.monotonic() < deadline:
        time.sleep(0.01)
    totals = engine.totals.speculative
    assert (totals.trees, totals.draft_seconds, totals.verify_seconds) == (
        stats.trees,
        stats.draft_seconds,
        stats.verify_seconds,
    )


def test_eos_and_max_tokens_inside_an_accepted_run(target, make_engine):
    engine = make_engine(Factory(lambda: OracleDrafter(target, 6)))
    for max_tokens in (1, 2, 3, 5, 7, 10):
        plain, p_final = generate(engine, [5, 6, 7], SamplingParams(max_tokens=max_tokens), speculative=False)
        spec, s_final = generate(engine, [5, 6, 7], SamplingParams(max_tokens=max_tokens), speculative=True)
        assert spec == plain and len(spec) <= max_tokens
        assert s_final.finish_reason == p_final.finish_reason


def test_greedy_acceptance_follows_target_argmax():
    tree = DraftTree(token_ids=[5, 6, 7, 8], parents=[-1, -1, 0, 2], scores=[0, -1, -1, -2])
    logits = torch.full((5, 10), -5.0)
    logits[0, 5] = 1  # root -> node 0 (token 5)
    logits[1, 7] = 1  # node 0 -> node 2 (token 7)
    logits[3, 9] = 1  # node 2 -> 9, which is not node 3's token 8
    rows = []

    def choose(row, depth):
        rows.append((row, depth))
        return next_token(logits[row], SamplingParams(), seed=0, position=depth)

    accepted, bonus = accept(tree, choose)
    assert accepted == [0, 2] and bonus == 9
    assert rows == [(0, 0), (1, 1), (3, 2)]  # only the accepted path's rows are chosen at


def total_variation(p, q):
    return 0.5 * (p - q).abs().sum().item()


def test_sampling_acceptance_keeps_the_target_distribution():
    """Each seed's noise decides every row's draw; over seeds, the first token is
    distributed as the target's sampling distribution, whatever the tree proposed."""
    torch.manual_seed(0)
    vocab = 12
    logits = torch.randn(7, vocab) * 2
    tree = DraftTree(
        token_ids=[3, 0, 7, 1, 2, 5], parents=[-1, -1, -1, 0, 0, 1], scores=[-0.1, -0.5, -0.9, -1, -2, -3]
    )
    params = SamplingParams(temperature=0.7, top_p=0.9)
    expected = target_probs(logits[0], params)
    counts = torch.zeros(vocab)
    runs = 20000
    accepted_any = 0
    for seed in range(runs):
        accepted, bonus = accept(
            tree, lambda row, depth, seed=seed: next_token(logits[row], params, seed, 40 + depth)
        )
        counts[tree.token_ids[accepted[0]] if accepted else bonus] += 1
        accepted_any += bool(accepted)
        # the same draw as plain sampling at that position
        assert (tree.token_ids[accepted[0]] if accepted else bonus) == next_token(logits[0], params, seed, 40)
    assert total_variation(counts / runs, expected) < 0.02
    # a child is accepted with the target's probability of the children's tokens together
    assert accepted_any / runs == pytest.approx(expected[[3, 0, 7]].sum().item(), abs=0.02)


def test_a_draw_depends_on_the_seed_and_position_alone():
    logits = torch.randn(50)
    params = SamplingParams(temperature=1.0)
    draws = [next_token(logits, params, seed=7, position=position) for position in range(30)]
    assert draws == [next_token(logits, params, seed=7, position=position) for position in range(30)]
    assert len(set(draws)) > 5
    assert draws != [next_token(logits, params, seed=8, position=position) for position in range(30)]


def test_sampling_is_lossless_end_to_end_on_the_second_token(make_engine):
    """The first token comes from prefill, the second from tree verification. Their joint
    distribution must equal the target's own, computed exactly. top_k=3 keeps the support
    to 9 pairs so a few hundred runs measure it; a 3-layer target makes them cheap."""
    target = build_tiny_llama(VOCAB, seed=3, layers=3)
    engine = make_engine(
        Factory(lambda: TargetTopKDrafter(target, top_k=3, levels=1), capture_layer_ids=(0, 1, 2)), target
    )
    prompt = [5, 6, 7, 8]
    params = dict(temperature=1.0, top_k=3, max_tokens=2)
    runs = 600
    counts: dict[tuple[int, int], int] = {}
    for seed in range(runs):
        tokens, final = generate(engine, prompt, SamplingParams(seed=seed, **params), speculative=True)
        assert final.speculative.drafts == 1
        counts[tuple(tokens)] = counts.get(tuple(tokens), 0) + 1

    expected: dict[tuple[int, int], float] = {}
    with torch.no_grad():
        first_probs = target_probs(target(torch.tensor([prompt])).logits[0, -1], SamplingParams(**params))
        for first in first_probs.nonzero().flatten().tolist():
            second_probs = target_probs(
                target(torch.tensor([[*prompt, first]])).logits[0, -1], SamplingParams(**params)
            )
            for second in second_probs.nonzero().flatten().tolist():
                expected[(first, second)] = (first_probs[first] * second_probs[second]).item()
    assert len(expected) == 9
    pairs = set(expected) | set(counts)
    tv = 0.5 * sum(abs(counts.get(p, 0) / runs - expected.get(p, 0.0)) for p in pairs)
    assert tv < 0.1, (tv, counts, expected)


def test_tree_forward_matches_sequential_and_cache_keeps_the_path(target):
    torch.manual_seed(1)
    prompt = torch.randint(3, VOCAB, (1, 9))
    with torch.no_grad():
        cache = DynamicCache()
        target(prompt, past_key_values=cache)
        root = 40
        tree = DraftTree(
            token_ids=[11, 12, 13, 14, 15], parents=[-1, -1, 0, 2, 1], scores=[0, -1, -1, -2, -2]
        )
        inputs = tree_inputs(root, tree, 9, target.config, "cpu", torch.float32)
        logits = target(**inputs.model_kwargs(), past_key_values=cache).logits[0]
        path = torch.tensor([[root, 11, 13, 14]])
        sequential = target(torch.cat([prompt, path], 1)).logits[0, 9:]
        for row, seq_row in [(0, 0), (1, 1), (3, 2), (4, 3)]:
            assert torch.allclose(logits[row], sequential[seq_row], atol=1e-4)
        keep_cache_entries(cache, 9, [0, 2, 3])
        assert cache.get_seq_length() == 13
        after = target(torch.tensor([[99]]), past_key_values=cache).logits[0, -1]
        reference = target(torch.cat([prompt, path, torch.tensor([[99]])], 1)).logits[0, -1]
        assert torch.allclose(after, reference, atol=1e-4)


def test_capture_reads_the_input_of_each_layer(target):
    hooks_before = [len(layer._forward_pre_hooks) for layer in target.model.layers]
    capture = HiddenCapture(target)
    ids = torch.randint(3, VOCAB, (1, 6))
    with torch.no_grad(), capture.layers((2, 4, 5)):
        out = target(ids, output_hidden_states=True)
    features = capture.features((2, 4, 5))
    hs = out.hidden_states  # hs[i] is the input of layer i (hs[0] the embeddings)
    assert torch.equal(features, torch.cat([hs[2][0], hs[4][0], hs[5][0]], -1))
    assert not torch.equal(features, torch.cat([hs[3][0], hs[5][0], hs[6][0]], -1))
    capture.close()
    assert [len(layer._forward_pre_hooks) for layer in target.model.layers] == hooks_before


class FailingDrafter:
    hop_seconds = 0.0
    in_process = True

    def __init__(self, fail_after):
        self.calls, self.fail_after = 0, fail_after

    def _maybe_fail(self):
        self.calls += 1
        if self.calls > self.fail_after:
            raise ConnectionError("drafter went away")
        return DraftTree([7, 8], [-1, 0], [0.0, -1.0])

    def start(self, token_ids, hidden):
        return self._maybe_fail()

    def extend(self, token_ids, hidden):
        return self._maybe_fail()

    def close(self):
        pass


@pytest.mark.parametrize(
    "drafter",
    [
        lambda: FailingDrafter(fail_after=2),
        lambda: FailingDrafter(fail_after=0),
    ],
)
def test_drafter_failure_falls_back_to_plain_output(target, make_engine, drafter):
    factory = Factory(drafter)
    engine = make_engine(factory)
    plain, _ = generate(engine, [9, 10, 11], SamplingParams(max_tokens=20), speculative=False)
    spec, _ = generate(engine, [9, 10, 11], SamplingParams(max_tokens=20), speculative=True)
    assert spec == plain
    assert engine.breaker.failures == 1


@pytest.mark.parametrize(
    "bad_tree",
    [
        DraftTree([7, 8], [-1, 5], [0.0, 0.0]),  # parent out of range
        DraftTree([7, 8], [1, 0], [0.0, 0.0]),  # cycle / parent after child
        DraftTree([7, 10**6], [-1, 0], [0.0, 0.0]),  # token outside the vocabulary
        DraftTree([7, 8], [-1], [0.0, 0.0]),  # ragged arrays
    ],
)
def test_malformed_tree_falls_back(target, make_engine, bad_tree):
    class BadDrafter(FailingDrafter):
        def start(self, token_ids, hidden):
            return bad_tree

    engine = make_engine(Factory(lambda: BadDrafter(0)))
    plain, _ = generate(engine, [9, 10, 11], SamplingParams(max_tokens=12), speculative=False)
    spec, final = generate(engine, [9, 10, 11], SamplingParams(max_tokens=12), speculative=True)
    assert spec == plain and final.speculative.drafts == 0
    assert engine.breaker.failures == 1


def test_speculative_false_opens_no_draft_session(target, make_engine):
    factory = Factory(lambda: OracleDrafter(target, 3))
    engine = make_engine(factory)
    _, final = generate(engine, [9, 10], SamplingParams(max_tokens=10), speculative=False)
    assert factory.opened == 0 and final.speculative is None


def plain_output(target, tokenizer, prompt, params) -> list[int]:
    """The target's own output, from an engine without a drafter."""
    engine = Engine(target, tokenizer)
    engine.start()
    try:
        return generate(engine, prompt, params, speculative=False)[0]
    finally:
        engine.stop()


class SlowPlainStepGuard(PaceGuard):
    def observe_plain_step(self, seconds: float, requests: int = 1) -> None:
        super().observe_plain_step(0.05 * requests, requests)


def test_pace_guard_drops_speculation_that_measures_slower_than_plain(target, tiny_tokenizer):
    prompt, params = [5, 6, 7, 8], SamplingParams(max_tokens=40)
    plain = plain_output(target, tiny_tokenizer, prompt, params)
    assert len(plain) == 40
    reference = prompt + plain

    def run(drafter, guard):
        engine = Engine(target, tiny_tokenizer, drafter_factory=Factory(lambda: drafter), pace_guard=guard)
        engine.start()
        try:
            tokens, final = generate(engine, prompt, params, speculative=True)
        finally:
            engine.stop()
        assert tokens == plain  # lossless whichever way it decodes
        return final.speculative, engine.totals.speculation_dropped

    # A slow drafter that is never right: one token per 30 ms step, far slower than a plain
    # step of this tiny model. Judged after 8 steps, then plain; without the guard, 39 steps.
    slow = ReplayDrafter(reference, 4, wrong=True, delay_s=0.03)
    guard = PaceGuard(probe_steps=8)
    stats, dropped = run(slow, guard)
    assert (stats.drafts, dropped) == (8, 1)
    assert guard.plain_step_s is not None and guard.plain_step_s < 0.03
    stats, dropped = run(ReplayDrafter(reference, 4, wrong=True, delay_s=0.03), None)
    assert (stats.drafts, dropped) == (39, 0)
    # A free drafter that is always right yields 5 tokens per step: it keeps speculating. (The
    # tiny model's plain step is so cheap that a 5-token step's bookkeeping can cost more than
    # five of them, so the guard is told plain steps take 50 ms, as SmolLM2's do on 2 cores; a
    # busy CI machine can stretch a 5-token step past 25 ms, never past 250.)
    stats, dropped = run(ReplayDrafter(reference, 4), SlowPlainStepGuard(probe_steps=2))
    assert dropped == 0 and stats.drafts == 8 and stats.mean_acceptance_length == 5.0


def test_requests_after_speculation_measured_slower_decode_plainly_but_for_probes(target, tiny_tokenizer):
    prompt, params = [5, 6, 7, 8], SamplingParams(max_tokens=12)
    plain = plain_output(target, tiny_tokenizer, prompt, params)
    # A slow drafter that is never right, as above: every request that speculates is dropped
    # after its 4-step probe. After two such requests the next two decode plainly from the
    # start (no draft session opened), and the third probes again.
    factory = Factory(lambda: ReplayDrafter(prompt + plain, 4, wrong=True, delay_s=0.03))
    guard = PaceGuard(probe_steps=4, probe_every=3, judged_requests=2)
    engine = Engine(target, tiny_tokenizer, drafter_factory=factory, pace_guard=guard)
    engine.start()
    try:
        opened = []
        for _ in range(6):
            tokens, _ = generate(engine, prompt, params, speculative=True)
            assert tokens == plain
            opened.append(factory.opened)
    finally:
        engine.stop()
    assert opened == [1, 2, 2, 2, 3, 3]
    assert (engine.totals.speculation_skipped, engine.totals.speculation_dropped) == (3, 3)
    exported = generate_latest(registry_for(EngineCollector(engine))).decode()
    assert "aerie:verifier_speculation_skipped_total 3.0" in exported.splitlines()


def test_pace_guard_turns_requests_away_only_after_a_run_of_slow_ones():
    guard = PaceGuard(probe_every=3, judged_requests=3)
    guard.observe_request(1.0, 10)  # nothing to compare with yet: not judged
    guard.observe_plain_step(0.010)
    guard.observe_request(0.300, 20)  # 15 ms a token against 10 plain
    guard.observe_request(0.300, 20)
    assert guard.admits()  # two slow requests are not yet a run
    guard.observe_request(0.200, 0)  # no speculative tokens: not judged
    assert guard.admits()
    guard.observe_request(0.300, 20)
    assert [guard.admits() for _ in range(6)] == [False, False, True, False, False, True]
    guard.observe_request(0.200, 20)  # a probe that decodes as fast as plain steps
    assert guard.admits() and guard.admits()
    for _ in range(2):  # a run broken by a request that paid: still admitted
        guard.observe_request(0.300, 20)
    assert guard.admits()


def test_the_probe_rate_is_a_setting_of_one_or_more(monkeypatch):
    monkeypatch.setenv("AERIE_SPECULATION_PROBE_EVERY", "3")
    assert VerifierSettings().speculation_probe_every == 3
    monkeypatch.setenv("AERIE_SPECULATION_PROBE_EVERY", "0")
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        VerifierSettings()


def test_pace_guard_judges_seconds_per_token_after_the_probe():
    guard = PaceGuard(probe_steps=3, smoothing=0.5)
    assert guard.pays(5, 10.0, 1)  # nothing to compare with yet
    guard.observe_plain_step(0.10)
    guard.observe_plain_step(0.20)
    assert guard.plain_step_s == pytest.approx(0.15)
    assert guard.pays(2, 10.0, 1)  # still probing
    assert guard.pays(3, 0.45, 3) and not guard.pays(3, 0.46, 3)


def test_pace_guard_prefers_the_plain_batch_when_the_round_decodes_more_in_it():
    guard = PaceGuard(smoothing=1.0)
    assert not guard.prefers_plain(0, 8)  # nothing measured yet
    for requests, seconds in ((1, 0.016), (2, 0.020), (8, 0.037)):  # as on a 2-core CPU
        guard.observe_plain_step(seconds, requests)
    assert guard.plain_step_s == 0.016
    assert not guard.prefers_plain(0, 8)  # no speculation measured yet
    guard.observe_speculation(0.025, 2)  # a verification step and its drafting: 2 tokens
    # 8 speculating: 8 x 2 tokens in 8 x 25 ms (80 tokens/s), or 8 tokens in 37 ms (216)
    assert guard.prefers_plain(0, 8)
    # one speculating beside one plain: 3 tokens in 16 + 25 ms (73/s), or 2 in 20 ms (100/s)
    assert guard.prefers_plain(1, 1)
    assert not guard.prefers_plain(0, 1)  # alone it is the request's own guard's call (pays)
    assert not guard.prefers_plain(3, 2)  # batches of 3 and 5 not measured
    guard.observe_speculation(0.010, 5)  # a head that pays: 8 x 5 tokens in 80 ms (500/s)
    assert not guard.prefers_plain(0, 8)


class LoadedGuard(PaceGuard):
    """Prefers the batched plain step whenever two or more requests decode, and never
    drops a request's speculation."""

    def pays(self, steps, seconds, tokens):
        return True

    def prefers_plain(self, plain, speculating):
        return plain + speculating >= 2


class ListeningOracle(OracleDrafter):
    """The oracle, keeping the features it heard, in order: the prompt's, then each extend's."""

    def __init__(self, model, depth):
        super().__init__(model, depth)
        self.heard: list[torch.Tensor] = []
        self.extended: list[list[int]] = []

    def start(self, token_ids, hidden):
        self.heard.append(hidden.clone())
        return super().start(token_ids, hidden)

    def extend(self, token_ids, hidden):
        self.heard.append(hidden.clone())
        self.extended.append(list(token_ids))
        return super().extend(token_ids, hidden)


@pytest.mark.parametrize("padded", [False, True], ids=["ragged batch", "padded batch"])
def test_speculation_paused_under_load_resumes_with_the_plain_steps_features(target, tiny_tokenizer, padded):
    """Beside a plain request, a speculating one joins the batched plain step (the guard
    prefers it); alone again, it resumes speculating, the drafter hearing the tokens decoded
    meanwhile with the features a cold forward gives them. The output stays the target's."""
    drafters = []

    def drafter():
        drafters.append(ListeningOracle(target, 3))
        return drafters[-1]

    if padded:  # eager attention, which the lean forward does not run: transformers' padded batch
        target = build_tiny_llama(VOCAB, seed=3, layers=8)
        target.set_attn_implementation("eager")
    layers = (1, 3, 4)
    engine = Engine(
        target, tiny_tokenizer, drafter_factory=Factory(drafter, layers), pace_guard=LoadedGuard()
    )
    long_params, short_params = (
        SamplingParams(max_tokens=40, ignore_eos=True),
        SamplingParams(max_tokens=12, ignore_eos=True),
    )
    prompt, other = [5, 6, 7, 8], [9, 10, 11]
    long_events, short_events = [], []
    # (the plain one first: the speculating one's row in the batch is not the first)
    engine.submit("short", other, short_params, short_events.append, speculative=False)
    engine.submit("long", prompt, long_params, long_events.append, speculative=True)
    engine.start()  # both are waiting: the first round admits them together
    try:
        deadline = time.monotonic() + 60
        while not (long_events and long_events[-1].finish_reason) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        engine.stop()
    output = [t for e in long_events for t in e.token_ids]
    assert output == plain_output(target, tiny_tokenizer, prompt, long_params) and len(output) == 40
    (listener,) = drafters
    # paused beside the 11 plain steps of the other, then one extend with all of them
    assert max(len(tokens) for tokens in listener.extended) >= 11
    assert long_events[-1].speculative.drafts > 0
    assert engine.totals.speculation_paused_steps >= 11
    # what the drafter heard: one feature row per token it was told of, but the last
    heard = torch.cat(listener.heard)
    told = listener.tokens
    assert heard.shape[0] == len(told) - 1 and told == [*prompt, *output][: len(told)]
    capture = HiddenCapture(target)
    with torch.inference_mode(), capture.layers(layers):
        target(torch.tensor([told[:-1]]))
        cold = capture.features(layers)
    capture.close()
    torch.testing.assert_close(heard, cold, atol=1e-4, rtol=1e-4)


def test_drafting_stops_where_no_tree_fits_the_context(tiny_tokenizer):
    """Near the end of the context a tree no longer fits: the request decodes the rest
    plainly, and the drafter is not asked again for trees that cannot be verified."""
    target = build_tiny_llama(VOCAB, seed=3, layers=4, ctx=48)
    drafters = []

    def drafter():
        drafters.append(ListeningOracle(target, 4))
        return drafters[-1]

    prompt, params = list(range(5, 30)), SamplingParams(max_tokens=23, ignore_eos=True)  # fills the context
    engine = Engine(target, tiny_tokenizer, drafter_factory=Factory(drafter, (1, 2)), pace_guard=PaceGuard())
    engine.start()
    try:
        tokens, final = generate(engine, prompt, params, speculative=True)
    finally:
        engine.stop()
    assert tokens == plain_output(target, tiny_tokenizer, prompt, params) and len(tokens) == 23
    (listener,) = drafters
    # every tree asked for was verified, but the one that no longer fitted
    assert len(listener.heard) == final.speculative.drafts + 1


@pytest.mark.parametrize("architecture", ["gpt2", "gpt_neox"])
def test_gpt2_and_gpt_neox_targets_speculate_losslessly(architecture, tiny_tokenizer):
    # GPT-2 keeps its decoder layers in transformer.h, GPT-NeoX in gpt_neox.layers; neither
    # config names a KV head count or an RMSNorm epsilon for the head's shape
    import transformers

    config = {
        "gpt2": transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=6, n_head=4, n_positions=128),
        "gpt_neox": transformers.GPTNeoXConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=6,
            num_attention_heads=4,
        ),
    }[architecture]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    capture = HiddenCapture(model)
    assert capture.num_layers == 6
    capture.close()
    # an oracle (long accepted runs) and an untrained EAGLE head shaped for the target
    oracle = Factory(lambda: OracleDrafter(model, 4), (1, 3, 5))
    for factory in (oracle, InProcessDrafterFactory(random_head(model), TreeShape(3, 2, 6))):
        engine = Engine(model, tiny_tokenizer, max_running=1, drafter_factory=factory)
        engine.start()
        try:
            for prompt in prompts(3, seed=4):
                params = SamplingParams(max_tokens=20)
                plain, _ = generate(engine, prompt, params, speculative=False)
                spec, final = generate(engine, prompt, params, speculative=True)
                assert spec == plain
                assert final.speculative.drafts > 0
                if factory is oracle and len(plain) > 5:
                    assert final.speculative.mean_acceptance_length > 2
        finally:
            engine.stop()


PENALTIES = [
    {"presence_penalty": 1.5},
    {"frequency_penalty": 0.8, "presence_penalty": -0.3},
    {"repetition_penalty": 1.6},
    {"logit_bias": tuple((token, 3.0) for token in range(60, 90)) + ((5, -100.0),)},
]


def reference_greedy(target, prompt, params, max_tokens):
    """Greedy decoding with the request's bias and penalties, one full forward per token."""
    output: list[int] = []
    seen = torch.zeros(VOCAB, dtype=torch.bool)
    seen[prompt] = True
    with torch.inference_mode():
        for _ in range(max_tokens):
            logits = target(torch.tensor([prompt + output])).logits[0, -1:]
            counts = torch.bincount(torch.tensor(output, dtype=torch.long), minlength=VOCAB).float()[None]
            for token, bias in params.logit_bias:
                logits[0, token] += bias
            output.append(int(penalize(logits, params, counts, seen).argmax()))
    return output


@pytest.mark.parametrize(
    "penalties", PENALTIES, ids=["presence", "frequency+presence", "repetition", "logit_bias"]
)
def test_greedy_with_penalties_is_lossless_and_penalized(target, make_engine, penalties):
    engines = {
        "head": make_engine(
            InProcessDrafterFactory(random_head(target), TreeShape(depth=3, top_k=3, total_tokens=8))
        ),
        "branching": make_engine(Factory(lambda: TargetTopKDrafter(target, top_k=3, levels=2))),
        "oracle": make_engine(Factory(lambda: OracleDrafter(target, 4))),
    }
    changed = 0
    for prompt in prompts(3, seed=5):
        params = SamplingParams(max_tokens=24, **penalties)
        plain, _ = generate(engines["head"], prompt, params, speculative=False)
        # EOS may end the reference's run early in the engine
        assert plain == reference_greedy(target, prompt, params, 24)[: len(plain)]
        for name, engine in engines.items():
            spec, final = generate(engine, prompt, params, speculative=True)
            assert spec == plain, name
            assert final.speculative.drafts > 0
        unpenalized, _ = generate(engines["head"], prompt, SamplingParams(max_tokens=24), speculative=False)
        changed += unpenalized != plain
    assert changed  # the penalties did something


def test_tree_rows_are_penalized_along_their_own_paths(tiny_tokenizer):
    params = SamplingParams(frequency_penalty=0.7, presence_penalty=0.2, repetition_penalty=1.3)
    seq = Sequence(
        request_id="r",
        prompt_ids=[5, 6, 7],
        params=params,
        max_new_tokens=50,
        on_event=lambda event: None,
        detokenizer=IncrementalDetokenizer(tiny_tokenizer),
        seed=0,
        eos_ids=frozenset(),
    )
    seq.adjuster = LogitAdjuster(params, seq.prompt_ids, VOCAB, torch.device("cpu"))
    seq.append_tokens([9, 9, 12])
    tree = DraftTree(token_ids=[9, 30, 12, 9], parents=[-1, -1, 0, 2], scores=[0.0] * 4)
    logits = torch.randn(5, VOCAB)
    scored = seq.scores(logits, tree)
    seen = torch.zeros(VOCAB, dtype=torch.bool)
    seen[[5, 6, 7]] = True
    for row, path in enumerate([[], [9], [30], [9, 12], [9, 12, 9]]):
        output = [9, 9, 12, *path]
        counts = torch.bincount(torch.tensor(output), minlength=VOCAB).float()[None]
        assert torch.allclose(scored[row], penalize(logits[row : row + 1], params, counts, seen)[0]), row


@pytest.mark.parametrize("speculative", [False, True], ids=["plain", "speculative"])
def test_logprobs_are_the_targets_own_at_every_token(target, make_engine, speculative):
    engine = make_engine(Factory(lambda: TargetTopKDrafter(target, top_k=2, levels=2)))
    prompt = [5, 6, 7, 8]
    params = SamplingParams(max_tokens=20, logprobs=True, top_logprobs=3, presence_penalty=1.0)
    events = request_events(engine, prompt, params, speculative)
    tokens = [t for e in events for t in e.token_ids]
    entries = [entry for e in events for entry in e.logprobs]
    assert all(len(e.logprobs) == len(e.token_ids) for e in events)
    with torch.inference_mode():
        expected = target(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1].log_softmax(-1)
    assert [entry.token_id for entry in entries] == tokens
    for position, entry in enumerate(entries):
        assert entry.logprob == pytest.approx(expected[position, entry.token_id].item(), abs=1e-4)
        assert [token_id for token_id, _ in entry.top] == expected[position].topk(3).indices.tolist()
    if speculative:
        assert events[-1].speculative.accepted_tokens > 0  # several tokens came from one tree


def test_no_logprobs_unless_asked(target, make_engine):
    engine = make_engine(None)
    _, final = generate(engine, [5, 6], SamplingParams(max_tokens=3), speculative=False)
    assert final.logprobs is None


def test_min_tokens_and_ignore_eos_with_and_without_speculation(target, make_engine, tiny_tokenizer):
    eos = tiny_tokenizer.eos_token_id
    engines = [
        make_engine(None),
        make_engine(
            InProcessDrafterFactory(random_head(target), TreeShape(depth=3, top_k=3, total_tokens=8))
        ),
        make_engine(Factory(lambda: TargetTopKDrafter(target, top_k=3, levels=2))),
    ]
    eager_to_end = {"logit_bias": ((eos, 12.0),)}  # the target would end at once
    prompt = [5, 6, 7]
    tokens, final = generate(
        engines[0], prompt, SamplingParams(max_tokens=20, **eager_to_end), speculative=False
    )
    assert tokens == [] and final.finish_reason == "stop"
    for engine in engines:
        speculative = engine is not engines[0]
        tokens, final = generate(
            engine,
            prompt,
            SamplingParams(max_tokens=20, min_tokens=6, **eager_to_end),
            speculative=speculative,
        )
        assert len(tokens) == 6 and eos not in tokens and final.finish_reason == "stop"
        held, _ = generate(
            engines[0], prompt, SamplingParams(max_tokens=20, min_tokens=6, **eager_to_end), False
        )
        assert tokens == held
        tokens, final = generate(
            engine,
            prompt,
            SamplingParams(max_tokens=12, ignore_eos=True, **eager_to_end),
            speculative=speculative,
        )
        assert len(tokens) == 12 and tokens.count(eos) >= 6 and final.finish_reason == "length"
        if speculative:
            assert final.speculative.drafts > 0


@pytest.mark.parametrize(
    "kwargs", [{"min_tokens": -1}, {"min_tokens": 5, "max_tokens": 4}], ids=["negative", "over max_tokens"]
)
def test_impossible_min_tokens_are_refused(kwargs):
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("speculative", [False, True], ids=["plain", "speculative"])
def test_prompt_logprobs_scored_in_chunks_are_a_full_forwards(target, make_engine, monkeypatch, speculative):
    monkeypatch.setattr(engine_module, "PROMPT_CHUNK", 7)  # a 30-token prompt in 5 chunks
    engine = make_engine(
        InProcessDrafterFactory(random_head(target), TreeShape(depth=3, top_k=3, total_tokens=8))
    )
    prompt = prompts(1, seed=9)[0][:5] * 6
    params = SamplingParams(max_tokens=16, prompt_logprobs=True, top_logprobs=2)
    events = request_events(engine, prompt, params, speculative)
    entries = events[0].prompt_logprobs
    assert all(event.prompt_logprobs is None for event in events[1:])
    assert [entry.token_id for entry in entries] == prompt
    assert entries[0].logprob is None and entries[0].top == []
    with torch.inference_mode():
        expected = target(torch.tensor([prompt])).logits[0, :-1].log_softmax(-1)
    for position, entry in enumerate(entries[1:]):
        assert entry.logprob == pytest.approx(expected[position, entry.token_id].item(), abs=1e-4)
        assert [token_id for token_id, _ in entry.top] == expected[position].topk(2).indices.tolist()
    # the chunked prefill leaves the cache (and the drafter's features) as one forward would
    tokens = [t for event in events for t in event.token_ids]
    plain, _ = generate(engine, prompt, SamplingParams(max_tokens=16), speculative=False)
    assert tokens == plain
    if speculative:
        assert events[-1].speculative.drafts > 0


def test_seeded_sampling_gives_plain_decodings_tokens_with_any_drafter(target, make_engine):
    """The draw at each position depends on the seed and the position alone, so speculation
    (any tree, accepted or not) and plain decoding give the same tokens."""
    engines = [
        make_engine(
            InProcessDrafterFactory(random_head(target), TreeShape(depth=3, top_k=3, total_tokens=8))
        ),
        make_engine(Factory(lambda: TargetTopKDrafter(target, top_k=3, levels=2))),
        make_engine(Factory(lambda: OracleDrafter(target, 4))),
    ]
    for seed, extra in [
        (0, {}),
        (1, {"top_p": 0.8}),
        (2, {"top_k": 5, "presence_penalty": 0.5}),
        (3, {"min_p": 0.1}),
    ]:
        params = SamplingParams(temperature=0.9, seed=seed, max_tokens=24, **extra)
        plain, _ = generate(engines[0], [5, 6, 7, 8], params, speculative=False)
        for engine in engines:
            spec, final = generate(engine, [5, 6, 7, 8], params, speculative=True)
            assert spec == plain, (seed, engine)
            assert final.speculative.drafts > 0
    # different seeds draw differently
    draws = {
        tuple(
            generate(engines[0], [5, 6, 7, 8], SamplingParams(temperature=1.0, seed=s, max_tokens=12), False)[
                0
            ]
        )
        for s in range(4)
    }
    assert len(draws) > 1


def test_stop_token_ids_end_the_output_as_eos_does(target, make_engine):
    engines = [
        make_engine(None),
        make_engine(
            InProcessDrafterFactory(random_head(target), TreeShape(depth=3, top_k=3, total_tokens=8))
        ),
        make_engine(Factory(lambda: OracleDrafter(target, 4))),
    ]
    # seeded sampling (lossless token for token): varied output, so a token new to it to stop at
    prompt, sampling = [5, 6, 7], {"temperature": 1.0, "seed": 3}
    free, _ = generate(engines[0], prompt, SamplingParams(max_tokens=24, ignore_eos=True, **sampling), False)
    stop_at = next(i for i, token in enumerate(free) if i >= 2 and token not in free[:i])
    stop = frozenset({free[stop_at]})
    holding = SamplingParams(max_tokens=24, min_tokens=stop_at + 2, stop_token_ids=stop, **sampling)
    held_plainly, _ = generate(engines[0], prompt, holding, speculative=False)
    assert len(held_plainly) >= stop_at + 2 and stop.isdisjoint(held_plainly[: stop_at + 2])
    for engine in engines:
        speculative = engine is not engines[0]
        params = SamplingParams(max_tokens=24, ignore_eos=True, stop_token_ids=stop, **sampling)
        tokens, final = generate(engine, prompt, params, speculative=speculative)
        assert tokens == free[:stop_at] and final.finish_reason == "stop"
        # min_tokens holds them back as it holds EOS
        assert generate(engine, prompt, holding, speculative)[0] == held_plainly
    with pytest.raises(ValueError, match="stop_token_ids"):
        engines[0].submit("r", prompt, SamplingParams(stop_token_ids=frozenset({VOCAB})), lambda event: None)
    with pytest.raises(ValueError, match="stop_token_ids"):
        SamplingParams(stop_token_ids=frozenset(range(65)))


def test_the_pace_guard_hears_a_paying_request_when_its_probe_ends_not_when_it_ends(target, tiny_tokenizer):
    prompt, params = [5, 6, 7, 8], SamplingParams(max_tokens=40)
    reference = prompt + plain_output(target, tiny_tokenizer, prompt, params)

    class HearingGuard(SlowPlainStepGuard):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.heard: list[int] = []  # a request's speculative tokens when the guard heard it

        def observe_request(self, seconds: float, tokens: int) -> None:
            self.heard.append(tokens)
            super().observe_request(seconds, tokens)

    # A free drafter that is always right: 5 tokens a step, so the 2-step probe pays, and
    # the request is heard then, with its 10 tokens, not at its end with all of them, and
    # only once.
    guard = HearingGuard(probe_steps=2)
    engine = Engine(
        target, tiny_tokenizer, drafter_factory=Factory(lambda: ReplayDrafter(reference, 4)), pace_guard=guard
    )
    engine.start()
    try:
        _, final = generate(engine, prompt, params, speculative=True)
    finally:
        engine.stop()
    assert final.speculative.drafts == 8
    assert guard.heard == [10]
