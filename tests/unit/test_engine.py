"""The generation engine on a tiny random-weight model: KV-cached decoding must match
Hugging Face generate(), and limits, stops, queueing and cancellation must hold."""

import threading
import time

import pytest
import torch
from aerie_verifier.engine import Engine, PromptTooLongError, QueueFullError
from aerie_verifier.sampling import SamplingParams


class Collector:
    def __init__(self):
        self.events = []
        self.done = threading.Event()

    def __call__(self, event):
        self.events.append(event)
        if event.finish_reason is not None:
            self.done.set()

    @property
    def tokens(self):
        return [t for e in self.events for t in e.token_ids]

    @property
    def text(self):
        return "".join(e.text for e in self.events)


@pytest.fixture
def engine(tiny_model, tiny_tokenizer):
    eng = Engine(tiny_model, tiny_tokenizer, max_running=4, max_waiting=8)
    eng.start()
    yield eng
    eng.stop()


def run(engine, prompt, params, timeout=60):
    out = Collector()
    engine.submit("r", prompt, params, out)
    assert out.done.wait(timeout)
    return out


@pytest.mark.parametrize("prompt_len", [1, 5, 33])
def test_greedy_matches_hf_generate(engine, tiny_model, prompt_len):
    prompt = torch.randint(
        3, tiny_model.config.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(prompt_len)
    ).tolist()
    out = run(engine, prompt, SamplingParams(max_tokens=24))
    reference = tiny_model.generate(
        torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=2, pad_token_id=0
    )
    expected = reference[0, prompt_len:].tolist()
    if 2 in expected:
        expected = expected[: expected.index(2)]
    assert out.tokens == expected
    assert out.events[-1].completion_tokens == len(expected)


def test_max_tokens_gives_length_finish(engine):
    out = run(engine, [5, 6, 7], SamplingParams(max_tokens=7))
    # a random model may emit EOS early; otherwise exactly max_tokens come out
    assert out.events[-1].finish_reason in ("length", "stop")
    if out.events[-1].finish_reason == "length":
        assert len(out.tokens) == 7


def test_eos_inside_an_accepted_run_stops_there(tiny_model, tiny_tokenizer):
    # Speculation hands several tokens at once; EOS in the middle must end the output.
    from aerie_verifier.detokenize import IncrementalDetokenizer
    from aerie_verifier.engine import Sequence

    out = Collector()
    seq = Sequence(
        "r", [1], SamplingParams(), 100, out, IncrementalDetokenizer(tiny_tokenizer), None, frozenset({2})
    )
    seq.append_tokens([70, 71, 2, 72])
    assert seq.output_ids == [70, 71] and seq.finish_reason == "stop"
    seq2 = Sequence(
        "r",
        [1],
        SamplingParams(),
        3,
        Collector(),
        IncrementalDetokenizer(tiny_tokenizer),
        None,
        frozenset({2}),
    )
    seq2.append_tokens([70, 71, 72, 73, 74])
    assert seq2.output_ids == [70, 71, 72] and seq2.finish_reason == "length"


def test_stop_string_inside_an_accepted_run(tiny_tokenizer):
    from aerie_verifier.detokenize import IncrementalDetokenizer
    from aerie_verifier.engine import Sequence

    out = Collector()
    ids = tiny_tokenizer("abcXYZdef", add_special_tokens=False)["input_ids"]
    seq = Sequence(
        "r",
        [1],
        SamplingParams(stop=("XY",)),
        100,
        out,
        IncrementalDetokenizer(tiny_tokenizer, ("XY",)),
        None,
        frozenset({2}),
    )
    seq.append_tokens(ids)
    assert out.text == "abc" and seq.finish_reason == "stop"


def test_seeded_sampling_is_reproducible(engine):
    params = SamplingParams(temperature=1.0, seed=7, max_tokens=16)
    a = run(engine, [5, 6, 7], params).tokens
    b = run(engine, [5, 6, 7], params).tokens
    c = run(engine, [5, 6, 7], SamplingParams(temperature=1.0, seed=8, max_tokens=16)).tokens
    assert a == b
    assert a != c


def test_prompt_longer_than_context_is_refused_with_the_overage(engine):
    ctx = engine.context_length
    with pytest.raises(PromptTooLongError, match=f"{ctx + 10} tokens, 11 too many"):
        engine.submit("r", [5] * (ctx + 10), SamplingParams(), Collector())
    with pytest.raises(PromptTooLongError, match="6 too many"):
        engine.submit("r", [5] * (ctx - 10), SamplingParams(max_tokens=16), Collector())


def test_out_of_vocab_prompt_is_refused(engine):
    with pytest.raises(ValueError, match="token ids"):
        engine.submit("r", [5, 10**6], SamplingParams(), Collector())


def test_queue_bound_and_cancellation(tiny_model, tiny_tokenizer):
    engine = Engine(tiny_model, tiny_tokenizer, max_running=1, max_waiting=1)
    # Not started yet: submissions stay queued, so the bound is deterministic.
    first = engine.submit("a", [5, 6], SamplingParams(max_tokens=400), Collector())
    with pytest.raises(QueueFullError):
        engine.submit("b", [5, 6], SamplingParams(), Collector())
    engine.start()
    try:
        first.cancel()
        second = Collector()
        engine.submit("c", [5, 6], SamplingParams(max_tokens=3), second)
        assert second.done.wait(30)
        deadline = time.monotonic() + 5  # the scheduler drops finished work just after the last event
        while (engine.num_running or engine.num_waiting) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.num_running == 0 and engine.num_waiting == 0
    finally:
        engine.stop()


def test_concurrent_requests_all_finish_with_their_own_output(engine, tiny_model):
    prompts = [[5 + i, 6, 7] for i in range(4)]
    collectors = [Collector() for _ in prompts]
    for i, (p, c) in enumerate(zip(prompts, collectors, strict=True)):
        engine.submit(str(i), p, SamplingParams(max_tokens=10), c)
    for p, c in zip(prompts, collectors, strict=True):
        assert c.done.wait(60)
        alone = run(engine, p, SamplingParams(max_tokens=10))
        assert c.tokens == alone.tokens
