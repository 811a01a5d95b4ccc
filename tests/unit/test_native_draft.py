"""The head's drafting in C++ (aerie_drafter.native_draft) against the Python it replaces:
the same head steps and the same trees, bit for bit, on tiny random heads."""

from __future__ import annotations

import pytest
import torch
from aerie_common.packed_weights import pack_linear_layers, packing_pays, round_to_q8_0
from aerie_drafter import native_draft
from aerie_drafter.eagle import EagleConfig, EagleHead
from aerie_drafter.proposer import DraftSession, TreeShape, grow_tree

from tests.conftest import build_tiny_llama

VOCAB = 259
DRAFT_VOCAB = 100

pytestmark = pytest.mark.skipif(not packing_pays(), reason="the packed kernel is not vectorised on this CPU")


@pytest.fixture(scope="module")
def target():
    return build_tiny_llama(VOCAB, seed=3, layers=8)


def packed_head(target, version="3.1", seed=0, **overrides) -> EagleHead:
    """A random head packed as head_for_drafting packs it on a CPU (Q8_0 copies, fp32)."""
    torch.manual_seed(seed)
    config = EagleConfig.for_target(
        target.config, draft_vocab_size=DRAFT_VOCAB, eagle_version=version, **overrides
    )
    head = EagleHead(config, target.model.embed_tokens).eval()
    head.set_vocab_map(torch.randperm(VOCAB)[:DRAFT_VOCAB].sort().values)
    with torch.no_grad():
        for name, param in head.named_parameters():
            if "norm" in name:  # a norm that is skipped or misplaced shows
                param.uniform_(0.5, 1.5)
    assert pack_linear_layers(head, only_if_all_pack=True, pack=round_to_q8_0) == {"q8_0": 9}
    return head


HEADS = [
    pytest.param("3.1", {}, id="3.1"),
    pytest.param("3.0", {}, id="3.0"),
    pytest.param("3.1", {"norm_before_residual": True}, id="3.1-norm-before-residual"),
    pytest.param("3.1", {"num_key_value_heads": 4}, id="3.1-no-grouped-heads"),
]


def keys_and_values(head, entries, seed):
    gen = torch.Generator().manual_seed(seed)
    shape = (1, head.config.num_key_value_heads, entries, head.config.head_dim)
    return torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)


def buffers_holding(keys, values, room):
    """KV buffers with ``room`` more entries after ``keys`` and ``values``, filled with
    garbage (what a session's buffers hold past their filled entries)."""
    more = (*keys.shape[:2], room, keys.shape[3])
    return torch.cat([keys, torch.full(more, 1e4)], 2), torch.cat([values, torch.full(more, -1e4)], 2)


@pytest.mark.parametrize(("version", "overrides"), HEADS)
@pytest.mark.parametrize(("rows", "past"), [(1, 0), (1, 7), (3, 0), (4, 9)])
def test_a_native_head_step_is_the_python_one_bit_for_bit(target, version, overrides, rows, past):
    head = packed_head(target, version, seed=1, **overrides)
    native = native_draft.native_draft_head(head)
    assert native is not None
    gen = torch.Generator().manual_seed(rows + past)
    features = torch.randn(rows, 3 * head.config.target_hidden_size, generator=gen)
    tokens = torch.randint(0, VOCAB, (1, rows), generator=gen)
    positions = torch.arange(past, past + rows)[None]
    cache = keys_and_values(head, past, seed=past)
    key_buffer, value_buffer = buffers_holding(*cache, room=rows + 2)
    with torch.inference_mode():
        fused = head.fuse(features)
        assert torch.equal(native.fuse(features), fused)
        want_hidden, want_normed, (want_k, want_v) = head(
            fused[None], tokens, positions, past_kv=cache if past else None
        )
        got_hidden, got_normed = native.step(
            fused[None], tokens, positions, None, key_buffer, value_buffer, past
        )
    assert torch.equal(got_hidden, want_hidden) and torch.equal(got_normed, want_normed)
    # the step's keys and values written after the past's, which stay as they were
    assert torch.equal(key_buffer[..., past : past + rows, :], want_k)
    assert torch.equal(value_buffer[..., past : past + rows, :], want_v)
    assert torch.equal(key_buffer[..., :past, :], cache[0]) and torch.equal(
        value_buffer[..., :past, :], cache[1]
    )


@pytest.mark.parametrize(("version", "overrides"), HEADS)
@pytest.mark.parametrize(
    "shape",
    [TreeShape(1, 3, 3), TreeShape(3, 2, 4), TreeShape(4, 3, 10), TreeShape(5, 1, 5)],
    ids=["depth-1", "cpu-wide", "deep-wide", "chain"],
)
def test_native_tree_growth_is_grow_tree_bit_for_bit(target, version, overrides, shape):
    head = packed_head(target, version, seed=2, **overrides)
    native = native_draft.native_draft_head(head)
    entries = 11
    keys, values = keys_and_values(head, entries, seed=4)
    gen = torch.Generator().manual_seed(5)
    last_hidden, last_normed = torch.randn(2, head.config.hidden_size, generator=gen)
    key_buffer, value_buffer = buffers_holding(keys, values, room=(shape.depth - 1) * shape.top_k)
    with torch.inference_mode():
        want = grow_tree(head, shape, keys, values, None, entries, last_hidden, last_normed)
        got = native.grow(
            shape.depth, shape.top_k, key_buffer, value_buffer, entries, last_hidden, last_normed
        )
    assert torch.equal(key_buffer[..., :entries, :], keys)  # the tree's entries went after them
    names = ("tokens", "scores", "parents", "depths")
    for name, got_tensor, want_tensor in zip(names, got, want, strict=True):
        assert got_tensor.dtype == want_tensor.dtype, name
        assert torch.equal(got_tensor, want_tensor), name


def test_sessions_on_the_native_head_propose_the_python_sessions_trees(target):
    """Through DraftSession: a long start (more rows than the packed kernel takes, so the
    Python catches up on it), then extends of 1 to 3 tokens, which the C++ takes."""
    head = packed_head(target, "3.1", seed=3)
    shape = TreeShape(depth=3, top_k=2, total_tokens=4, context_ngram=True)
    gen = torch.Generator().manual_seed(6)
    width = 3 * head.config.target_hidden_size
    token_ids = torch.randint(0, VOCAB, (21,), generator=gen).tolist()
    hidden = torch.randn(20, width, generator=gen)
    steps = [torch.randint(1, 4, (1,), generator=gen).item() for _ in range(8)]
    extends = [
        (torch.randint(0, VOCAB, (n,), generator=gen).tolist(), torch.randn(n, width, generator=gen))
        for n in steps
    ]

    def trees():
        session = DraftSession(head)
        session.start(token_ids, hidden)
        drafted = [session.propose(shape)]
        for tokens, features in extends:
            session.extend(tokens, features)
            drafted.append(session.propose(shape))
        return session, drafted

    python_session, python_trees = trees()
    assert python_session._native is None
    assert native_draft.attach(head)
    native_session, native_trees = trees()
    assert native_session._native is not None
    assert native_trees == python_trees
    native_draft.detach(head)  # the benchmarks' Python row
    assert DraftSession(head)._native is None
    assert torch.equal(
        native_session._keys[..., : native_session._processed, :],
        python_session._keys[..., : python_session._processed, :],
    )


def test_only_heads_packed_for_the_cpu_get_the_native_head(target):
    config = EagleConfig.for_target(target.config, draft_vocab_size=DRAFT_VOCAB)
    unpacked = EagleHead(config, target.model.embed_tokens).eval()
    assert native_draft.native_draft_head(unpacked) is None
    assert not native_draft.attach(unpacked) and native_draft.attached(unpacked) is None
    scaled = packed_head(target, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    assert native_draft.native_draft_head(scaled) is None
