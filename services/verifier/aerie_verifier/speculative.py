"""What the engine needs for speculative decoding, apart from the verification maths:
capturing the target's hidden states, the drafter interface, statistics, and a circuit
breaker that stops asking a failing drafter for a while."""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import torch
from aerie_common.draft_tree import DraftTree


class Drafter(Protocol):
    """One request's draft session, in-process or over gRPC. Any exception means the
    drafter failed, and the request carries on without speculation.

    ``hop_seconds``: of the time its start/extend calls took so far, the part spent outside
    the drafter's own work (the gRPC round trip, (de)serialisation, queueing); 0 in-process.
    ``in_process``: drafting runs on the engine's thread (else the engine waits for another
    process, on whose CPU time it draws nothing).
    """

    hop_seconds: float
    in_process: bool

    def start(self, token_ids: list[int], hidden: torch.Tensor) -> DraftTree: ...

    def extend(self, token_ids: list[int], hidden: torch.Tensor) -> DraftTree: ...

    def close(self) -> None: ...


class SpeculationDeclined(Exception):
    """The drafter works but would only slow decoding down (its head is untrained and
    nobody asked for that): requests decode plainly, and the drafter is not at fault."""


class DrafterFactory(Protocol):
    def capture_layer_ids(self) -> tuple[int, ...]:
        """The target layers the drafter reads; may raise if the drafter is unreachable,
        or SpeculationDeclined."""
        ...

    def open(self, request_id: str) -> Drafter: ...

    def forget(self) -> None:
        """Drop anything cached about the drafter (after a failure it may come back changed)."""
        ...


@dataclass
class SpeculativeStats:
    drafts: int = 0  # verification steps that checked a tree
    draft_tokens: int = 0  # tree nodes verified
    accepted_tokens: int = 0  # tree nodes accepted
    accepted_per_position: list[int] = field(default_factory=list)  # [d]: steps accepting >= d+1 nodes
    # Where a step's time goes (vLLM-style counters, seconds summed over the request):
    trees: int = 0  # trees the drafter proposed (one more than ``drafts`` when a request ends)
    draft_seconds: float = 0.0  # the drafter's own work on those trees
    hop_seconds: float = 0.0  # getting features to the drafter and its trees back (0 in-process)
    verify_seconds: float = 0.0  # the target's tree forward, acceptance and cache trim

    def record_tree(self, waited_s: float, hop_s: float) -> None:
        """The engine waited ``waited_s`` for a tree, ``hop_s`` of it outside the drafter."""
        self.trees += 1
        self.hop_seconds += hop_s
        self.draft_seconds += waited_s - hop_s

    def record(self, tree_size: int, accepted: int, seconds: float) -> None:
        """One verification step: ``accepted`` of ``tree_size`` nodes, in ``seconds``."""
        self.drafts += 1
        self.verify_seconds += seconds
        self.draft_tokens += tree_size
        self.accepted_tokens += accepted
        if len(self.accepted_per_position) < accepted:
            self.accepted_per_position.extend([0] * (accepted - len(self.accepted_per_position)))
        for depth in range(accepted):
            self.accepted_per_position[depth] += 1

    def merge(self, other: SpeculativeStats) -> None:
        """Add another request's statistics to these (the engine's running totals)."""
        self.drafts += other.drafts
        self.draft_tokens += other.draft_tokens
        self.accepted_tokens += other.accepted_tokens
        self.trees += other.trees
        self.draft_seconds += other.draft_seconds
        self.hop_seconds += other.hop_seconds
        self.verify_seconds += other.verify_seconds
        missing = len(other.accepted_per_position) - len(self.accepted_per_position)
        self.accepted_per_position.extend([0] * max(missing, 0))
        for depth, count in enumerate(other.accepted_per_position):
            self.accepted_per_position[depth] += count

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens produced per verification step, the bonus token included (vLLM's convention)."""
        return 1.0 + self.accepted_tokens / self.drafts if self.drafts else 0.0


class PaceGuard:
    """Whether speculation pays, measured, in three ways.

    Per request (``pays``): after ``probe_steps`` verification steps, its seconds per token
    over those steps (the drafting, the hop and the tree verification) are compared with the
    engine's own plain 1-token decoding step, and speculation that decodes slower is dropped
    for the rest of the request. A weak head, or a device where tree verification is dear (a
    CPU), then costs a request a few steps instead of all of them; where drafts pay, nothing
    changes.

    Per request, before it starts (``admits``): where the last ``judged_requests`` requests
    that speculated all decoded slower per token than the plain step (a CPU whose plain step
    is cheap beside a tree's, a head that drafts poorly for the traffic), a new request
    decodes plainly from the start instead of paying a probe of its own; one request in
    ``probe_every`` still speculates, and one whose speculation pays lets the next ones
    speculate again. A run of requests is asked, not one: where speculation pays on average,
    a prompt that drafts poorly must not turn the next ones away. The engine reports each
    request once (``observe_request``), when its probe has run, or when it ends if sooner.

    Per round (``prefers_plain``): beside other requests, plain steps are batched into one
    forward, whose cost per request falls with the batch (on a 2-core CPU, 8 requests cost
    2.2 to 2.4 plain steps), while each request's speculation costs what it costs alone. So
    under load the speculating requests may decode more by joining the batch for a round
    (vLLM turns speculation off above a batch size; this asks the measured costs).

    Times are exponential averages: the plain step's per batch size, seeded by a calibration
    at start (``observe_plain_step``), and a speculative step's seconds and tokens over all
    requests (``observe_speculation``)."""

    def __init__(
        self, probe_steps: int = 8, smoothing: float = 0.2, probe_every: int = 8, judged_requests: int = 3
    ):
        self.probe_steps = probe_steps
        self.smoothing = smoothing
        self.probe_every = probe_every
        self.plain_batch_s: dict[int, float] = {}  # a batched plain step's seconds, by requests
        self.speculative_step_s: float | None = None
        self.speculative_step_tokens: float | None = None
        # whether each of the last requests that speculated decoded faster than plain steps
        self._requests_paid: deque[bool] = deque(maxlen=judged_requests)
        self._turned_away = 0  # requests admits() declined since the last it admitted

    @property
    def plain_step_s(self) -> float | None:
        """One request's plain step, alone."""
        return self.plain_batch_s.get(1)

    def _average(self, old: float | None, new: float) -> float:
        return new if old is None else old + self.smoothing * (new - old)

    def observe_plain_step(self, seconds: float, requests: int = 1) -> None:
        self.plain_batch_s[requests] = self._average(self.plain_batch_s.get(requests), seconds)

    def observe_speculation(self, seconds: float, tokens: int) -> None:
        """One request's verification step (with its drafting) took ``seconds`` for ``tokens``."""
        self.speculative_step_s = self._average(self.speculative_step_s, seconds)
        self.speculative_step_tokens = self._average(self.speculative_step_tokens, tokens)

    def _as_fast_as_plain(self, seconds: float, tokens: int) -> bool | None:
        """Whether ``tokens`` in ``seconds`` keep up with plain steps; None where unknown."""
        if self.plain_step_s is None or tokens == 0:
            return None
        return seconds / tokens <= self.plain_step_s

    def observe_request(self, seconds: float, tokens: int) -> None:
        """A request's speculation took ``seconds`` for ``tokens``: over its probe, or up to
        its end if that came sooner."""
        paid = self._as_fast_as_plain(seconds, tokens)
        if paid is not None:
            self._requests_paid.append(paid)

    def speculation_slower(self) -> bool:
        """Whether each of the last ``judged_requests`` requests that speculated decoded
        slower per token than one plain step."""
        judged = self._requests_paid
        return len(judged) == judged.maxlen and not any(judged)

    def admits(self) -> bool:
        """Whether a new request should speculate: unless recent speculation measured slower
        than plain decoding, and then every ``probe_every``-th request (a probe)."""
        if not self.speculation_slower():
            self._turned_away = 0
            return True
        self._turned_away += 1
        if self._turned_away < self.probe_every:
            return False
        self._turned_away = 0
        return True

    def pays(self, steps: int, seconds: float, tokens: int) -> bool:
        """``steps`` verification steps took ``seconds`` and yielded ``tokens``."""
        return steps < self.probe_steps or self._as_fast_as_plain(seconds, tokens) is not False

    def prefers_plain(self, plain: int, speculating: int) -> bool:
        """Whether a round decodes more tokens a second with the ``speculating`` requests
        in the batched plain step of the ``plain`` others than with each speculating beside
        it. False until the costs it needs are measured."""
        together = self.plain_batch_s.get(plain + speculating)
        apart = self.plain_batch_s.get(plain, 0.0 if plain == 0 else None)
        if speculating == 0 or plain + speculating < 2 or self.speculative_step_s is None:
            return False
        if together is None or apart is None:
            return False
        speculating_rate = (plain + speculating * self.speculative_step_tokens) / (
            apart + speculating * self.speculative_step_s
        )
        return (plain + speculating) / together > speculating_rate


def decoder_layers(inner_model) -> torch.nn.ModuleList:
    """The decoder layers of a target's inner model (``model.base_model``): ``layers`` in
    Llama and most others, ``h`` in GPT-2 and Falcon."""
    for name in ("layers", "h", "blocks"):
        layers = getattr(inner_model, name, None)
        if isinstance(layers, torch.nn.ModuleList):
            return layers
    raise ValueError(f"{type(inner_model).__name__} has no decoder layer list (layers, h or blocks)")


class HiddenCapture:
    """Records the residual stream entering chosen decoder layers (EAGLE-3's capture
    points) during forwards run inside ``with capture.layers(ids):``; ``features()``
    returns them concatenated in the order given, as [tokens, len(ids) * H]. Every layer
    is hooked once, so each drafter session can name its own layers."""

    def __init__(self, model):
        self._inner = model.base_model
        layers = decoder_layers(self._inner)
        self.num_layers = len(layers)
        self._wanted: tuple[int, ...] = ()
        self._captured: dict[int, torch.Tensor] = {}
        self._hooks = [
            layer.register_forward_pre_hook(self._hook(i), with_kwargs=True) for i, layer in enumerate(layers)
        ]
        self._lean = None
        self._observe_lean_forward()

    def _observe_lean_forward(self) -> None:
        """The CPU's lean forward (lean_forward.py) runs the layers without calling them, so
        their hooks do not fire: observe it instead, once it is installed."""
        lean = getattr(self._inner, "_aerie_lean_forward", None)
        if lean is not None and self._lean is None:
            lean.observers.append(self._record)
            self._lean = lean

    def close(self) -> None:
        """Take the hooks off the model (an engine that stops leaves its model clean)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        if self._lean is not None and self._record in self._lean.observers:
            self._lean.observers.remove(self._record)

    def _hook(self, layer_id: int):
        def hook(module, args, kwargs):
            self._record(layer_id, args[0] if args else kwargs["hidden_states"])

        return hook

    def _record(self, layer_id: int, hidden: torch.Tensor) -> None:
        if layer_id in self._wanted:
            # [batch, tokens, H] as rows: one request's tokens, a ragged batch's, or one
            # token of each request in a padded batch
            self._captured[layer_id] = hidden.flatten(0, 1)

    @contextlib.contextmanager
    def layers(self, layer_ids: tuple[int, ...]):
        for i in layer_ids:
            if not 0 <= i < self.num_layers:
                raise ValueError(f"capture layer {i} is out of range for a {self.num_layers}-layer target")
        self._observe_lean_forward()
        self._captured.clear()
        self._wanted = tuple(layer_ids)
        try:
            yield self
        finally:
            self._wanted = ()

    def features(self, layer_ids: tuple[int, ...]) -> torch.Tensor:
        return torch.cat([self._captured[i] for i in layer_ids], dim=-1)


class CircuitBreaker:
    """After a drafter failure, refuse new draft sessions for ``cooldown_s``; then let
    them try again (gRPC channels reconnect by themselves)."""

    def __init__(self, cooldown_s: float):
        self.cooldown_s = cooldown_s
        self._open_until = 0.0
        self._lock = threading.Lock()
        self.failures = 0

    def allow(self) -> bool:
        return time.monotonic() >= self._open_until

    def record_failure(self) -> None:
        with self._lock:
            self.failures += 1
            self._open_until = time.monotonic() + self.cooldown_s
