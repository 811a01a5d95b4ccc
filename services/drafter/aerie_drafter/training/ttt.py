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


def unrolled_logits(
    head: EagleHead, target_hidden: torch.Tensor, input_ids: torch.Tensor, steps: int
) -> list[torch.Tensor]:
    """Draft-vocabulary logits of every step: list of ``steps`` tensors [B, T, Vd].

    target_hidden: [B, T, 3*Ht] captured features of each position; input_ids: [B, T].
    Row t of step k predicts x[t+k+2]. Rows whose inputs run past the sequence end are
    computed on padding and must be masked out of any loss (``step_targets`` does).
    """
    b, t = input_ids.shape
    positions = torch.arange(t, device=input_ids.device).expand(b, t)
    hidden = head.fuse(target_hidden)
    cache: list[tuple[torch.Tensor, torch.Tensor]] = []
    logits = []
    for k in range(steps):
        tokens = _shift_left(input_ids, k + 1)
        hidden, normed = _ttt_step(head, hidden, tokens, positions + k, cache)
        logits.append(head.logits(normed))
    return logits


@dataclass
class StepTargets:
    """Per-position labels computed once per batch; step k reads them shifted by k."""

    probs: torch.Tensor  # [B, T, Vd]: the target's distribution at each position, over the draft vocab
    valid: torch.Tensor  # [B, T] bool: position p is trained on (its next token is a response token
    #                      and the target's top choice is in the draft vocab)
    argmax: torch.Tensor  # [B, T]: the target's top choice as a draft id (-1 if outside)


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
    rows = target_lm_head[draft_to_target]  # [Vd, Ht]
    logits = target_last_hidden.to(rows.dtype) @ rows.T
    probs = logits.float().softmax(-1)
    draft_of_target = torch.full((target_lm_head.shape[0],), -1, dtype=torch.long, device=rows.device)
    draft_of_target[draft_to_target] = torch.arange(len(draft_to_target), device=rows.device)
    known = target_argmax >= 0  # feature extraction skips positions training never reads
    argmax = torch.where(known, draft_of_target[target_argmax.long().clamp(min=0)], -1)
    positions = torch.arange(t, device=lengths.device)
    # The distribution at p predicts x[p+1]: train only where that is a response token.
    next_is_response = _shift_left(loss_mask.bool(), 1, fill=False)
    valid = next_is_response & (argmax >= 0) & (positions[None] + 1 < lengths[:, None])
    return StepTargets(probs=probs, valid=valid, argmax=argmax)


@dataclass
class TTTLoss:
    loss: torch.Tensor  # the weighted sum over steps, to backpropagate
    step_loss: list[float]  # per step, unweighted
    step_accuracy: list[float]  # per step: draft argmax == target argmax
    step_count: list[int]  # positions trained on at each step


def ttt_loss(step_logits: list[torch.Tensor], targets: StepTargets, decay: float = STEP_DECAY) -> TTTLoss:
    """Soft cross-entropy of each step against the target distribution, where row t of
    step k is scored on position t+k+1 (the target's prediction of x[t+k+2])."""
    total = step_logits[0].new_zeros((), dtype=torch.float32)
    losses, accuracies, counts = [], [], []
    for k, logits in enumerate(step_logits):
        probs = _shift_left(targets.probs, k + 1)
        valid = _shift_left(targets.valid, k + 1, fill=False)
        argmax = _shift_left(targets.argmax, k + 1, fill=-1)
        logp = logits.float().log_softmax(-1)
        per_row = -(probs * logp).sum(-1)
        n = valid.sum()
        loss = (per_row * valid).sum() / n.clamp(min=1)
        total = total + decay**k * loss
        losses.append(float(loss.detach()))
        hits = (logits.argmax(-1) == argmax) & valid
        accuracies.append(float(hits.sum()) / max(int(n), 1))
        counts.append(int(n))
    return TTTLoss(total, losses, accuracies, counts)
