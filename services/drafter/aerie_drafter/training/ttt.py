"""Training-time test (TTT): the EAGLE head unrolled for K draft steps over a whole sequence.

At inference (proposer.py) the chain anchored at prefix position t runs:

    step 0, position t:    hidden = fuse(target features at t), token x[t+1]
                           keys: the real pairs 0..t              -> out0, predicts x[t+2]
    step k, position t+k:  hidden = out(k-1) (normed for 3.1), token x[t+k+1]
                           keys: the real pairs 0..t, then its own steps 1..k
                           -> out(k), predicts x[t+k+2]

Training runs every anchor t of a sequence at once, one call per step. Row t of step k is
the chain anchored at t, so the step-k query of row t attends to step-0 keys 0..t (causal)
and to the keys of row t at steps 1..k only (the diagonal entries; EAGLE-3's TTT mask).
Tokens are teacher-forced: row t of step k reads the true x[t+k+1]; hidden states are the
head's own outputs. ``test_drafter_training`` checks this gives the logits of the
sequential inference loop exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from aerie_drafter.eagle import EagleHead

# EAGLE-3 weights the loss of step k by 0.8**k: later steps matter less, as they are only
# reached when every earlier draft was accepted.
STEP_DECAY = 0.8


def _shift_left(x: torch.Tensor, by: int, fill=0) -> torch.Tensor:
    """x[:, t] <- x[:, t + by] along dim 1, padding the end with ``fill``."""
    if by == 0:
        return x
    pad = torch.full_like(x[:, :by], fill)
    return torch.cat([x[:, by:], pad], dim=1)


def _ttt_attention(attn, x, cos, sin, cache: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """EagleAttention over the unrolled steps. ``cache`` holds the (k, v) of earlier steps;
    this step's are appended."""
    b, t, _ = x.shape
    q = attn.q_proj(x).view(b, t, attn.num_heads, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(b, t, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(x).view(b, t, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    cache.append((k, v))
    gqa = attn.num_kv_heads != attn.num_heads
    if len(cache) == 1:  # step 0: plain causal attention over the real pairs
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        return attn.o_proj(out.transpose(1, 2).reshape(b, t, -1))

    group = attn.num_heads // attn.num_kv_heads

    def expand(kv: torch.Tensor) -> torch.Tensor:  # [B, KVH, T, D] -> [B, H, T, D]
        return kv.repeat_interleave(group, dim=1) if gqa else kv

    scale = 1.0 / math.sqrt(attn.head_dim)
    k0, v0 = expand(cache[0][0]), expand(cache[0][1])
    causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
    prefix_scores = (q @ k0.transpose(-1, -2) * scale).masked_fill(~causal, float("-inf"))
    # Row t against its own keys at steps 1..k: one score each.
    diag_keys = torch.stack([expand(kj) for kj, _ in cache[1:]], dim=-2)  # [B, H, T, k, D]
    diag_values = torch.stack([expand(vj) for _, vj in cache[1:]], dim=-2)
    diag_scores = (q.unsqueeze(-2) * diag_keys).sum(-1) * scale  # [B, H, T, k]
    probs = torch.cat([prefix_scores, diag_scores], dim=-1).float().softmax(-1).to(q.dtype)
    out = probs[..., :t] @ v0 + (probs[..., t:].unsqueeze(-1) * diag_values).sum(-2)
    return attn.o_proj(out.transpose(1, 2).reshape(b, t, -1))


def _ttt_step(head: EagleHead, hidden, token_ids, position_ids, cache):
    """EagleHead.forward with the TTT attention; returns (next_hidden, normed)."""
    layer = head.midlayer
    embeds = head.embed_tokens(token_ids).to(hidden.dtype)
    cos, sin = head.rotary_emb(hidden, position_ids)
    if layer.norm_before_residual:
        hidden = layer.hidden_norm(hidden)
        residual = hidden
    else:
        residual = hidden
        hidden = layer.hidden_norm(hidden)
    x = torch.cat([layer.input_layernorm(embeds), hidden], dim=-1)
    out = residual + _ttt_attention(layer.self_attn, x, cos, sin, cache)
    out = out + layer.mlp(layer.post_attention_layernorm(out))
    normed = head.norm(out)
    return (normed if head.config.norm_output else out), normed


def unrolled_states(
    head: EagleHead, target_hidden: torch.Tensor, input_ids: torch.Tensor, steps: int
) -> list[torch.Tensor]:
    """The head's normed output of every step: list of ``steps`` tensors [B, T, H], the
    input of ``head.logits``.

    target_hidden: [B, T, 3*Ht] captured features of each position; input_ids: [B, T].
    Row t of step k predicts x[t+k+2]. Rows whose inputs run past the sequence end are
    computed on padding and must be left out of any loss (``ttt_loss`` does).
    """
    b, t = input_ids.shape
    positions = torch.arange(t, device=input_ids.device).expand(b, t)
    hidden = head.fuse(target_hidden)
    cache: list[tuple[torch.Tensor, torch.Tensor]] = []
    states = []
    for k in range(steps):
        tokens = _shift_left(input_ids, k + 1)
        hidden, normed = _ttt_step(head, hidden, tokens, positions + k, cache)
        states.append(normed)
    return states


def unrolled_logits(
    head: EagleHead, target_hidden: torch.Tensor, input_ids: torch.Tensor, steps: int
) -> list[torch.Tensor]:
    """Draft-vocabulary logits of every step at every row: list of [B, T, Vd]."""
    return [head.logits(normed) for normed in unrolled_states(head, target_hidden, input_ids, steps)]


@dataclass
class StepTargets:
    """Per-position labels computed once per batch; step k reads them shifted by k.

    Only the trained positions get a distribution: the draft-vocabulary matmuls (the
    target's here, the head's in ``ttt_loss``) are most of a step's cost, and a third or
    more of the positions are prompts and padding.
    """

    valid: torch.Tensor  # [B, T] bool: position p is trained on (its next token is a response
    #                      token, and the target's top choice is in the draft vocab)
    probs: torch.Tensor  # [N, Vd]: the target's distribution at the valid positions, in order
    row_of: torch.Tensor  # [B, T] long: the row of ``probs`` for a valid position, -1 elsewhere
    argmax: torch.Tensor  # [B, T]: the target's top choice as a draft id (-1 if outside)

    @classmethod
    def from_dense(cls, probs: torch.Tensor, valid: torch.Tensor, argmax: torch.Tensor) -> StepTargets:
        """From a distribution at every position, [B, T, Vd]."""
        return cls(valid, probs[valid], _rows(valid), argmax)


def _rows(valid: torch.Tensor) -> torch.Tensor:
    return torch.where(valid, valid.flatten().cumsum(0).view_as(valid) - 1, -1)


def step_targets(
    target_last_hidden: torch.Tensor,
    target_lm_head: torch.Tensor,
    target_argmax: torch.Tensor,
    loss_mask: torch.Tensor,
    lengths: torch.Tensor,
    draft_to_target: torch.Tensor,
) -> StepTargets:
    """Labels from the target's final (normed) hidden states [B, T, Ht].

    The target's next-token distribution at p is softmax(lm_head(last_hidden[p])); EAGLE-3
    trains on it restricted to (and renormalised over) the draft vocabulary, which only
    needs the lm_head rows of the draft tokens. ``target_argmax`` [B, T] is the target's
    top choice over its full vocabulary (kept from feature extraction, as recomputing it
    costs a full-vocabulary matmul); ``draft_to_target`` [Vd] the draft vocabulary.
    """
    t = target_argmax.shape[1]
    draft_of_target = torch.full((target_lm_head.shape[0],), -1, dtype=torch.long, device=lengths.device)
    draft_of_target[draft_to_target] = torch.arange(len(draft_to_target), device=lengths.device)
    known = target_argmax >= 0  # feature extraction skips positions training never reads
    argmax = torch.where(known, draft_of_target[target_argmax.long().clamp(min=0)], -1)
    positions = torch.arange(t, device=lengths.device)
    # The distribution at p predicts x[p+1]: train only where that is a response token.
    next_is_response = _shift_left(loss_mask.bool(), 1, fill=False)
    valid = next_is_response & (argmax >= 0) & (positions[None] + 1 < lengths[:, None])
    rows = target_lm_head[draft_to_target]  # [Vd, Ht]
    probs = (target_last_hidden[valid].to(rows.dtype) @ rows.T).float().softmax(-1)
    return StepTargets(valid=valid, probs=probs, row_of=_rows(valid), argmax=argmax)


@dataclass
class TTTLoss:
    loss: torch.Tensor  # the weighted sum over steps, to backpropagate
    step_loss: list[float]  # per step, unweighted
    step_accuracy: list[float]  # per step: draft argmax == target argmax
    step_count: list[int]  # positions trained on at each step


def ttt_loss(
    head: EagleHead, step_states: list[torch.Tensor], targets: StepTargets, decay: float = STEP_DECAY
) -> TTTLoss:
    """Soft cross-entropy of each step against the target distribution, where row t of
    step k is scored on position t+k+1 (the target's prediction of x[t+k+2]). Logits are
    computed at the scored rows only."""
    # Zero, but in the graph: a batch with nothing to score still backpropagates (no-op).
    total = step_states[0].float().sum() * 0.0
    losses, accuracies, counts = [], [], []
    for k, normed in enumerate(step_states):
        valid = _shift_left(targets.valid, k + 1, fill=False)
        n = int(valid.sum())
        counts.append(n)
        if n == 0:
            losses.append(0.0)
            accuracies.append(0.0)
            continue
        logits = head.logits(normed[valid])  # [n, Vd]
        probs = targets.probs[_shift_left(targets.row_of, k + 1, fill=-1)[valid]]
        loss = -(probs * logits.float().log_softmax(-1)).sum(-1).mean()
        total = total + decay**k * loss
        losses.append(loss.item())
        argmax = _shift_left(targets.argmax, k + 1, fill=-1)[valid]
        accuracies.append((logits.argmax(-1) == argmax).float().mean().item())
    return TTTLoss(total, losses, accuracies, counts)
