"""The generation engine: a scheduler thread that decodes many requests with one model.

Each request owns its KV cache. The scheduler admits up to ``max_running`` requests from
a bounded waiting queue and advances every running request by one step per round, so
concurrent streams all make progress. A step is the prompt's prefill, the verification of
a whole draft tree in one forward (see tree_verify.py), or one plain decoding step. The
plain steps of a round share one batched forward: a 1-token forward is bound by reading
the weights, so eight of them batched cost much less than eight. On the CPU the engine
tunes its model for tree verification when it takes it (cpu_kernels.py), and the batch
is ragged: the requests' tokens are rows of one lean forward, each attending to its own
cache (lean_forward.py). Speculating requests step alone, so under load the pace guard
may pause their speculation for a round and batch their plain steps with the others'
(``_pause_or_resume``). A request's KV
cache appends in place (kv_cache.py); on a GPU a request that fits takes a fixed-size
cache slot instead, whose plain steps and tree verifications replay CUDA graphs
(static_slot.py), and steps alone. With a prefix cache (prefix_cache.py), a request
starts from the longest beginning of its prompt an earlier request computed.
Results go back through a per-request callback on the scheduler thread; the gRPC adapter
hops them onto its event loop.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from aerie_common.draft_tree import DraftTree
from aerie_common.thread_governor import ThreadGovernor
from jinja2 import TemplateError
from transformers import DynamicCache
from xgrammar import CompiledGrammar

from aerie_verifier.chat_format import TemplateOptions, template_inputs, template_knows_tools
from aerie_verifier.cpu_kernels import speed_up_tree_verification
from aerie_verifier.detokenize import IncrementalDetokenizer
from aerie_verifier.kv_cache import GrowingCache, check_attention_only
from aerie_verifier.prefix_cache import CachedPrefix, LayerKV, PrefixCache
from aerie_verifier.sampling import LogitAdjuster, SamplingParams, TokenLogprob, next_token, token_logprobs
from aerie_verifier.speculative import (
    CircuitBreaker,
    Drafter,
    DrafterFactory,
    HiddenCapture,
    PaceGuard,
    SpeculationDeclined,
    SpeculativeStats,
)
from aerie_verifier.static_slot import StaticSlot
from aerie_verifier.structured_output import GrammarCompiler, GrammarConstraint
from aerie_verifier.tree_verify import accept, keep_cache_entries, path_counts, tree_inputs

log = logging.getLogger(__name__)


# Prompt rows scored at once for prompt logprobs: a chunk's logits are rows x vocabulary floats.
PROMPT_CHUNK = 512


class QueueFullError(Exception):
    """The waiting queue is at its bound."""


class PromptTooLongError(ValueError):
    """The prompt (plus the requested completion) does not fit the context."""


# How a request leaves the engine: finished (stop, length), failed (error) or cancelled
# by its caller before finishing.
END_REASONS = ("stop", "length", "error", "cancelled")


@dataclass
class EngineTotals:
    """Counts since the engine started, for GetLoad and the Prometheus collector. Only the
    scheduler thread writes them; other threads read whole ints (every key of ``ended``
    exists from the start, so reading the dict never races with it growing)."""

    ended: dict[str, int] = field(default_factory=lambda: dict.fromkeys(END_REASONS, 0))
    prompt_tokens: int = 0  # prompt tokens of the requests prefilled, the prefix cache's included
    generation_tokens: int = 0
    # Speculative requests that decoded some or all of their tokens without a drafter
    # (it failed, or had failed less than the breaker's cooldown ago).
    drafter_fallbacks: int = 0
    # Speculative requests whose speculation measured slower than plain decoding, and that
    # decoded the rest plainly (PaceGuard).
    speculation_dropped: int = 0
    # Speculative requests that decoded plainly from the start, because the speculation of
    # recent requests had measured slower than plain decoding (PaceGuard.admits).
    speculation_skipped: int = 0
    # Plain steps that speculating requests took, their speculation paused for the round
    # because the batched plain step decoded more (PaceGuard.prefers_plain).
    speculation_paused_steps: int = 0
    speculative: SpeculativeStats = field(default_factory=SpeculativeStats)


@dataclass
class GenerationEvent:
    token_ids: list[int]
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None  # None while running, then "stop" | "length"
    error: str | None = None  # set when the engine failed on this request
    speculative: SpeculativeStats | None = None  # on the last event of a speculative request
    logprobs: list[TokenLogprob] | None = None  # one per token of ``token_ids``, when asked
    prompt_logprobs: list[TokenLogprob] | None = None  # one per prompt token, on the first event
    cached_prompt_tokens: int = 0  # of the prompt, those the prefix cache held


@dataclass(eq=False)  # a request is itself: compared by identity
class Sequence:
    """One request's decoding state. The KV cache holds every token but the last one
    decided, which is fed (alone, or as the root of a draft tree) at the next step."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    max_new_tokens: int
    on_event: Callable[[GenerationEvent], None]
    detokenizer: IncrementalDetokenizer
    seed: int  # the sampling noise's (sampling.position_noise): the request's, or a random one
    eos_ids: frozenset[int]
    speculative: bool = False
    output_ids: list[int] = field(default_factory=list)
    cache: GrowingCache | None = None
    slot: StaticSlot | None = None  # instead of ``cache``, on a GPU
    cancelled: bool = False
    finish_reason: str | None = None
    draft: Drafter | None = None
    tree: DraftTree | None = None  # the next tree to verify
    capture_layer_ids: tuple[int, ...] = ()  # the target layers the drafter reads; () when not drafting
    spec_stats: SpeculativeStats = field(default_factory=SpeculativeStats)
    fell_back: bool = False  # decoded without the drafter after asking for speculation
    spec_seconds: float = 0.0  # spent in verification steps and their drafting
    spec_tokens: int = 0  # the tokens those steps yielded
    pace_heard: bool = False  # the pace guard has heard how its speculation went
    prompt_logprobs: list[TokenLogprob] | None = None  # until the first event carries them
    # The request's logit bias and repetition penalties; None when it has neither.
    adjuster: LogitAdjuster | None = None
    grammar: GrammarConstraint | None = None  # its structured output's, if any
    cached_prompt_tokens: int = 0  # the prompt's first tokens the prefix cache held
    # The drafter's features of the cache's first rows, in order: the prompt's while it is
    # prefilled (perhaps over several rounds), then, for the prefix cache, the verified rows'.
    features: list[torch.Tensor] = field(default_factory=list)
    # While its speculation is paused (Engine._pause_or_resume): the features of its plain
    # steps' rows, which the drafter hears with their tokens when it resumes.
    unheard: list[torch.Tensor] = field(default_factory=list)

    @property
    def cached_rows(self) -> int:
        if self.slot is not None:
            return self.slot.length
        return self.cache.get_seq_length() if self.cache is not None else 0

    @property
    def prefilled(self) -> bool:
        return self.cached_rows >= len(self.prompt_ids)

    def scores(self, logits: torch.Tensor, tree: DraftTree | None = None) -> torch.Tensor:
        """``logits`` [rows, vocab] as the request's logit bias, repetition penalties,
        structured output and min_tokens leave them: row 0 follows the output so far; with a
        ``tree``, row i+1 also follows node i's path."""
        eos_held = len(self.output_ids) < self.params.min_tokens
        if self.adjuster is None and self.grammar is None and not eos_held:
            return logits
        if self.adjuster is not None:
            on_paths = tree is not None and len(tree) and self.params.penalized
            scores = self.adjuster(
                logits, path_counts(tree, logits.shape[-1], logits.device) if on_paths else None
            )
        else:  # masked in place below: the logits stay as they are, for logprobs
            scores = logits.to(torch.float32, copy=True)
        if self.grammar is not None:
            self.grammar.mask(scores, tree)
        if eos_held:  # rows whose output (the path's included) is still short of min_tokens
            depths = [0, *(tree.depths() if tree is not None else ())]
            short = [
                row
                for row, depth in enumerate(depths)
                if len(self.output_ids) + depth < self.params.min_tokens
            ]
            ends = sorted(self.eos_ids | set(self.params.stop_token_ids))
            scores[torch.tensor(short)[:, None], torch.tensor(ends)] = float("-inf")
        return scores

    def next_token(self, logits: torch.Tensor) -> int:
        """The token to follow the output, from the target's [vocab] logits after it."""
        return next_token(self.scores(logits[None])[0], self.params, self.seed, len(self.output_ids))

    def append_tokens(self, tokens: list[int], logits: torch.Tensor | None = None) -> None:
        """Take newly decided tokens, stopping at EOS, a stop string or the length limit
        even when they fall in the middle of ``tokens``; emit one event. ``logits`` (a row
        per token, the target's before it) are needed when the request asks for logprobs."""
        taken: list[int] = []
        text = ""
        for token in tokens:
            if token in self.params.stop_token_ids or (token in self.eos_ids and not self.params.ignore_eos):
                self.finish_reason = "stop"
                break
            taken.append(token)
            self.output_ids.append(token)
            text += self.detokenizer.add(token)
            if self.detokenizer.stopped:
                self.finish_reason = "stop"
                break
            if len(self.output_ids) >= self.max_new_tokens:
                self.finish_reason = "length"
                break
        if self.finish_reason is not None and not self.detokenizer.stopped:
            text += self.detokenizer.flush()
        if self.adjuster is not None and taken:
            self.adjuster.observe(taken)
        if self.grammar is not None:
            self.grammar.accept(taken)
        logprobs = None
        if self.params.logprobs:
            logprobs = token_logprobs(logits, taken, self.params.top_logprobs) if taken else []
        self.on_event(
            GenerationEvent(
                token_ids=taken,
                text=text,
                prompt_tokens=len(self.prompt_ids),
                completion_tokens=len(self.output_ids),
                finish_reason=self.finish_reason,
                speculative=self.spec_stats if self.speculative and self.finish_reason else None,
                logprobs=logprobs,
                prompt_logprobs=self.prompt_logprobs,
                cached_prompt_tokens=self.cached_prompt_tokens,
            )
        )
        self.prompt_logprobs = None


class RequestHandle:
    def __init__(self, seq: Sequence, engine: Engine):
        self._seq = seq
        self._engine = engine

    def cancel(self) -> None:
        """Stop generating for this request; its KV cache is freed at the next step."""
        self._seq.cancelled = True
        self._engine._wake()


class Engine:
    def __init__(
        self,
        model,
        tokenizer,
        max_running: int = 8,
        max_waiting: int = 64,
        drafter_factory: DrafterFactory | None = None,
        breaker_cooldown_s: float = 10.0,
        pace_guard: PaceGuard | None = None,
        slots: Iterable[StaticSlot] = (),
        prefix_cache: PrefixCache | None = None,
        prefill_chunk_tokens: int = 0,
        thread_governor: ThreadGovernor | None = None,
    ):
        check_attention_only(model.config)
        speed_up_tree_verification(model)
        self.model = model
        # The CPU's lean forward, where it runs this target: batched plain steps go through it
        # as one ragged batch (``_batch_logits``).
        lean = getattr(model.base_model, "_aerie_lean_forward", None)
        self._lean = lean if lean is not None and lean.supports_ragged() else None
        self.tokenizer = tokenizer
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.vocab_size = model.config.vocab_size
        self.context_length = _context_length(model)
        self.eos_ids = _eos_ids(model, tokenizer)
        self.template_knows_tools = template_knows_tools(tokenizer)
        self.grammars = GrammarCompiler(tokenizer, self.vocab_size, self.eos_ids)
        self.drafter_factory = drafter_factory
        self.capture = HiddenCapture(model) if drafter_factory else None
        # Fixed-size KV cache slots (make_slots), free ones last in, first out. Engines
        # that run one after another may share them, and so their captured graphs.
        self._free_slots = list(slots)
        for slot in self._free_slots:
            slot.capture = self.capture
        self.breaker = CircuitBreaker(breaker_cooldown_s)
        self.prefix_cache = prefix_cache
        self.prefill_chunk_tokens = prefill_chunk_tokens  # 0: every prompt whole
        # None: speculate for as long as asked (benchmarks of acceptance need that).
        self.pace_guard = pace_guard if drafter_factory else None
        # On a CPU: fewer torch threads while another process takes a core (thread_governor).
        self.thread_governor = thread_governor
        self._waited_for_drafter_s = 0.0  # in this round, on another process
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._running: list[Sequence] = []
        self._cond = threading.Condition()
        self._stop = False
        self.totals = EngineTotals()
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)

    # -- public API (any thread) -------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=10)
        if self.capture is not None and not self._thread.is_alive():
            self.capture.close()

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def finished_total(self) -> int:
        """Requests that ended other than by cancellation (errors included)."""
        return sum(n for reason, n in self.totals.ended.items() if reason != "cancelled")

    @property
    def cancelled_total(self) -> int:
        return self.totals.ended["cancelled"]

    def encode_chat(
        self,
        messages: list[dict],
        tools: list[dict] | None = None,
        options: TemplateOptions | None = None,
    ) -> list[int]:
        """The prompt of a chat: ``messages`` (OpenAI's, tool calls and results included) and
        the ``tools`` the model may call, through the chat template as ``options`` ask
        (chat_format.py)."""
        template_kwargs = (options or TemplateOptions()).apply_chat_template_kwargs(self.tokenizer)
        messages, tools = template_inputs(messages, tools, self.template_knows_tools)
        try:
            encoded = self.tokenizer.apply_chat_template(
                messages, tools=tools, tokenize=True, **template_kwargs
            )
        except TemplateError as exc:  # the template's own refusal: Gemma's of a system turn, say
            raise ValueError(f"the model's chat template refuses these messages: {exc}") from None
        return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)

    def submit(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        on_event: Callable[[GenerationEvent], None],
        speculative: bool = False,
        grammar: CompiledGrammar | None = None,
    ) -> RequestHandle:
        """Queue a request. A structured output's ``grammar`` may come compiled already
        (``self.grammars.compile``, off the caller's event loop); else it is compiled here."""
        max_new_tokens = self._check_lengths(len(prompt_ids), params.max_tokens)
        if any(not 0 <= t < self.vocab_size for t in prompt_ids):
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size})")
        if any(t >= self.vocab_size for t in params.stop_token_ids):
            raise ValueError(f"stop_token_ids must be in [0, {self.vocab_size})")
        seq = Sequence(
            request_id=request_id,
            prompt_ids=list(prompt_ids),
            params=params,
            max_new_tokens=max_new_tokens,
            on_event=on_event,
            detokenizer=IncrementalDetokenizer(self.tokenizer, params.stop, params.min_tokens),
            seed=params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little"),
            eos_ids=self.eos_ids,
            speculative=speculative and self.drafter_factory is not None,
        )
        if params.adjusts_logits:
            seq.adjuster = LogitAdjuster(params, seq.prompt_ids, self.vocab_size, self.device)
        if params.structured is not None:
            seq.grammar = GrammarConstraint(
                grammar or self.grammars.compile(params.structured), self.vocab_size
            )
        with self._cond:
            if len(self._waiting) >= self.max_waiting:
                raise QueueFullError(f"{len(self._waiting)} requests are already waiting")
            self._waiting.append(seq)
            self._cond.notify()
        return RequestHandle(seq, self)

    def _check_lengths(self, prompt_len: int, max_tokens: int) -> int:
        if prompt_len == 0:
            raise PromptTooLongError("the prompt is empty")
        ctx = self.context_length
        if prompt_len >= ctx:
            raise PromptTooLongError(
                f"the prompt is {prompt_len} tokens, {prompt_len - ctx + 1} too many for this model's "
                f"context length of {ctx} tokens (which must also leave room for at least 1 new token)"
            )
        if max_tokens == 0:
            return ctx - prompt_len
        if prompt_len + max_tokens > ctx:
            raise PromptTooLongError(
                f"this model's context length is {ctx} tokens, but {prompt_len + max_tokens} were requested "
                f"({prompt_len} in the prompt, {max_tokens} for the completion): "
                f"{prompt_len + max_tokens - ctx} too many"
            )
        return max_tokens

    # -- scheduler thread --------------------------------------------------------

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        self._warm_slots()
        if self.pace_guard is not None:
            self._calibrate_plain_steps()
        while True:
            with self._cond:
                while not self._stop and not self._waiting and not self._running:
                    self._cond.wait()
                if self._stop:
                    return
                while self._waiting and len(self._running) < self.max_running:
                    self._running.append(self._waiting.popleft())
            if self.thread_governor is not None:
                self.thread_governor.start_round()
            round_robin = list(self._running)
            produced_before = sum(len(seq.output_ids) for seq in round_robin)
            self._pause_or_resume(round_robin)
            # A slot's plain step is a graph replay of its own: only the others batch.
            plain = [
                seq
                for seq in round_robin
                if not seq.cancelled and seq.slot is None and self._decodes_plainly(seq)
            ]
            batched = self._decode_batch(plain) if len(plain) > 1 else []
            for seq in round_robin:
                if not seq.cancelled and seq not in batched:
                    try:
                        self._step(seq)
                    except Exception as exc:  # one bad request must not take the engine down
                        log.exception("request %s failed", seq.request_id)
                        seq.finish_reason = "error"
                        seq.on_event(
                            GenerationEvent(
                                [], "", len(seq.prompt_ids), len(seq.output_ids), "error", str(exc)
                            )
                        )
                if seq.cancelled or seq.finish_reason is not None:
                    self._retire(seq)
            self.totals.generation_tokens += sum(len(seq.output_ids) for seq in round_robin) - produced_before
            if self.thread_governor is not None:
                self.thread_governor.end_round(self._waited_for_drafter_s)
            self._waited_for_drafter_s = 0.0

    @torch.inference_mode()
    def _warm_slots(self) -> None:
        """Capture every slot's graphs before the first request, so that no request
        carries a capture: the plain step's, and, where the drafter says which layers it
        reads and the tree's size is known, the tree verification's for every row bucket
        up to that size. A drafter not up yet leaves the trees' graphs to the first tree
        of each size. Graphs an earlier engine captured on the same slots are kept."""
        graphed = [slot for slot in self._free_slots if slot.graphs.enabled]
        if not graphed:
            return
        tree_nodes, layer_ids = 0, ()
        shape = getattr(self.drafter_factory, "shape", None)
        if shape is not None:
            try:
                layer_ids = tuple(self.drafter_factory.capture_layer_ids())
                tree_nodes = shape.total_tokens
            except Exception as exc:  # declined, or not reachable yet
                log.info("tree graphs not captured ahead: %s", exc)
        for slot in graphed:
            try:
                slot.warm(tree_nodes, layer_ids)
            except Exception:  # the requests then fail or run eagerly, and say why
                log.warning("warming a KV cache slot failed", exc_info=True)

    @torch.inference_mode()
    def _calibrate_plain_steps(self) -> None:
        """Seed the pace guard with the time of a 1-token decoding step, and of a batched
        one of 2 to ``max_running`` requests where plain steps batch (not in slots), so that
        the first requests can be judged too: best of three, on caches of 16 tokens.
        Reading the tokens back waits for the device, as a real step does."""
        try:
            slot = self._free_slots[0] if self._free_slots else None
            if slot is not None:  # the steps the guard will compare with are the slots' graphs
                slot.prefill([0] * 16)
                steps = {1: lambda: slot.decode(0)}
            else:
                cache = GrowingCache()
                ids = torch.zeros((1, 16), dtype=torch.long, device=self.device)
                self.model(input_ids=ids, past_key_values=cache)
                steps = {
                    1: lambda: self.model(
                        input_ids=ids[:, :1], past_key_values=cache, logits_to_keep=1
                    ).logits[0, -1]
                }
                for requests in range(2, self.max_running + 1):
                    caches = [cache.copy() for _ in range(requests)]
                    steps[requests] = lambda caches=caches: self._batch_logits(
                        [0] * len(caches), caches, [c.get_seq_length() for c in caches]
                    )
            for requests, step in steps.items():
                timings = []
                for _ in range(3):
                    started = time.perf_counter()
                    step().argmax(-1).tolist()
                    timings.append(time.perf_counter() - started)
                self.pace_guard.observe_plain_step(min(timings), requests)
        except Exception:  # the guard then learns from the first plain steps instead
            log.warning("calibrating the plain decoding steps failed", exc_info=True)

    def _retire(self, seq: Sequence) -> None:
        if seq.finish_reason is None:
            log.info("request %s cancelled after %d tokens", seq.request_id, len(seq.output_ids))
        if seq.prefilled and seq.finish_reason != "error":
            self._remember(seq, [*seq.prompt_ids, *seq.output_ids], seq.capture_layer_ids)
        if seq.speculative:
            self.totals.speculative.merge(seq.spec_stats)
        if self.pace_guard is not None and not seq.pace_heard:
            self.pace_guard.observe_request(seq.spec_seconds, seq.spec_tokens)
        self._stop_drafting(seq)
        seq.cache = None
        if seq.slot is not None:
            self._free_slots.append(seq.slot)
            seq.slot = None
        self._running.remove(seq)
        # Counted as ended once it no longer runs: a metrics scrape in between saw a
        # cancelled request both ended and running (CI, session 34).
        self.totals.ended[seq.finish_reason or "cancelled"] += 1

    @torch.inference_mode()
    def _step(self, seq: Sequence) -> None:
        if seq.slot is not None and not seq.slot.fits(1 + len(seq.tree or ())):
            self._leave_slot(seq)
        if not seq.prefilled:
            self._prefill(seq)
        elif seq.tree is not None and self._tree_fits(seq, seq.tree):
            self._verify_tree(seq)
        else:
            self._decode_one(seq)

    def _prefill(self, seq: Sequence) -> None:
        """One round's share of the prompt (see ``_prefill_eagerly``); after its last, the
        first token, and the first draft tree."""
        prefix = self._begin_prefill(seq) if seq.cache is None and seq.slot is None else None
        layer_ids = seq.capture_layer_ids
        if seq.slot is not None:  # a slot takes its prompt whole: a GPU prefills fast
            logits, features = seq.slot.prefill(seq.prompt_ids, layer_ids, prefix)
        else:
            with self.capture.layers(layer_ids) if layer_ids else contextlib.nullcontext():
                logits = self._prefill_eagerly(seq, layer_ids, prefix)
            if logits is None:  # the rest in later rounds
                return
            features = torch.cat(seq.features) if layer_ids else None
        seq.features = [features] if layer_ids and self.prefix_cache is not None else []
        self._remember(seq, seq.prompt_ids, layer_ids)  # for the other choices of an n > 1 request, say
        token = seq.next_token(logits)
        seq.append_tokens([token], logits[None])
        if layer_ids and seq.finish_reason is None:
            self._next_tree(seq, lambda draft: draft.start([*seq.prompt_ids, token], features))

    def _begin_prefill(self, seq: Sequence) -> CachedPrefix | None:
        """Decide the layers to capture, find the prompt's cached beginning, and give the
        request a slot or a growing cache; returns the cached beginning."""
        self.totals.prompt_tokens += len(seq.prompt_ids)
        if seq.speculative and self.pace_guard is not None and not self.pace_guard.admits():
            self.totals.speculation_skipped += 1  # decodes plainly (PaceGuard.admits)
        elif seq.speculative:
            seq.capture_layer_ids = (self._capture_layers(seq) if self.breaker.allow() else None) or ()
            if not seq.capture_layer_ids:
                self._fall_back(seq)
        # (prompt logprobs need every prompt row's logits: neither the prefix cache nor the
        # slots keep them)
        scored = seq.params.prompt_logprobs
        prefix = None
        if self.prefix_cache is not None and not scored:
            prefix = self.prefix_cache.match(seq.prompt_ids, seq.capture_layer_ids)
            seq.cached_prompt_tokens = prefix.length if prefix is not None else 0
        fits_a_slot = self._free_slots and len(seq.prompt_ids) < self._free_slots[-1].capacity
        if fits_a_slot and not scored:
            seq.slot = self._free_slots.pop()
        else:
            seq.cache = GrowingCache()
        return prefix

    def _prefill_eagerly(
        self, seq: Sequence, layer_ids: tuple[int, ...], prefix: CachedPrefix | None
    ) -> torch.Tensor | None:
        """Cache this round's share of the prompt on ``seq``'s growing cache, starting from
        ``prefix`` when given; the last row's logits once the whole prompt is in, else None.
        Alone, a request takes its whole prompt at once; beside others, prefill_chunk_tokens
        a round (if set), so that their streams do not stall behind a long prompt (vLLM's chunked
        prefill, a round at a time). For prompt logprobs the prompt goes in chunks of
        PROMPT_CHUNK, every row scored, so that no more rows of logits than that exist at once."""
        prompt = seq.prompt_ids
        scored = seq.params.prompt_logprobs
        if prefix is not None:
            for layer_idx, (keys, values) in enumerate(prefix.layers):
                seq.cache.update(keys, values, layer_idx)  # a copy: the cache grows in place
            if layer_ids:
                seq.features.append(prefix.features)
        done = seq.cached_rows
        if scored and done == 0:  # the first token has no log probability
            seq.prompt_logprobs = [TokenLogprob(prompt[0], None, [])]
        alone = len(self._running) == 1 or not self.prefill_chunk_tokens
        end = len(prompt) if alone else min(len(prompt), done + self.prefill_chunk_tokens)
        chunk = PROMPT_CHUNK if scored else end - done
        for start in range(done, end, chunk):
            stop = min(start + chunk, end)
            input_ids = torch.tensor([prompt[start:stop]], device=self.device)
            logits = self.model(
                input_ids=input_ids, past_key_values=seq.cache, logits_to_keep=0 if scored else 1
            ).logits[0]
            if layer_ids:
                seq.features.append(self.capture.features(layer_ids))
            following = prompt[start + 1 : stop + 1]
            if scored and following:  # row i scores the prompt's next token (the last row, the first new one)
                seq.prompt_logprobs += token_logprobs(logits, following, seq.params.top_logprobs)
        return logits[-1] if end == len(prompt) else None

    def _remember(self, seq: Sequence, token_ids: list[int], layer_ids: tuple[int, ...]) -> None:
        """Give the prefix cache ``seq``'s cache of ``token_ids`` (as many of them as it
        holds: a stop may end the output before the last tokens verified), with the
        drafter's features of its rows when they were captured from ``layer_ids``."""
        if self.prefix_cache is None:
            return
        layers: list[LayerKV] = (
            seq.slot.layer_kv()
            if seq.slot is not None
            else [(layer.keys, layer.values) for layer in seq.cache.layers]
        )
        if not layers:
            return
        rows = min(len(token_ids), layers[0][0].shape[-2])
        features = torch.cat(seq.features)[:rows] if layer_ids and seq.features else None
        try:
            self.prefix_cache.store(token_ids[:rows], layers, features, layer_ids)
        except Exception:  # out of memory, say: the request goes on, uncached
            log.warning("caching the prefix of request %s failed", seq.request_id, exc_info=True)

    def _capture_layers(self, seq: Sequence) -> tuple[int, ...] | None:
        try:
            return tuple(self.drafter_factory.capture_layer_ids())
        except SpeculationDeclined:
            return None
        except Exception as exc:
            log.warning(
                "request %s: drafter unavailable (%s); decoding without speculation", seq.request_id, exc
            )
            self._drafter_failed()
            return None

    def _decodes_plainly(self, seq: Sequence) -> bool:
        """Whether ``seq``'s next step is one plain decoding step (see ``_step``)."""
        return seq.prefilled and (seq.tree is None or not self._tree_fits(seq, seq.tree))

    def _leave_slot(self, seq: Sequence) -> None:
        """The request has filled its slot: it carries on eagerly, on a growing cache that
        starts as a copy of the slot's entries, and the slot is free for another."""
        slot, seq.slot = seq.slot, None
        seq.cache = GrowingCache()
        for layer_idx, layer in enumerate(slot.cache.layers):
            seq.cache.update(
                layer.keys[..., : slot.length, :], layer.values[..., : slot.length, :], layer_idx
            )
        self._free_slots.append(slot)

    @staticmethod
    def _step_clock(seq: Sequence) -> Callable[[], float]:
        """A clock for one step of ``seq``: seconds since this call, less any CUDA graph
        captured meanwhile on its slot, a one-off cost that is not the step's."""
        started = time.perf_counter()
        graphs = seq.slot.graphs if seq.slot is not None else None
        captured_before = graphs.capture_seconds if graphs is not None else 0.0

        def elapsed() -> float:
            captured = graphs.capture_seconds - captured_before if graphs is not None else 0.0
            return time.perf_counter() - started - captured

        return elapsed

    def _decode_one(self, seq: Sequence) -> None:
        seq.tree = None
        elapsed = self._step_clock(seq)
        if seq.slot is not None:
            logits = seq.slot.decode(seq.output_ids[-1])
        else:
            with self._capturing([seq]):
                input_ids = torch.tensor([seq.output_ids[-1:]], device=self.device)
                logits = self.model(input_ids=input_ids, past_key_values=seq.cache, logits_to_keep=1).logits[
                    0, -1
                ]
                self._keep_unheard([seq])
        token = seq.next_token(logits)
        if self.pace_guard is not None:
            self.pace_guard.observe_plain_step(elapsed())
        seq.append_tokens([token], logits[None])

    @torch.inference_mode()
    def _decode_batch(self, seqs: list[Sequence]) -> list[Sequence]:
        """One plain decoding step for several requests in one forward. Returns the
        requests stepped: none when the forward failed (every cache is then as it was), and
        each then takes its step alone."""
        lengths = [seq.cache.get_seq_length() for seq in seqs]
        started = time.perf_counter()
        try:
            with self._capturing(seqs):
                logits = self._batch_logits(
                    [seq.output_ids[-1] for seq in seqs], [seq.cache for seq in seqs], lengths
                )
                self._keep_unheard(seqs)
        except Exception:
            log.exception("batched decoding of %d requests failed; stepping each alone", len(seqs))
            for seq, length in zip(seqs, lengths, strict=True):
                for layer in seq.cache.layers:
                    layer.crop(min(0, length - layer.get_seq_length()))
            return []
        tokens = [seq.next_token(logits[row]) for row, seq in enumerate(seqs)]
        if self.pace_guard is not None:
            self.pace_guard.observe_plain_step(time.perf_counter() - started, len(seqs))
        for row, (seq, token) in enumerate(zip(seqs, tokens, strict=True)):
            seq.tree = None
            seq.append_tokens([token], logits[row : row + 1])
        return seqs

    def _capturing(self, seqs: list[Sequence]):
        """A context capturing the drafter's features during a plain step of ``seqs``, where
        any of them is drafting (its speculation paused); else none."""
        layer_ids = sorted(
            {layer for seq in seqs if seq.draft is not None for layer in seq.capture_layer_ids}
        )
        return self.capture.layers(tuple(layer_ids)) if layer_ids else contextlib.nullcontext()

    def _keep_unheard(self, seqs: list[Sequence]) -> None:
        """After a plain step captured (``_capturing``): each drafting request keeps its row's
        features for the drafter, and for the prefix cache."""
        for row, seq in enumerate(seqs):
            if seq.draft is not None:
                features = self.capture.features(seq.capture_layer_ids)[row : row + 1]
                seq.unheard.append(features)
                if self.prefix_cache is not None:
                    seq.features.append(features)

    def _batch_logits(
        self, tokens: list[int], caches: list[GrowingCache], lengths: list[int]
    ) -> torch.Tensor:
        """The [requests, vocab] logits of one plain step of requests whose last tokens are
        ``tokens``, on ``caches`` of ``lengths`` entries, each cache growing by one."""
        if self._lean is not None:
            # one lean forward over a ragged batch (lean_forward.py): each request's token is
            # a row, attending to its own cache, and the caches grow in place
            hidden = self._lean.ragged(
                torch.tensor([tokens], device=self.device),
                torch.tensor([lengths], device=self.device),
                caches,
                [None] * len(caches),
            )
            return self.model.lm_head(hidden[0])
        # transformers' forward, for targets the lean forward does not run: the caches are
        # left-padded into one batch (the padding masked out, each row at its own position),
        # and each request's new key and value are appended to its own cache afterwards
        width = max(lengths)
        batch_cache = DynamicCache()
        for layer_idx in range(len(caches[0].layers)):
            keys, values = [], []
            for cache, length in zip(caches, lengths, strict=True):
                layer = cache.layers[layer_idx]
                keys.append(F.pad(layer.keys, (0, 0, width - length, 0)))
                values.append(F.pad(layer.values, (0, 0, width - length, 0)))
            batch_cache.update(torch.cat(keys), torch.cat(values), layer_idx)
        attention_mask = torch.zeros((len(caches), width + 1), dtype=torch.long, device=self.device)
        for row, length in enumerate(lengths):
            attention_mask[row, width - length :] = 1
        logits = self.model(
            input_ids=torch.tensor([[token] for token in tokens], device=self.device),
            attention_mask=attention_mask,
            position_ids=torch.tensor([[length] for length in lengths], device=self.device),
            past_key_values=batch_cache,
            logits_to_keep=1,
        ).logits[:, -1]
        for layer_idx, layer in enumerate(batch_cache.layers):
            for row, cache in enumerate(caches):
                cache.update(
                    layer.keys[row : row + 1, :, -1:], layer.values[row : row + 1, :, -1:], layer_idx
                )
        return logits

    def _pause_or_resume(self, running: list[Sequence]) -> None:
        """Under load, pause the speculation of the drafting requests for this round, so that
        they join the batched plain step, where the pace guard measures that the round then
        decodes more (PaceGuard.prefers_plain); else resume it (after a pause, or after a plain
        step for an empty tree), the drafter first hearing the tokens decoded plainly
        meanwhile. Requests in slots step alone either way. A request whose tree no longer fits
        the context stops drafting: no later tree would."""
        drafting, plain = [], 0
        for seq in running:
            if seq.cancelled or seq.slot is not None or not seq.prefilled:
                continue
            if seq.draft is not None and seq.tree is not None and not self._tree_fits(seq, seq.tree):
                self._stop_drafting(seq)
            if seq.draft is not None:
                drafting.append(seq)
            elif self._decodes_plainly(seq):
                plain += 1
        if not drafting:
            return
        pause = self.pace_guard is not None and self.pace_guard.prefers_plain(plain, len(drafting))
        if pause:
            self.totals.speculation_paused_steps += len(drafting)
        for seq in drafting:
            if pause:
                seq.tree = None  # drafted for nothing: the drafter hears the plain steps instead
            elif seq.unheard:
                features, seq.unheard = torch.cat(seq.unheard), []
                tokens = seq.output_ids[-len(features) :]
                self._next_tree(
                    seq, lambda draft, tokens=tokens, features=features: draft.extend(tokens, features)
                )

    def _verify_tree(self, seq: Sequence) -> None:
        elapsed = self._step_clock(seq)
        tree, seq.tree = seq.tree, None
        if seq.slot is not None:
            logits, features = seq.slot.verify(seq.output_ids[-1], tree, seq.capture_layer_ids)
        else:
            past_len = seq.cache.get_seq_length()
            inputs = tree_inputs(
                seq.output_ids[-1], tree, past_len, self.model.config, self.device, self.dtype
            )
            with self.capture.layers(seq.capture_layer_ids):
                logits = self.model(**inputs.model_kwargs(), past_key_values=seq.cache).logits[0]
                features = self.capture.features(seq.capture_layer_ids)
        scores = seq.scores(logits, tree)
        position = len(seq.output_ids)  # of the root's child: a row at depth d chooses at position + d
        accepted, bonus = accept(
            tree, lambda row, depth: next_token(scores[row], seq.params, seq.seed, position + depth)
        )
        if seq.slot is not None:
            seq.slot.keep(accepted)
        else:
            keep_cache_entries(seq.cache, past_len, accepted)
        seq.spec_stats.record(len(tree), len(accepted), elapsed())
        new_tokens = [tree.token_ids[i] for i in accepted] + [bonus]
        rows = [0, *(i + 1 for i in accepted)]  # the rows that chose the new tokens
        verified = features[rows]
        if self.prefix_cache is not None:  # in order with the cache's rows, plain steps' included
            seq.features.append(verified)
        seq.append_tokens(new_tokens, logits[rows] if seq.params.logprobs else None)
        if seq.finish_reason is None:
            self._next_tree(seq, lambda draft: draft.extend(new_tokens, verified))
        seconds = elapsed()
        seq.spec_seconds += seconds
        seq.spec_tokens += len(new_tokens)
        guard = self.pace_guard
        if guard is None:
            return
        guard.observe_speculation(seconds, len(new_tokens))
        if seq.draft is None:  # the drafter failed: the request decodes plainly now
            return
        if not guard.pays(seq.spec_stats.drafts, seq.spec_seconds, seq.spec_tokens):
            log.info(
                "request %s: speculation yields %.1f ms per token against %.1f ms plain; decoding plainly",
                seq.request_id,
                1000 * seq.spec_seconds / seq.spec_tokens,
                1000 * guard.plain_step_s,
            )
            self._stop_drafting(seq)
            self.totals.speculation_dropped += 1
        # The guard hears a request once, when its probe has run (a drop comes no sooner), or
        # when it ends, if sooner: a long request whose speculation pays must not keep the next
        # ones plain until it ends.
        if not seq.pace_heard and seq.spec_stats.drafts >= guard.probe_steps:
            guard.observe_request(seq.spec_seconds, seq.spec_tokens)
            seq.pace_heard = True

    def _tree_fits(self, seq: Sequence, tree: DraftTree) -> bool:
        if seq.slot is not None:
            return seq.slot.fits(1 + len(tree))
        return seq.cache.get_seq_length() + 1 + len(tree) <= self.context_length

    def _next_tree(self, seq: Sequence, ask: Callable[[Drafter], DraftTree]) -> None:
        """Ask the drafter for the next tree; on any failure carry on without speculation."""
        try:
            if seq.draft is None:
                seq.draft = self.drafter_factory.open(seq.request_id)
            hop_before, asked_at = seq.draft.hop_seconds, time.perf_counter()
            tree = ask(seq.draft)
            waited = time.perf_counter() - asked_at
            seq.spec_stats.record_tree(waited, seq.draft.hop_seconds - hop_before)
            if not seq.draft.in_process:
                self._waited_for_drafter_s += waited
            tree.validate(self.vocab_size)
            seq.tree = tree if len(tree) else None
        except Exception as exc:
            log.warning("request %s: drafter failed (%s); decoding without speculation", seq.request_id, exc)
            self._drafter_failed()
            self._stop_drafting(seq)
            self._fall_back(seq)

    def _drafter_failed(self) -> None:
        self.breaker.record_failure()
        self.drafter_factory.forget()

    def _fall_back(self, seq: Sequence) -> None:
        if not seq.fell_back:
            seq.fell_back = True
            self.totals.drafter_fallbacks += 1

    def _stop_drafting(self, seq: Sequence) -> None:
        seq.tree = None
        if seq.draft is not None:
            draft, seq.draft = seq.draft, None
            try:
                draft.close()
            except Exception:  # closing a broken session must not fail the request
                log.debug("closing draft session of %s failed", seq.request_id, exc_info=True)


def make_slots(model, count: int, tokens: int) -> list[StaticSlot]:
    """``count`` KV cache slots of ``tokens`` each (at most the model's context length)
    for an Engine; on a GPU their forwards replay CUDA graphs."""
    capacity = min(tokens, _context_length(model))
    # One graph pool for them all: an engine runs one forward at a time.
    pool = (
        torch.cuda.graph_pool_handle() if count and next(model.parameters()).device.type == "cuda" else None
    )
    return [StaticSlot(model, capacity, capture=None, cuda_graphs=True, pool=pool) for _ in range(count)]


def _context_length(model) -> int:
    return int(getattr(model.config, "max_position_embeddings", 0) or 2048)


def _eos_ids(model, tokenizer) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        eos = getattr(source, "eos_token_id", None) if source is not None else None
        if eos is not None:
            ids.update(eos if isinstance(eos, list) else [eos])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)
