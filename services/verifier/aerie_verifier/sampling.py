"""Turning logits into tokens: logit bias, repetition penalties, temperature, top-k and
top-p (nucleus) filtering; and the log probabilities reported with the tokens.

Kept apart from the engine so that speculative verification builds the very same target
distribution that plain decoding samples from, and makes the very same draw from it: a
draw depends on the request's noise at its output position alone (``next_token``), so
verification can tell whether plain decoding would have chosen a draft token.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from aerie_common.sampling_limits import (
    MAX_LOGIT_BIAS,
    MAX_LOGIT_BIAS_TOKENS,
    MAX_PENALTY,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    MAX_TOP_LOGPROBS,
    SAMPLING_DEFAULT_FIELDS,
    check_sampling_defaults,
    check_sampling_value,
)

from aerie_verifier.structured_output import StructuredOutput

log = logging.getLogger(__name__)

NUCLEUS_CANDIDATES = 1024  # see _outside_nucleus


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 disables
    # vLLM's: tokens less likely than min_p times the most likely one are dropped; 0 disables
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    max_tokens: int = 0  # 0 means "up to the context length"
    # OpenAI's: subtracted from a token's logit per occurrence in the output so far, and
    # once if it occurs there at all.
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    # Hugging Face's and vLLM's: a token of the prompt or the output so far has its logit
    # divided by this when positive, multiplied when negative; 1 disables.
    repetition_penalty: float = 1.0
    # OpenAI's: (token id, bias) pairs, each bias added to that token's logit.
    logit_bias: tuple[tuple[int, float], ...] = ()
    structured: StructuredOutput | None = None  # what the output must match
    # vLLM's: decode past EOS (for benchmarks of a fixed length), and not stop at EOS before
    # this many tokens.
    ignore_eos: bool = False
    min_tokens: int = 0  # (no stop_token_ids either before then, nor stop strings: detokenize.py)
    # vLLM's: tokens that end the output as EOS does (not part of it), even with ignore_eos.
    stop_token_ids: frozenset[int] = frozenset()
    logprobs: bool = False  # report each chosen token's log probability
    top_logprobs: int = 0  # and those of this many most likely tokens at its position
    prompt_logprobs: bool = False  # and each prompt token's (with top_logprobs alternatives)

    def __post_init__(self) -> None:
        for field in SAMPLING_DEFAULT_FIELDS:
            check_sampling_value(field, getattr(self, field))
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        if any(len(s) > MAX_STOP_CHARS for s in self.stop):
            raise ValueError(f"stop strings must be at most {MAX_STOP_CHARS} characters")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if not (math.isfinite(value) and -MAX_PENALTY <= value <= MAX_PENALTY):
                raise ValueError(f"{name} must be in [-{MAX_PENALTY}, {MAX_PENALTY}], got {value}")
        if len(self.logit_bias) > MAX_LOGIT_BIAS_TOKENS:
            raise ValueError(
                f"logit_bias holds {len(self.logit_bias)} tokens, more than {MAX_LOGIT_BIAS_TOKENS}"
            )
        for token_id, bias in self.logit_bias:
            if token_id < 0:
                raise ValueError(f"logit_bias names token id {token_id}: token ids are >= 0")
            if not (math.isfinite(bias) and -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS):
                raise ValueError(f"logit_bias must be in [-{MAX_LOGIT_BIAS}, {MAX_LOGIT_BIAS}], got {bias}")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS or any(t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be at most {MAX_STOP_TOKEN_IDS} token ids >= 0")
        if self.min_tokens < 0 or (self.max_tokens and self.min_tokens > self.max_tokens):
            raise ValueError(f"min_tokens must be in [0, max_tokens], got {self.min_tokens}")
        if self.ignore_eos and self.structured is not None:
            raise ValueError("ignore_eos cannot be combined with a structured output, which ends at EOS")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}")
        if self.top_logprobs and not (self.logprobs or self.prompt_logprobs):
            raise ValueError("top_logprobs needs logprobs or prompt_logprobs")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return bool(self.frequency_penalty or self.presence_penalty or self.repetition_penalty != 1)

    @property
    def adjusts_logits(self) -> bool:
        return self.penalized or bool(self.logit_bias)


def sampling_defaults(
    generation_config: Any, use_model: bool, overrides: dict[str, float]
) -> dict[str, float]:
    """The defaults a verifier decodes requests with where they leave a sampling field out
    (ModelInfo.sampling_defaults): those that ``generation_config`` (the model's
    transformers GenerationConfig) sets, where ``use_model``, and ``overrides`` over them. A
    recommendation no request could hold (a top_p of 0) is left out, said in the log."""
    recommended = generation_config.to_diff_dict() if use_model and generation_config is not None else {}
    found = {}
    for field in SAMPLING_DEFAULT_FIELDS:
        if recommended.get(field) is not None:
            try:
                found |= check_sampling_defaults({field: recommended[field]})
            except ValueError as exc:
                log.warning("the model's generation_config.json: %s; not used", exc)
    return {**found, **overrides}


def penalize(
    logits: torch.Tensor, params: SamplingParams, output_counts: torch.Tensor, prompt_seen: torch.Tensor
) -> torch.Tensor:
    """``logits`` [rows, vocab] with the repetition penalties of ``params`` applied, each row
    after its own output so far: ``output_counts`` [rows, vocab] (or [vocab], one for all)
    holds how often each token occurs in that row's output, ``prompt_seen`` [vocab] which tokens the prompt
    holds. (A draft tree's rows each follow their own path, so their counts differ.)"""
    logits = logits.float()
    in_output = output_counts > 0
    if params.repetition_penalty != 1:
        seen = in_output | prompt_seen
        scaled = torch.where(
            logits > 0, logits / params.repetition_penalty, logits * params.repetition_penalty
        )
        logits = torch.where(seen, scaled, logits)
    return logits - params.frequency_penalty * output_counts - params.presence_penalty * in_output


class LogitAdjuster:
    """One request's logit bias and repetition penalties, with the counts they need."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], vocab_size: int, device: torch.device):
        if any(token_id >= vocab_size for token_id, _ in params.logit_bias):
            raise ValueError(f"logit_bias token ids must be in [0, {vocab_size})")
        self.params = params
        self.bias = None
        if params.logit_bias:
            token_ids, biases = zip(*params.logit_bias, strict=True)
            self.bias = torch.zeros(vocab_size, device=device)
            self.bias[torch.tensor(token_ids, device=device)] = torch.tensor(biases, device=device)
        self.output_counts = torch.zeros(vocab_size, device=device)
        self.prompt_seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        self.prompt_seen[torch.tensor(prompt_ids, device=device)] = True

    def observe(self, token_ids: list[int]) -> None:
        """Count tokens that joined the output."""
        device = self.output_counts.device
        self.output_counts.index_add_(
            0, torch.tensor(token_ids, device=device), torch.ones(len(token_ids), device=device)
        )

    def __call__(self, logits: torch.Tensor, path_counts: torch.Tensor | None = None) -> torch.Tensor:
        """``logits`` [rows, vocab] as the bias and penalties leave them, each row after the
        output so far plus, where given, ``path_counts`` [rows, vocab] tokens of its own."""
        logits = logits.float()
        if self.bias is not None:
            logits = logits + self.bias
        if not self.params.penalized:
            return logits
        counts = self.output_counts if path_counts is None else self.output_counts + path_counts
        return penalize(logits, self.params, counts, self.prompt_seen)


@dataclass(frozen=True)
class TokenLogprob:
    """A chosen token's log probability, and the most likely tokens' at its position."""

    token_id: int
    logprob: float | None  # None for a prompt's first token: nothing comes before it
    top: list[tuple[int, float]]  # (token id, log probability), most likely first


def token_logprobs(logits: torch.Tensor, token_ids: list[int], top_n: int) -> list[TokenLogprob]:
    """The log probabilities of ``token_ids``, one per row of ``logits`` [rows, vocab], under
    the model's own distribution (before penalties, temperature and filtering: vLLM's
    default, and what the request's sampling settings cannot distort)."""
    logprobs = torch.log_softmax(logits[: len(token_ids)].float(), dim=-1)
    rows = torch.arange(len(token_ids), device=logits.device)
    chosen = logprobs[rows, torch.tensor(token_ids, device=logits.device)].tolist()
    if top_n:
        values, ids = torch.topk(logprobs, top_n, dim=-1)
        tops = [list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
    else:
        tops = [[] for _ in token_ids]
    return [TokenLogprob(t, lp, top) for t, lp, top in zip(token_ids, chosen, tops, strict=True)]


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution the target samples from, over the last dimension of ``logits``.

    Greedy parameters give a one-hot distribution on the argmax, so callers can treat
    greedy and sampled decoding alike.
    """
    logits = logits.float()
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        logits = logits.masked_fill(_outside_nucleus(logits, params.top_p), float("-inf"))
    if params.min_p > 0:
        # p < min_p * p_max, in logits (the top token stays); after top-k and top-p, in
        # the order Hugging Face's warpers run them
        threshold = logits.max(-1, keepdim=True).values + math.log(params.min_p)
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    return logits.softmax(-1)


def _outside_nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Which tokens top-p filtering drops: a token goes when the tokens ranked above it
    already cover top_p (so the top token always stays). The nucleus nearly always lies
    within the NUCLEUS_CANDIDATES most likely tokens, which are ranked alone (sorting the
    whole vocabulary costs milliseconds a token on a CPU); otherwise all are."""
    probs = logits.softmax(-1)
    candidates = min(NUCLEUS_CANDIDATES, logits.shape[-1])
    ranked, order = probs.topk(candidates, dim=-1)
    covered_before = ranked.cumsum(-1) - ranked
    if candidates < logits.shape[-1] and not (covered_before[..., -1] >= top_p).all():
        ranked, order = probs.sort(dim=-1, descending=True)
        covered_before = ranked.cumsum(-1) - ranked
    drop = torch.ones_like(probs, dtype=torch.bool)
    return drop.scatter(-1, order, covered_before >= top_p)


def position_noise(seed: int, position: int, size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Exp(1) noise over ``size`` tokens for output position ``position`` of a request
    seeded ``seed``: a function of those alone, however the token there comes to be chosen."""
    digest = hashlib.blake2b(f"{seed}:{position}".encode(), digest_size=8).digest()
    generator = torch.Generator(device=device)
    generator.manual_seed(int.from_bytes(digest, "little"))
    # -log U for U uniform is Exp(1); six times faster than torch's exponential_ on a CPU.
    uniform = torch.rand(size, device=device, generator=generator)
    return uniform.clamp_(min=torch.finfo(uniform.dtype).tiny).log_().neg_()


def next_token(scores: torch.Tensor, params: SamplingParams, seed: int, position: int) -> int:
    """The token at output ``position`` from the target's [vocab] ``scores`` there: the
    argmax, or a draw from the sampling distribution p, made as the exponential race
    argmax p(x)/q(x) with q the request's noise at that position (each x wins with
    probability p(x), as in Gumbel-max sampling; vLLM's sampler draws so too). The draw
    depends on the position's noise alone, not on how many draws came before, so a
    seeded request gives the same tokens with speculation as without, at any batch."""
    if params.greedy:
        return int(scores.argmax(-1).item())
    probs = target_probs(scores, params)
    return int((probs / position_noise(seed, position, probs.shape[-1], probs.device)).argmax().item())
