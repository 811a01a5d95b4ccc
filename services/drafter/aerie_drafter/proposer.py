"""The EAGLE proposer: one draft session per request, kept apart from any server.

A session mirrors the verifier's sequence. It holds the tokens and the target's captured
hidden states; the pair (features at t, token t+1) is the head's input at position t,
and its KV cache covers every pair seen so far. ``propose`` grows a dynamic draft tree
from the last pair (EAGLE-2): expand the top-k children of the best frontier nodes for
``depth`` steps, rank every candidate by cumulative log-probability, keep the best
``total_tokens`` (with ``TreeShape.context_ngram``, the context's continuation of the
last tokens competes for those places as one more chain: context_ngram.py). The tree's
keys and values are scratch: after verification the verifier sends the accepted tokens
with their *real* target features, and only those enter the cache.

``grow_tree`` reads nothing back to the host until the tree is chosen, so on a GPU a
session that holds a DraftSlot replays its growth as one CUDA graph per tree shape. On a
CPU, a head that loading.head_for_drafting packed runs its steps and the growth in C++
instead (native_draft.py: the same trees, bit for bit).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from aerie_common.cuda_graphs import GraphCache
from aerie_common.draft_tree import MAX_TREE_NODES, DraftTree

from aerie_drafter import native_draft
from aerie_drafter.context_ngram import ContextNgrams
from aerie_drafter.eagle import EagleHead

MAX_DEPTH = 16
MAX_TOP_K = 32
MAX_TREE_TOKENS = MAX_TREE_NODES


@dataclass(frozen=True)
class TreeShape:
    depth: int
    top_k: int
    total_tokens: int
    # Also propose the context's continuation of the last tokens as a chain of up to
    # ``depth`` nodes (aerie_drafter.context_ngram), competing with the head's on score.
    context_ngram: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.depth <= MAX_DEPTH:
            raise ValueError(f"tree depth must be in [1, {MAX_DEPTH}], got {self.depth}")
        if not 1 <= self.top_k <= MAX_TOP_K:
            raise ValueError(f"tree top_k must be in [1, {MAX_TOP_K}], got {self.top_k}")
        if not 1 <= self.total_tokens <= MAX_TREE_TOKENS:
            raise ValueError(f"tree total_tokens must be in [1, {MAX_TREE_TOKENS}], got {self.total_tokens}")


# On CPU a target forward of up to 3 new tokens costs about one plain step, and more
# cost much more (SmolLM2-135M on 2 cores: 1.07 plain steps for 3, 1.36 for 5, 1.61 for
# 13; bench/verify_cost.py), so the tree is two nodes: it beat 1 to 16 nodes through
# the engine (docs/benchmarks.md). On a GPU a forward of up to ~128 tokens costs the same
# as one, so trees grow (the EAGLE reference uses 60 nodes, depth 7-8, top-k 10 on 8B
# targets).
CPU_TREE = TreeShape(depth=2, top_k=2, total_tokens=2)
# Where this CPU verifies 5 new tokens about as cheaply as 3, the verifier takes two more
# nodes (aerie_verifier.tree_cost): 3/2/4 beat 2/2/2 by 9% on such a machine.
CPU_WIDE_TREE = TreeShape(depth=3, top_k=2, total_tokens=4)
GPU_TREE = TreeShape(depth=7, top_k=10, total_tokens=60)


def default_tree(device: str) -> TreeShape:
    return GPU_TREE if str(device).startswith("cuda") else CPU_TREE


def tree_shape(
    device: str, depth: int = 0, top_k: int = 0, total_tokens: int = 0, context_ngram: bool = False
) -> TreeShape:
    """The device's default shape with any non-zero field overridden."""
    default = default_tree(device)
    return TreeShape(
        depth=depth or default.depth,
        top_k=top_k or default.top_k,
        total_tokens=total_tokens or default.total_tokens,
        context_ngram=context_ngram,
    )


def grow_tree(
    head: EagleHead,
    shape: TreeShape,
    prefix_k,
    prefix_v,
    prefix_visible,
    prefix_len,
    last_hidden,
    last_normed,
):
    """EAGLE-2's dynamic tree from a session's last pair: the candidate pool as tensors
    (draft token ids, cumulative log-probabilities, parents in the pool with -1 for the
    root, depths), in the order the candidates were made.

    prefix_k, prefix_v: [1, KV heads, W, D], the session's keys and values; prefix_visible:
    [W] bool, which of those W entries are filled (None: all of them); prefix_len: how many
    are, an int or a 0-d tensor. Nothing is read back to the host, so on a GPU the whole
    growth can be captured as one CUDA graph per tree shape (DraftSlot)."""
    device, dtype, k = last_hidden.device, head.fc.weight.dtype, shape.top_k
    width = prefix_k.shape[2]
    logp = torch.log_softmax(head.logits(last_normed).float(), -1)
    first = logp.topk(min(k, logp.shape[-1]))
    # The candidate pool: every node considered, with its parent in the pool (-1: root).
    pool_tokens = [first.indices]
    pool_scores = [first.values]
    pool_parents = [torch.full_like(first.indices, -1)]
    pool_depths = [torch.ones_like(first.indices)]
    pool_size = len(first.indices)
    frontier = torch.arange(pool_size, device=device)
    frontier_scores = first.values
    frontier_hidden = last_hidden.expand(len(frontier), -1)
    all_tokens = first.indices

    tree_k = prefix_k.new_zeros(*prefix_k.shape[:2], 0, prefix_k.shape[3])
    tree_v = tree_k.clone()
    # The scratch KV holds each draft step's frontier, row after row, and
    # slot_ancestors[i, j] says whether slot j is slot i or one of its ancestors. A
    # frontier node's parent is a row of the previous frontier, so which slots it sees
    # follows from its parent's slot alone.
    slot_ancestors = torch.zeros(0, 0, dtype=torch.bool, device=device)
    parent_slots = None  # each frontier node's parent's slot; none for the root's children

    for depth in range(1, shape.depth):
        f = len(frontier)
        slots = len(slot_ancestors)
        if parent_slots is None:
            ancestors = torch.zeros(f, slots, dtype=torch.bool, device=device)
        else:
            ancestors = slot_ancestors[parent_slots]
        prefix = (
            torch.ones(f, width, dtype=torch.bool, device=device)
            if prefix_visible is None
            else prefix_visible.expand(f, -1)
        )
        visible = torch.cat([prefix, ancestors, torch.eye(f, dtype=torch.bool, device=device)], dim=1)
        mask = torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill(~visible, float("-inf"))
        token_ids = head.to_target_ids(all_tokens[frontier])[None]
        positions = torch.zeros((1, f), dtype=torch.long, device=device) + (prefix_len + depth - 1)
        next_hidden, normed, (k_new, v_new) = head(
            frontier_hidden[None].to(dtype),
            token_ids,
            positions,
            mask[None, None],
            (torch.cat([prefix_k, tree_k], 2), torch.cat([prefix_v, tree_v], 2)),
        )
        tree_k, tree_v = torch.cat([tree_k, k_new], 2), torch.cat([tree_v, v_new], 2)
        slot_ancestors = torch.cat(
            [
                torch.cat([slot_ancestors, torch.zeros(slots, f, dtype=torch.bool, device=device)], 1),
                visible[:, width:],
            ]
        )

        logp = torch.log_softmax(head.logits(normed[0]).float(), -1)
        top = (frontier_scores[:, None] + logp).topk(min(k, logp.shape[-1]), dim=-1)
        children = torch.arange(pool_size, pool_size + top.indices.numel(), device=device)
        pool_tokens.append(top.indices.flatten())
        pool_scores.append(top.values.flatten())
        pool_parents.append(frontier.repeat_interleave(top.indices.shape[1]))
        pool_depths.append(torch.full_like(top.indices.flatten(), depth + 1))
        pool_size += top.indices.numel()
        all_tokens = torch.cat(pool_tokens)

        best = top.values.flatten().topk(min(k, top.values.numel()))
        frontier = children[best.indices]
        frontier_scores = best.values
        parent_rows = best.indices // top.indices.shape[1]
        frontier_hidden = next_hidden[0][parent_rows]
        parent_slots = slots + parent_rows

    return all_tokens, torch.cat(pool_scores), torch.cat(pool_parents), torch.cat(pool_depths)


class DraftSlot:
    """A session's head KV cache at a fixed address, and its tree growth captured as one
    CUDA graph per tree shape, replayed for every tree (uncaptured off a GPU: the tests).
    Sessions take slots from DraftSlots and give them back, so a graph outlives the
    request it was captured for. The KV buffer is read whole, under a mask that hides
    what this session has not filled (stale entries are finite, and masked)."""

    def __init__(self, head: EagleHead, capacity: int, cuda_graphs: bool, pool=None):
        config = head.config
        weight = head.fc.weight
        self.capacity = capacity
        kv_shape = (1, config.num_key_value_heads, capacity, config.head_dim)
        self.keys = torch.zeros(kv_shape, dtype=weight.dtype, device=weight.device)
        self.values = torch.zeros_like(self.keys)
        # The static inputs of the graphs.
        self._length = torch.zeros((), dtype=torch.long, device=weight.device)
        self._entries = torch.arange(capacity, device=weight.device)
        self._last_hidden = torch.zeros(config.hidden_size, dtype=weight.dtype, device=weight.device)
        self._last_normed = torch.zeros_like(self._last_hidden)
        # One graph per (depth, top-k), which is all the growth depends on. A client may
        # ask for any shape: past a few, the rest grow eagerly.
        self.graphs = GraphCache(cuda_graphs and weight.device.type == "cuda", pool, max_graphs=4)

    def grow(self, head: EagleHead, shape: TreeShape, length: int, last_hidden, last_normed):
        """``grow_tree`` over the first ``length`` entries; the outputs stay valid until
        the next replay of a graph in the slot's pool (the drafter's slots share one)."""
        self._length.fill_(length)
        self._last_hidden.copy_(last_hidden)
        self._last_normed.copy_(last_normed)

        def run():
            visible = self._entries < self._length
            return grow_tree(
                head,
                shape,
                self.keys,
                self.values,
                visible,
                self._length,
                self._last_hidden,
                self._last_normed,
            )

        captured = self.graphs.get((shape.depth, shape.top_k), lambda: run)
        if captured is None:
            return run()
        graph, outputs = captured
        graph.replay()
        return outputs


class DraftSlots:
    """The slots a drafter's sessions share, made as they are first needed (at most one
    per concurrent session) and reused last in, first out, so that the graphs already
    captured serve again."""

    def __init__(self, head: EagleHead, capacity: int, cuda_graphs: bool = True):
        self.head, self.capacity, self.cuda_graphs = head, capacity, cuda_graphs
        # One graph pool for them all: a drafter runs one session's work at a time.
        on_gpu = cuda_graphs and head.fc.weight.device.type == "cuda"
        self._pool = torch.cuda.graph_pool_handle() if on_gpu else None
        self._free: list[DraftSlot] = []
        self._lock = threading.Lock()
        self.made = 0

    def take(self) -> DraftSlot:
        with self._lock:
            if self._free:
                return self._free.pop()
            self.made += 1
        return DraftSlot(self.head, self.capacity, self.cuda_graphs, self._pool)

    def give_back(self, slot: DraftSlot) -> None:
        with self._lock:
            self._free.append(slot)

    @property
    def graphs_failed(self) -> bool:
        """Whether a capture failed on one of the slots not in use now (it then grows its
        trees eagerly)."""
        with self._lock:
            return any(slot.graphs.failed for slot in self._free)


def draft_slots(head: EagleHead, cuda_graphs: bool, tokens: int) -> DraftSlots | None:
    """The slots a head's sessions draw from where their tree growth replays CUDA graphs
    (``cuda_graphs``, AERIE_CUDA_GRAPHS, and the head on a GPU); None elsewhere, where a
    session's own cache, exactly as long as it needs, is faster."""
    if cuda_graphs and head.fc.weight.device.type == "cuda":
        return DraftSlots(head, tokens)
    return None


@dataclass
class ContextBranchCounts:
    """Tree nodes only the context branch proposed, and how many of them the verifier
    accepted (read from the next extend): the branch's contribution, for the metrics. The
    sessions of one drafter add to one of these."""

    drafted: int = 0
    accepted: int = 0


class DraftSession:
    def __init__(
        self,
        head: EagleHead,
        slots: DraftSlots | None = None,
        context_counts: ContextBranchCounts | None = None,
    ):
        self.head = head
        self._native = native_draft.attached(head)  # the head's steps in C++, where it has them
        self.device = head.fc.weight.device
        self.dtype = head.fc.weight.dtype
        self._context = ContextNgrams()  # holds the session's tokens
        self.context_counts = context_counts if context_counts is not None else ContextBranchCounts()
        self._last_tree: DraftTree | None = None
        self._last_context_nodes: set[int] = set()
        self._pending: list[torch.Tensor] = []  # feature rows not yet run through the head
        self._slots = slots
        self._slot: DraftSlot | None = None
        # The head's keys and values, [1, KV heads, room, D]: the first ``_processed``
        # entries are filled. A slot's buffers, or this session's own, grown by doubling.
        self._keys: torch.Tensor | None = None
        self._values: torch.Tensor | None = None
        self._processed = 0  # pairs in the KV cache
        self._last_hidden: torch.Tensor | None = None  # [H] fed to the first tree step
        self._last_normed: torch.Tensor | None = None  # [H] gives the root's children

    @property
    def tokens(self) -> list[int]:
        """The prompt and every token decided since."""
        return self._context.tokens

    def start(self, token_ids: list[int], hidden: torch.Tensor) -> None:
        """The prompt plus the first generated token, and one feature row per prompt token."""
        if self.tokens:
            raise ValueError("session already started")
        if len(token_ids) != len(hidden) + 1:
            raise ValueError(
                f"start needs one more token than feature rows: {len(token_ids)} vs {len(hidden)}"
            )
        self._context.extend(token_ids)
        self._pending.append(hidden)
        if self._slots is not None and len(hidden) < self._slots.capacity:
            self._slot = self._slots.take()
            self._keys, self._values = self._slot.keys, self._slot.values

    def extend(self, token_ids: list[int], hidden: torch.Tensor) -> None:
        """Accepted tokens (bonus last) and the features of the positions just verified."""
        if not self.tokens:
            raise ValueError("session not started")
        if len(token_ids) != len(hidden) or not token_ids:
            raise ValueError(
                f"extend needs as many feature rows as tokens: {len(token_ids)} vs {len(hidden)}"
            )
        self._context.extend(token_ids)
        self._pending.append(hidden)
        if self._last_context_nodes:
            self.context_counts.accepted += sum(
                node in self._last_context_nodes for node in self._last_tree.path(token_ids[:-1])
            )

    def close(self) -> None:
        """Give the slot back (the session is done)."""
        if self._slot is not None:
            self._slots.give_back(self._slot)
            self._slot = self._keys = self._values = None

    @torch.inference_mode()
    def _catch_up(self) -> None:
        if not self._pending:
            return
        features = torch.cat(self._pending).to(self.device, self.dtype)
        self._pending.clear()
        start, count = self._processed, len(features)
        tokens = torch.tensor([self.tokens[start + 1 : start + 1 + count]], device=self.device)
        positions = torch.arange(start, start + count, device=self.device)[None]
        self._make_room(start + count)
        if self._native is not None and native_draft.handles(count):
            # writes the step's keys and values into the buffers itself
            hidden = self._native.fuse(features)[None]
            next_hidden, normed = self._native.step(
                hidden, tokens, positions, None, self._keys, self._values, start
            )
        else:
            past = (self._keys[..., :start, :], self._values[..., :start, :]) if start else None
            hidden = self.head.fuse(features)[None]
            next_hidden, normed, (k, v) = self.head(hidden, tokens, positions, past_kv=past)
            self._keys[..., start : start + count, :] = k
            self._values[..., start : start + count, :] = v
        self._processed += count
        self._last_hidden, self._last_normed = next_hidden[0, -1], normed[0, -1]

    def _make_room(self, entries: int) -> None:
        """Room for ``entries`` keys and values: past its slot's capacity a session carries
        on with buffers of its own (copied out of the slot, which it gives back)."""
        room = 0 if self._keys is None else self._keys.shape[2]
        if entries <= room:
            return
        room = max(entries, 2 * room, 256)
        keys = torch.empty(
            1,
            self.head.config.num_key_value_heads,
            room,
            self.head.config.head_dim,
            dtype=self.dtype,
            device=self.device,
        )
        values = torch.empty_like(keys)
        if self._processed:
            keys[..., : self._processed, :] = self._keys[..., : self._processed, :]
            values[..., : self._processed, :] = self._values[..., : self._processed, :]
        self.close()
        self._keys, self._values = keys, values

    @torch.inference_mode()
    def propose(self, shape: TreeShape) -> DraftTree:
        self._catch_up()
        n = self._processed
        if self._slot is not None:
            pool = self._slot.grow(self.head, shape, n, self._last_hidden, self._last_normed)
        elif self._native is not None and native_draft.handles(shape.top_k):
            self._make_room(n + (shape.depth - 1) * shape.top_k)  # the tree's scratch entries
            pool = self._native.grow(
                shape.depth, shape.top_k, self._keys, self._values, n, self._last_hidden, self._last_normed
            )
        else:
            pool = grow_tree(
                self.head,
                shape,
                self._keys[..., :n, :],
                self._values[..., :n, :],
                None,
                n,
                self._last_hidden,
                self._last_normed,
            )
        chain, scores = [], []
        if shape.context_ngram:
            chain, match_length = self._context.continuation(shape.depth)
            scores = self._context.chain_scores(match_length, len(chain)) if chain else []
        tree, self._last_context_nodes = self._select(shape.total_tokens, *pool, chain=(chain, scores))
        self._last_tree = tree
        self.context_counts.drafted += len(self._last_context_nodes)
        return tree

    def _select(self, total, tokens, scores, parents, depths, chain=([], [])) -> tuple[DraftTree, set[int]]:
        """Keep the ``total`` best-scoring nodes. A child never outscores its parent
        (log-probabilities are <= 0), and ties go to the shallower node, so the kept set
        always contains every kept node's ancestors. Also returns the kept nodes that only
        the chain proposed."""
        # Python lists: reading the pool element by element from a GPU tensor costs a
        # synchronisation per read, hundreds per tree.
        target_ids = self.head.to_target_ids(tokens).tolist()
        scores, depths, parents = scores.tolist(), depths.tolist(), parents.tolist()
        head_nodes = len(target_ids)
        if chain[0]:
            _add_chain(target_ids, scores, parents, depths, *chain)
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], depths[i], i))[:total]
        order.sort(key=lambda i: (depths[i], i))  # parents before children
        new_index = {old: new for new, old in enumerate(order)}
        tree = DraftTree(
            token_ids=[target_ids[i] for i in order],
            parents=[new_index[parents[i]] if parents[i] >= 0 else -1 for i in order],
            scores=[scores[i] for i in order],
        )
        return tree, {new for new, old in enumerate(order) if old >= head_nodes}


def _add_chain(target_ids, scores, parents, depths, chain: list[int], chain_scores: list[float]) -> None:
    """Merge a context chain into the candidate pool (lists, in place): a chain token the
    head already proposed at that place keeps the better of the two scores, the rest
    become new nodes. Both scores fall along a path, so a child still never outscores
    its parent."""
    node_of = {(parent, token): i for i, (parent, token) in enumerate(zip(parents, target_ids, strict=True))}
    parent = -1
    for token, score in zip(chain, chain_scores, strict=True):
        node = node_of.get((parent, token))
        if node is None:
            node = len(target_ids)
            target_ids.append(token)
            scores.append(score)
            parents.append(parent)
            depths.append(1 if parent < 0 else depths[parent] + 1)
        else:
            scores[node] = max(scores[node], score)
        parent = node
