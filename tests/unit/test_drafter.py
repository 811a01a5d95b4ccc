"""The EAGLE head (3.0 against 3.1), checkpoint layouts, the tree proposer and the
draft-tree contract, all without servers."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from aerie_common.draft_tree import DraftTree, MalformedTreeError
from aerie_drafter import loading
from aerie_drafter.checkpoint import load_head, save_head
from aerie_drafter.eagle import EagleConfig, EagleHead, default_capture_layers
from aerie_drafter.loading import pick_head_dtype, shipped_head
from aerie_drafter.proposer import DraftSession, DraftSlots, TreeShape, grow_tree, tree_shape
from safetensors.torch import save_file

from tests.conftest import build_tiny_llama

VOCAB = 259
DRAFT_VOCAB = 100


@pytest.fixture(scope="module")
def target():
    return build_tiny_llama(VOCAB, seed=3, layers=8)


def make_head(target, version="3.1", seed=0, draft_vocab=DRAFT_VOCAB):
    torch.manual_seed(seed)
    config = EagleConfig.for_target(target.config, draft_vocab_size=draft_vocab, eagle_version=version)
    head = EagleHead(config, target.model.embed_tokens).eval()
    head.set_vocab_map(torch.randperm(VOCAB)[:draft_vocab].sort().values)
    # Non-trivial norm weights, so that a norm that is skipped or misplaced shows.
    with torch.no_grad():
        for name, param in head.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return head


def features(rows, width, seed=0):
    return torch.randn(rows, 3 * width, generator=torch.Generator().manual_seed(seed))


# -- the head: 3.0 against 3.1 ---------------------------------------------------------


def test_versions_differ_only_in_fc_norm_and_feedback(target):
    h30, h31 = make_head(target, "3.0"), make_head(target, "3.1")
    assert (h30.config.eagle_version, h31.config.eagle_version) == ("3.0", "3.1")
    names30 = set(h30.state_dict())
    names31 = set(h31.state_dict())
    # 3.1 adds one RMSNorm per captured state, and nothing else.
    assert names31 - names30 == {"fc_norm.0.weight", "fc_norm.1.weight", "fc_norm.2.weight"}
    assert names30 <= names31

    x = features(5, 64)
    # 3.1's fc_norm makes the fused features blind to each layer's scale (attention
    # drift's cause); 3.0 is not.
    scaled = x.clone()
    scaled[:, :64] *= 50.0
    assert torch.allclose(h31.fuse(x), h31.fuse(scaled), atol=1e-4)
    assert not torch.allclose(h30.fuse(x), h30.fuse(scaled), atol=1e-2)

    # Feedback: 3.0 hands the raw residual stream to the next step, 3.1 the normed state.
    tokens, positions = torch.randint(0, VOCAB, (1, 5)), torch.arange(5)[None]
    next_hidden, normed, _ = h30(h30.fuse(x)[None], tokens, positions)
    assert not torch.allclose(next_hidden, normed, atol=1e-2)
    assert torch.allclose(h30.norm(next_hidden), normed, atol=1e-5)
    next_hidden, normed, _ = h31(h31.fuse(x)[None], tokens, positions)
    assert torch.equal(next_hidden, normed)


def test_same_weights_same_output_until_the_differences_apply(target):
    """With fc_norm weights that leave unit-RMS features unchanged and one draft step, the
    two versions agree; the second step differs because of what is fed back."""
    h30, h31 = make_head(target, "3.0"), make_head(target, "3.1")
    h31.load_state_dict({**h30.state_dict(), **{f"fc_norm.{i}.weight": torch.ones(64) for i in range(3)}})
    x = features(4, 64)
    x = torch.cat([p / p.pow(2).mean(-1, keepdim=True).sqrt() for p in x.chunk(3, -1)], -1)  # unit RMS
    tokens, positions = torch.randint(0, VOCAB, (1, 4)), torch.arange(4)[None]
    out30, normed30, _ = h30(h30.fuse(x)[None], tokens, positions)
    out31, normed31, _ = h31(h31.fuse(x)[None], tokens, positions)
    assert torch.allclose(normed30, normed31, atol=1e-4)
    step2_30, _, _ = h30(out30, tokens, positions + 1)
    step2_31, _, _ = h31(out31, tokens, positions + 1)
    assert not torch.allclose(h30.norm(step2_30), step2_31, atol=1e-3)


@pytest.mark.parametrize("version", ["3.0", "3.1"])
def test_both_versions_train_a_step(target, version):
    head = make_head(target, version).train()
    optimizer = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=1e-2)
    x = features(12, 64)
    tokens, positions = torch.randint(0, VOCAB, (1, 12)), torch.arange(12)[None]
    labels = torch.randint(0, DRAFT_VOCAB, (12,))
    losses = []
    for _ in range(5):
        out, normed, _ = head(head.fuse(x)[None], tokens, positions)
        # A second, unrolled step through the fed-back state: gradients flow through both.
        _, normed2, _ = head(out, tokens, positions + 1)
        loss = torch.nn.functional.cross_entropy(
            head.logits(normed[0]), labels
        ) + torch.nn.functional.cross_entropy(head.logits(normed2[0]), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert head.embed_tokens.weight.grad is None  # the target's embeddings stay frozen
    if version == "3.1":
        assert head.fc_norm[0].weight.grad is not None


def test_default_capture_layers_follow_eagle3():
    assert default_capture_layers(32) == (2, 16, 29)  # Llama-3.1-8B: as the official heads
    assert default_capture_layers(30) == (2, 15, 27)  # SmolLM2-135M


# -- checkpoints -----------------------------------------------------------------------


def official_layout(head: EagleHead, path, extra_config=None):
    """Write ``head`` exactly as the published EAGLE-3 heads are laid out, by hand."""
    c = head.config
    state = {k: v for k, v in head.state_dict().items() if not k.startswith(("embed_tokens.", "rotary_emb."))}
    assert not any(k.startswith("fc_norm") for k in state), "official EAGLE-3 heads are 3.0"
    path.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, path / "model.safetensors")
    config = {
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": c.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": c.intermediate_size,
        "max_position_embeddings": c.max_position_embeddings,
        "num_attention_heads": c.num_attention_heads,
        "num_hidden_layers": 1,
        "num_key_value_heads": c.num_key_value_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_scaling": None,
        "rope_theta": c.rope_theta,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": c.vocab_size,
        "draft_vocab_size": c.draft_vocab_size,
        **(extra_config or {}),
    }
    (path / "config.json").write_text(json.dumps(config))


def speculators_layout(head: EagleHead, path):
    """The speculators layout: layers.0.*, fc_norm.{i}, flags, nested layer config."""
    c = head.config
    state = {}
    for k, v in head.state_dict().items():
        if k.startswith(("embed_tokens.", "rotary_emb.")):
            continue
        state[k.replace("midlayer.", "layers.0.", 1)] = v.contiguous()
    path.mkdir(parents=True)
    save_file(state, path / "model.safetensors")
    config = {
        "speculators_model_type": "eagle3",
        "architectures": ["Eagle3Speculator"],
        "draft_vocab_size": c.draft_vocab_size,
        "target_hidden_size": c.target_hidden_size,
        "norm_before_residual": False,
        "fc_norm": c.fc_norm,
        "norm_output": c.norm_output,
        "transformer_layer_config": {
            "model_type": "llama",
            "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size,
            "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads,
            "num_hidden_layers": 1,
            "rms_norm_eps": c.rms_norm_eps,
            "rope_theta": c.rope_theta,
            "max_position_embeddings": c.max_position_embeddings,
            "vocab_size": c.vocab_size,
            "hidden_act": "silu",
        },
        "speculators_config": {"algorithm": "eagle3", "verifier": {"name_or_path": "tiny"}},
    }
    (path / "config.json").write_text(json.dumps(config))


def same_drafts(a: EagleHead, b: EagleHead) -> bool:
    x = features(6, 64, seed=5)
    tokens, positions = torch.randint(0, VOCAB, (1, 6)), torch.arange(6)[None]
    with torch.no_grad():
        la = a.logits(a(a.fuse(x)[None], tokens, positions)[1])
        lb = b.logits(b(b.fuse(x)[None], tokens, positions)[1])
    return torch.allclose(la, lb, atol=1e-6) and torch.equal(a.d2t, b.d2t) and torch.equal(a.t2d, b.t2d)


def test_loads_the_official_eagle3_layout_as_3_0(target, tmp_path):
    original = make_head(target, "3.0", seed=7)
    official_layout(original, tmp_path / "head")
    loaded = load_head(tmp_path / "head", target.model.embed_tokens, num_target_layers=8)
    assert loaded.config.eagle_version == "3.0"
    assert loaded.config.capture_layer_ids == default_capture_layers(8)
    assert same_drafts(original, loaded)
    assert not same_drafts(make_head(target, "3.0", seed=8), loaded)  # the comparison can fail


def test_official_layout_with_explicit_layer_ids_and_bin_weights(target, tmp_path):
    original = make_head(target, "3.0", seed=9)
    official_layout(original, tmp_path / "head", {"eagle_aux_hidden_state_layer_ids": [1, 3, 5]})
    state = {
        k: v for k, v in original.state_dict().items() if not k.startswith(("embed_tokens.", "rotary_emb."))
    }
    (tmp_path / "head" / "model.safetensors").unlink()
    torch.save(state, tmp_path / "head" / "pytorch_model.bin")
    loaded = load_head(tmp_path / "head", target.model.embed_tokens, num_target_layers=8)
    assert loaded.config.capture_layer_ids == (1, 3, 5)
    assert same_drafts(original, loaded)


@pytest.mark.parametrize("version", ["3.0", "3.1"])
def test_loads_the_speculators_layout(target, tmp_path, version):
    original = make_head(target, version, seed=11)
    speculators_layout(original, tmp_path / "head")
    loaded = load_head(tmp_path / "head", target.model.embed_tokens, num_target_layers=8)
    assert loaded.config.eagle_version == version
    assert same_drafts(original, loaded)


def test_save_is_sharded_official_layout_and_round_trips(target, tmp_path):
    original = make_head(target, "3.1", seed=12)
    save_head(original, tmp_path / "head", max_shard_size="40KB")
    shards = sorted((tmp_path / "head").glob("*.safetensors"))
    assert len(shards) > 1 and all(s.stat().st_size < 60_000 for s in shards)
    config = json.loads((tmp_path / "head" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"] and config["fc_norm"] is True
    loaded = load_head(tmp_path / "head", target.model.embed_tokens)
    assert loaded.config.eagle_version == "3.1"
    assert same_drafts(original, loaded)


def test_mismatched_checkpoint_is_refused(target, tmp_path):
    head = make_head(target, "3.0")
    official_layout(head, tmp_path / "head")
    wrong_target = build_tiny_llama(VOCAB + 5, seed=1)
    with pytest.raises(ValueError, match="is this head for this target"):
        load_head(tmp_path / "head", wrong_target.model.embed_tokens)


# -- the proposer ----------------------------------------------------------------------


def greedy_chain(head, token_ids, hidden, depth):
    """The head's greedy draft and its cumulative log-probabilities, one step at a time
    without a cache: the reference the tree's best path must match."""
    with torch.no_grad():
        tokens = list(token_ids)
        hiddens = head.fuse(hidden)
        chain, scores, total = [], [], 0.0
        for _ in range(depth):
            n = len(hiddens)
            out, normed, _ = head(hiddens[None], torch.tensor([tokens[1 : n + 1]]), torch.arange(n)[None])
            logp = torch.log_softmax(head.logits(normed[0, -1]), -1)
            draft = logp.argmax()
            total += logp[draft].item()
            token = int(head.to_target_ids(draft))
            chain.append(token)
            scores.append(total)
            tokens.append(token)
            hiddens = torch.cat([hiddens, out[0, -1:]])
    return chain, scores


@pytest.mark.parametrize("version", ["3.0", "3.1"])
def test_tree_best_path_is_the_greedy_draft(target, version):
    head = make_head(target, version, seed=2)
    token_ids = torch.randint(0, VOCAB, (9,)).tolist()
    hidden = features(8, 64, seed=3)
    session = DraftSession(head)
    session.start(token_ids, hidden)
    shape = TreeShape(depth=4, top_k=3, total_tokens=12)
    tree = session.propose(shape)
    tree.validate(VOCAB)
    assert len(tree) == 12
    assert max(tree.depths()) <= 4
    assert all(head.t2d[t] for t in tree.token_ids)  # drafts come from the draft vocabulary
    # Kept nodes are ancestor-closed, scores fall along every path.
    for i, parent in enumerate(tree.parents):
        if parent >= 0:
            assert tree.scores[i] <= tree.scores[parent] + 1e-6
    # Follow the first child at each level: it must be the head's greedy chain.
    path, scores, node = [], [], -1
    children = tree.children()
    while children[node]:
        node = max(children[node], key=lambda c: tree.scores[c])
        path.append(tree.token_ids[node])
        scores.append(tree.scores[node])
    assert len(path) >= 2
    expected_path, expected_scores = greedy_chain(head, token_ids, hidden, len(path))
    assert path == expected_path
    assert torch.allclose(torch.tensor(scores), torch.tensor(expected_scores), atol=1e-4)


def grown_without_cache(head, token_ids, hidden, shape):
    """EAGLE-2's dynamic tree, each node's children scored by a fresh forward over the
    prompt and the node's own path (no KV cache, no tree mask): the reference the
    proposer's one-forward-per-step tree must match. Returns {path: cumulative score}."""

    def head_on_path(path_hiddens, path_tokens):
        hiddens = torch.cat([head.fuse(hidden), *path_hiddens])
        n = len(hiddens)
        tokens = torch.tensor([[*token_ids[1:], *path_tokens][:n]])
        out, normed, _ = head(hiddens[None], tokens, torch.arange(n)[None])
        return out[0, -1:], torch.log_softmax(head.logits(normed[0, -1]).float(), -1)

    k = shape.top_k
    with torch.no_grad():
        root_out, logp = head_on_path([], [])
        top = logp.topk(k)
        # A candidate: (score, draft token path, the head outputs fed along it).
        frontier = [
            (s, (int(t),), [root_out]) for s, t in zip(top.values.tolist(), top.indices.tolist(), strict=True)
        ]
        pool = {c[1]: c[0] for c in frontier}
        for _ in range(1, shape.depth):
            children = []
            for score, path, outs in frontier:
                draft_tokens = [int(head.to_target_ids(torch.tensor(t))) for t in path]
                out, logp = head_on_path(outs, draft_tokens)
                top = (score + logp).topk(k)
                for s, t in zip(top.values.tolist(), top.indices.tolist(), strict=True):
                    children.append((s, (*path, int(t)), [*outs, out]))
            pool.update({c[1]: c[0] for c in children})
            frontier = sorted(children, key=lambda c: -c[0])[:k]
    best = sorted(pool.items(), key=lambda item: (-item[1], len(item[0])))[: shape.total_tokens]
    return {tuple(int(head.to_target_ids(torch.tensor(t))) for t in path): score for path, score in best}


def tree_paths(tree) -> dict[tuple[int, ...], float]:
    """Each node's score, keyed by the tokens from the root down to it."""
    paths = {}
    for i in range(len(tree)):
        path, node = [], i
        while node >= 0:
            path.append(tree.token_ids[node])
            node = tree.parents[node]
        paths[tuple(path[::-1])] = tree.scores[i]
    return paths


# (5, 3, 39) keeps every candidate (3 + 4 * 9): a random head's flat scores would
# otherwise leave the deeper steps out of the comparison.
@pytest.mark.parametrize("shape", [TreeShape(3, 2, 4), TreeShape(4, 3, 12), TreeShape(5, 3, 39)])
def test_tree_is_the_one_grown_node_by_node_without_a_cache(target, shape):
    head = make_head(target, "3.1", seed=7)
    token_ids = torch.randint(0, VOCAB, (11,), generator=torch.Generator().manual_seed(1)).tolist()
    hidden = features(10, 64, seed=8)
    session = DraftSession(head)
    session.start(token_ids, hidden)
    paths = tree_paths(session.propose(shape))
    want = grown_without_cache(head, token_ids, hidden, shape)
    assert paths.keys() == want.keys()
    for path, score in want.items():
        assert paths[path] == pytest.approx(score, abs=1e-4)


def test_incremental_session_matches_a_fresh_one(target):
    head = make_head(target, "3.1", seed=4)
    token_ids = torch.randint(0, VOCAB, (12,)).tolist()
    hidden = features(11, 64, seed=6)
    shape = TreeShape(depth=3, top_k=2, total_tokens=6)
    incremental = DraftSession(head)
    incremental.start(token_ids[:6], hidden[:5])
    incremental.propose(shape)  # scratch tree state must not leak into the next
    incremental.extend(token_ids[6:], hidden[5:])
    fresh = DraftSession(head)
    fresh.start(token_ids, hidden)
    a, b = incremental.propose(shape), fresh.propose(shape)
    assert a.token_ids == b.token_ids and a.parents == b.parents
    assert torch.allclose(torch.tensor(a.scores), torch.tensor(b.scores), atol=1e-4)


def drive(session, token_ids, hidden, shape, steps, seed=0):
    """Start a session, then extend it by a few tokens at a time, proposing each time: the
    trees it gives, as (token_ids, parents) pairs, and their scores."""
    gen = torch.Generator().manual_seed(seed)
    session.start(token_ids, hidden)
    trees = [session.propose(shape)]
    for _ in range(steps):
        n = int(torch.randint(1, 4, (1,), generator=gen))
        session.extend(
            torch.randint(0, VOCAB, (n,), generator=gen).tolist(),
            torch.randn(n, hidden.shape[1], generator=gen),
        )
        trees.append(session.propose(shape))
    return [(t.token_ids, t.parents) for t in trees], [t.scores for t in trees]


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))],
)
@pytest.mark.parametrize("capacity", [64, 20], ids=["fits", "outgrows-the-slot"])
def test_a_session_on_a_draft_slot_proposes_the_same_trees(target, capacity, device):
    """The slot's growth (uncaptured on a CPU, replayed as a CUDA graph on a GPU) reads its
    whole buffer under a mask: the trees must be those of a session on its own cache,
    though the slot still holds an earlier session's entries, and past the slot's capacity
    too."""
    head = make_head(target, "3.1", seed=5)
    if device != "cpu":  # a copy: the head shares its embedding with the module's target
        head = copy.deepcopy(head).for_drafting(device, torch.float32)
    shape = TreeShape(depth=4, top_k=3, total_tokens=10)
    token_ids = torch.randint(0, VOCAB, (9,), generator=torch.Generator().manual_seed(2)).tolist()
    hidden = features(8, 64, seed=9)
    slots = DraftSlots(head, capacity, cuda_graphs=True)
    assert slots.take().graphs.enabled == (device == "cuda")
    earlier = DraftSession(head, slots)
    drive(earlier, token_ids[::-1], hidden.flip(0), shape, steps=3, seed=1)
    earlier.close()
    with_slot = DraftSession(head, slots)
    got, got_scores = drive(with_slot, token_ids, hidden, shape, steps=6)
    want, want_scores = drive(DraftSession(head), token_ids, hidden, shape, steps=6)
    assert got == want
    torch.testing.assert_close(torch.tensor(got_scores), torch.tensor(want_scores), rtol=0, atol=1e-4)
    assert (with_slot._slot is None) == (capacity == 20)  # 9 + 6 * up to 3 pairs > 20
    with_slot.close()
    assert slots.made == 2  # the one taken above, and the one both sessions used in turn
    assert slots.take().graphs.enabled == (device == "cuda")  # on a GPU: captured, no fallback


def test_the_draft_growth_traces_whole(target):
    """What a CUDA graph cannot hold (a value read back to the host, a branch on one) also
    breaks a fullgraph trace; this catches it without a GPU."""
    head = make_head(target, "3.1", seed=5)
    session = DraftSession(head, DraftSlots(head, 32))
    session.start(list(range(3, 12)), features(8, 64, seed=1))
    session._catch_up()
    slot, shape = session._slot, TreeShape(depth=4, top_k=3, total_tokens=10)
    torch._dynamo.reset()
    traced = torch.compile(grow_tree, fullgraph=True, backend="eager", dynamic=False)
    length = torch.tensor(8)
    args = (head, shape, slot.keys, slot.values, torch.arange(32) < length, length)
    with torch.inference_mode():
        got = traced(*args, session._last_hidden, session._last_normed)
        want = grow_tree(*args, session._last_hidden, session._last_normed)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    torch._dynamo.reset()


def test_a_bf16_head_keeps_its_rope_frequencies_in_fp32_and_drafts(target):
    reference = make_head(target, "3.1", seed=5)
    head = make_head(target, "3.1", seed=5)
    # Its own copy of the embeddings: casting the head casts them, and the target shares them.
    head.embed_tokens = torch.nn.Embedding.from_pretrained(target.model.embed_tokens.weight.clone())
    head.for_drafting("cpu", torch.bfloat16)
    assert head.fc.weight.dtype == head.lm_head.weight.dtype == torch.bfloat16
    for name, frequencies in reference.rotary_emb.named_buffers():
        assert torch.equal(getattr(head.rotary_emb, name), frequencies), name  # fp32, bit for bit
    assert target.model.embed_tokens.weight.dtype == torch.float32
    session = DraftSession(head)
    session.start(torch.randint(0, VOCAB, (9,)).tolist(), features(8, 64, seed=7))
    tree = session.propose(TreeShape(depth=3, top_k=2, total_tokens=5))
    tree.validate(VOCAB)
    assert len(tree) == 5 and all(head.t2d[t] for t in tree.token_ids)


def test_the_head_drafts_in_bf16_where_the_cpu_multiplies_it_natively(monkeypatch):
    monkeypatch.setattr(loading, "cpu_has_native_bf16", lambda: True)
    assert pick_head_dtype("auto", "cpu") == torch.bfloat16
    assert pick_head_dtype("float32", "cpu") == torch.float32
    monkeypatch.setattr(loading, "cpu_has_native_bf16", lambda: False)
    assert pick_head_dtype("auto", "cpu") == torch.float32  # emulated bf16 would be slower
    assert pick_head_dtype("auto", "cuda:0") == torch.bfloat16
    assert pick_head_dtype("bfloat16", "cpu") == torch.bfloat16


def test_session_refuses_misaligned_inputs(target):
    session = DraftSession(make_head(target))
    with pytest.raises(ValueError, match="one more token"):
        session.start([1, 2, 3], features(3, 64))
    with pytest.raises(ValueError, match="not started"):
        session.extend([1], features(1, 64))


def test_tree_shape_defaults_per_device_and_limits():
    assert tree_shape("cpu").total_tokens < tree_shape("cuda").total_tokens
    assert tree_shape("cpu", depth=2).depth == 2
    with pytest.raises(ValueError, match="depth"):
        TreeShape(depth=0, top_k=1, total_tokens=1)
    with pytest.raises(ValueError, match="total_tokens"):
        TreeShape(depth=2, top_k=2, total_tokens=10_000)


# -- the tree contract -----------------------------------------------------------------


@pytest.mark.parametrize(
    "tree, message",
    [
        (DraftTree([1, 2], [-1, 5], [0, 0]), "parent"),
        (DraftTree([1, 2], [-1, 1], [0, 0]), "parent"),  # self loop
        (DraftTree([1, 2, 3], [2, -1, 0], [0, 0, 0]), "parent"),  # cycle through a later node
        (DraftTree([1, VOCAB], [-1, 0], [0, 0]), "vocabulary"),
        (DraftTree([1, -3], [-1, 0], [0, 0]), "vocabulary"),
        (DraftTree([1, 2], [-1], [0, 0]), "length"),
        (DraftTree([1] * 300, [-1] * 300, [0] * 300), "nodes"),
    ],
)
def test_malformed_trees_are_refused(tree, message):
    with pytest.raises(MalformedTreeError, match=message):
        tree.validate(VOCAB)


def test_wellformed_tree_structure():
    tree = DraftTree([5, 6, 7, 8], [-1, -1, 0, 2], [0, -1, -1, -2])
    tree.validate(VOCAB)
    assert tree.depths() == [1, 1, 2, 3]
    assert tree.children()[-1] == [0, 1]
    mask = tree.ancestor_mask()
    assert mask[3].tolist() == [True, False, True, True]
    assert mask[1].tolist() == [False, True, False, False]


def test_only_builtin_target_names_find_a_shipped_head(tmp_path, monkeypatch):
    """A local model directory given as the target is never mistaken for a shipped head,
    even when it holds a config.json (``heads / "/abs/dir"`` is that directory)."""
    monkeypatch.setattr("aerie_drafter.loading.SHIPPED_HEADS_DIR", tmp_path / "heads")
    (tmp_path / "heads" / "tiny-target").mkdir(parents=True)
    (tmp_path / "heads" / "tiny-target" / "config.json").write_text("{}")
    model_dir = tmp_path / "local-model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    assert shipped_head("tiny-target") == tmp_path / "heads" / "tiny-target"
    assert shipped_head(str(model_dir)) is None
    assert shipped_head("../local-model") is None
    assert shipped_head("no-such-target") is None


def test_on_the_cpu_a_head_drafts_in_fp32_over_int8_copies_of_its_weights(target, tmp_path):
    from aerie_common.packed_weights import PackedLinear, packing_pays

    target_dir = tmp_path / "target"
    target.save_pretrained(target_dir)  # config.json and safetensors: the embeddings are read from it
    trained = make_head(target, seed=11)
    save_head(trained, tmp_path / "head")

    def load(dtype: str) -> EagleHead:
        return loading.load_drafter_head(str(target_dir), tmp_path, str(tmp_path / "head"), "cpu", dtype)[0]

    for dtype in ("auto", "int8"):
        head = load(dtype)
        formats = [m.packed.format for m in head.modules() if isinstance(m, PackedLinear)]
        # where the packed kernel runs (AVX-512 or AVX2, as on the project's machines): all 9
        # layers (fc, q, k, v, o, gate, up, down, lm_head) rounded to Q8_0 blocks
        assert formats == (["q8_0"] * 9 if packing_pays() else [])
        if not packing_pays():
            continue
        assert head.fc_norm[0].weight.dtype == torch.float32
        # rounded, not exact: the drafts come close to the head's, not equal
        assert not same_drafts(trained, head)
        x, tokens, positions = features(6, 64, seed=5), torch.randint(0, VOCAB, (1, 6)), torch.arange(6)[None]
        with torch.no_grad():
            exact = trained.logits(trained(trained.fuse(x)[None], tokens, positions)[1])
            rounded = head.logits(head(head.fuse(x)[None], tokens, positions)[1])
        assert (rounded - exact).abs().max() < 0.02 * exact.abs().max()
    assert not any(isinstance(m, PackedLinear) for m in load("bfloat16").modules())
    assert not any(isinstance(m, PackedLinear) for m in load("float32").modules())


def test_the_targets_embeddings_are_found_under_other_names(tmp_path):
    import transformers
    from safetensors.torch import save_file

    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64)
    )
    gpt2.save_pretrained(tmp_path / "gpt2")
    table = loading.load_target_embeddings(tmp_path / "gpt2")
    assert torch.equal(table.weight, gpt2.transformer.wte.weight)
    # a multimodal checkpoint's language model, its table under a prefix
    weights = torch.randn(VOCAB, 16)
    (tmp_path / "vlm").mkdir()
    save_file(
        {
            "vision_tower.patch_embed.weight": torch.randn(4, 4),
            "language_model.model.embed_tokens.weight": weights,
        },
        tmp_path / "vlm" / "model.safetensors",
    )
    assert torch.equal(loading.load_target_embeddings(tmp_path / "vlm").weight, weights)
    save_file({"lm_head.weight": weights}, tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no token embeddings"):
        loading.load_target_embeddings(tmp_path)
