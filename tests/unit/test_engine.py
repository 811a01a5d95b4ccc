"""The generation engine on a tiny random-weight model: KV-cached decoding must match
Hugging Face generate(), and limits, stops, queueing and cancellation must hold."""

import copy
import threading
import time

import pytest
import torch
from aerie_verifier.engine import Engine, PromptTooLongError, QueueFullError
from aerie_verifier.sampling import SamplingParams

from tests.conftest import build_tiny_llama


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


def test_a_target_with_recurrent_layers_is_refused_at_start(tiny_tokenizer):
    import transformers

    config = transformers.Lfm2Config(
        vocab_size=len(tiny_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        layer_types=["conv", "full_attention"],
        pad_token_id=0,
    )
    with pytest.raises(ValueError, match="has conv layers"):
        Engine(transformers.Lfm2ForCausalLM(config).eval(), tiny_tokenizer, max_running=1)


def test_out_of_vocab_prompt_is_refused(engine):
    with pytest.raises(ValueError, match="token ids"):
        engine.submit("r", [5, 10**6], SamplingParams(), Collector())


def test_a_chat_template_refusal_is_bad_input_that_names_the_reason(tiny_model, tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}{{ m['content'] }}{% endfor %}"
    )
    engine = Engine(tiny_model, tokenizer, max_running=1)  # never started: encode_chat needs no loop
    assert engine.encode_chat([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="chat template refuses these messages: System role not supported"):
        engine.encode_chat([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])


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


def test_a_request_is_counted_as_ended_only_once_it_no_longer_runs(tiny_model, tiny_tokenizer):
    """A metrics scrape must never see one request both ended and running (CI, session 34:
    a cancelled request was counted before it left the running list)."""
    engine = Engine(tiny_model, tiny_tokenizer, max_running=1, max_waiting=2)
    running_when_counted = []

    class EndedCounts(dict):
        def __setitem__(self, reason, count):
            running_when_counted.append((reason, engine.num_running))
            super().__setitem__(reason, count)

    engine.totals.ended = EndedCounts(engine.totals.ended)
    engine.start()
    try:
        cancelled = engine.submit("a", [5, 6], SamplingParams(max_tokens=400), Collector())
        deadline = time.monotonic() + 10
        while not engine.num_running and time.monotonic() < deadline:
            time.sleep(0.005)
        cancelled.cancel()
        finished = Collector()
        engine.submit("b", [5, 6], SamplingParams(max_tokens=3, ignore_eos=True), finished)
        assert finished.done.wait(30)
        deadline = time.monotonic() + 5  # retired just after its last event
        while len(running_when_counted) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert running_when_counted == [("cancelled", 0), ("length", 0)]
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


@pytest.fixture(params=["ragged", "padded"])
def batching_model(request, tiny_model, tiny_tokenizer):
    """The tiny target as the engine batches its plain steps: on the CPU's lean forward, as
    one ragged batch; or, with eager attention (which the lean forward does not run),
    left-padded through transformers' forward."""
    if request.param == "ragged":
        return tiny_model
    model = build_tiny_llama(len(tiny_tokenizer))
    model.set_attn_implementation("eager")
    return model


def _requests_per_forward(model, fail_batches: bool = False):
    """Record how many requests each forward of ``model`` carried, and through which
    forward: transformers' (``model.forward``) or, for a ragged batch, the engine's lean one.
    With ``fail_batches``, a forward of several requests raises, after a ragged one has
    written their caches. Returns (sizes, paths, undo)."""
    sizes, paths = [], []

    def record(_module, args, kwargs):
        sizes.append(kwargs["input_ids"].shape[0])
        paths.append("transformers")
        if fail_batches and sizes[-1] > 1:
            raise RuntimeError("no batches today")

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    lean = getattr(model.model, "_aerie_lean_forward", None)
    if lean is None:
        return sizes, paths, handle.remove
    ragged = lean.ragged

    def ragged_recorded(input_ids, position_ids, caches, masks):
        hidden = ragged(input_ids, position_ids, caches, masks)
        if len(caches) > 1:  # a lean forward of one request came through the model's forward
            sizes.append(len(caches))
            paths.append("ragged")
            if fail_batches:
                raise RuntimeError("no batches today")
        return hidden

    lean.ragged = ragged_recorded

    def undo():
        handle.remove()
        del lean.ragged

    return sizes, paths, undo


def test_plain_steps_of_concurrent_requests_share_one_forward(batching_model, tiny_model, tiny_tokenizer):
    """Requests of different lengths decode in one batched forward, each exactly as alone."""
    gen = torch.Generator().manual_seed(7)
    prompts = [
        torch.randint(3, batching_model.config.vocab_size, (n,), generator=gen).tolist()
        for n in (3, 11, 26, 40)
    ]
    params = [SamplingParams(max_tokens=12), SamplingParams(max_tokens=5)] * 2
    alone_engine = Engine(batching_model, tiny_tokenizer, max_running=1)
    alone_engine.start()
    try:
        alone = [run(alone_engine, p, sp).tokens for p, sp in zip(prompts, params, strict=True)]
    finally:
        alone_engine.stop()

    engine = Engine(batching_model, tiny_tokenizer, max_running=4)
    sizes, paths, undo = _requests_per_forward(batching_model)
    collectors = [Collector() for _ in prompts]
    try:
        for i, (p, sp, c) in enumerate(zip(prompts, params, collectors, strict=True)):
            engine.submit(str(i), p, sp, c)
        engine.start()  # all four are waiting, so the first round admits them together
        for c in collectors:
            assert c.done.wait(60)
    finally:
        undo()
        engine.stop()
    assert [c.tokens for c in collectors] == alone
    assert max(sizes) == 4  # the four plain steps shared forwards...
    assert sizes.count(1) == 4  # ...and only the four prefills ran alone
    expected_path = "ragged" if batching_model is tiny_model else "transformers"
    assert {path for path, size in zip(paths, sizes, strict=True) if size > 1} == {expected_path}
    assert engine.totals.generation_tokens == sum(len(t) for t in alone)


def test_a_failed_batched_forward_steps_each_request_alone(batching_model, tiny_tokenizer):
    engine = Engine(batching_model, tiny_tokenizer, max_running=2)
    sizes, _, undo = _requests_per_forward(batching_model, fail_batches=True)
    collectors = [Collector(), Collector()]
    # sampled: the noise picks among near-equal choices, so any stray cache entry shows
    sampled = SamplingParams(max_tokens=6, temperature=1.0, seed=3)
    for i, c in enumerate(collectors):
        engine.submit(str(i), [5 + i, 6, 7], sampled, c)
    engine.start()
    try:
        for c in collectors:
            assert c.done.wait(60)
    finally:
        engine.stop()
    undo()
    refused = [size for size in sizes if size > 1]
    assert refused  # batches were tried, and refused
    alone = Engine(batching_model, tiny_tokenizer, max_running=1)
    alone.start()
    try:
        for i, c in enumerate(collectors):
            assert c.events[-1].error is None
            assert c.tokens == run(alone, [5 + i, 6, 7], sampled).tokens
    finally:
        alone.stop()


def test_a_step_clock_leaves_out_graph_captures_made_during_the_step():
    """Capturing a CUDA graph inside a request's first step of a shape is a one-off cost:
    the pace guard and the speculation stats must not count it as the step's time."""
    from types import SimpleNamespace

    graphs = SimpleNamespace(capture_seconds=2.0)  # captures made before this step
    with_slot = SimpleNamespace(slot=SimpleNamespace(graphs=graphs))
    without_slot = SimpleNamespace(slot=None)
    elapsed_with, elapsed_without = Engine._step_clock(with_slot), Engine._step_clock(without_slot)
    time.sleep(0.3)
    graphs.capture_seconds += 0.3  # the step spent all of it capturing
    assert elapsed_with() < 0.2
    assert elapsed_without() >= 0.3


def test_a_stop_string_written_before_min_tokens_is_output_text(engine):
    prompt = [5, 6, 7]  # the tiny model answers "w" twelve times
    assert run(engine, prompt, SamplingParams(max_tokens=12, ignore_eos=True)).text == "w" * 12

    def stopped(min_tokens: int) -> tuple[str, str]:
        out = run(engine, prompt, SamplingParams(max_tokens=12, stop=("w",), min_tokens=min_tokens))
        return out.text, out.events[-1].finish_reason

    assert stopped(0) == ("", "stop")
    assert stopped(5) == ("wwwww", "stop")  # the sixth "w" stops it
    assert stopped(12) == ("w" * 12, "length")
