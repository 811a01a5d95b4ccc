"""The EAGLE head's training pipeline, on tiny random-weight models built here: the draft
vocabulary, the unrolled training forward against the inference-time draft loop, that
training learns, the exported checkpoint, and resuming."""

from __future__ import annotations

import gzip
import json

import pytest
import torch
from aerie_drafter.checkpoint import load_head
from aerie_drafter.eagle import EagleConfig, EagleHead
from aerie_drafter.proposer import DraftSession, TreeShape
from aerie_drafter.train import MAX_SHARD_BYTES, TrainConfig, parse_args, train
from aerie_drafter.training.data import (
    Example,
    conversation_key,
    draft_vocabulary,
    encode_conversation,
    later_turn_prompts,
    load_conversations,
    read_json_array,
    self_distill,
    to_messages,
)
from aerie_drafter.training.features import FeatureCache, extract
from aerie_drafter.training.ttt import StepTargets, step_targets, ttt_loss, unrolled_logits, unrolled_states
from aerie_verifier.speculative import HiddenCapture

from tests.conftest import build_tiny_llama

LAYERS = 8  # capture layers (2, 4, 5)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The models here are tiny: more threads only add synchronisation, which costs
    seconds per step on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def target(tiny_tokenizer):
    return build_tiny_llama(len(tiny_tokenizer), seed=5, layers=LAYERS)


def random_head(target, draft_vocab: torch.Tensor, version: str, seed: int = 0) -> EagleHead:
    torch.manual_seed(seed)
    config = EagleConfig.for_target(target.config, draft_vocab_size=len(draft_vocab), eagle_version=version)
    head = EagleHead(config, target.model.embed_tokens)
    head.set_vocab_map(draft_vocab)
    return head


def test_draft_vocabulary_takes_the_most_frequent_response_tokens_and_maps_both_ways(target):
    examples = [
        Example(input_ids=[9, 9, 9, 7, 7, 5, 5, 5, 5], loss_mask=[0, 1, 1, 1, 1, 0, 1, 1, 1]),
        Example(input_ids=[11, 7, 30], loss_mask=[1, 1, 1]),
    ]
    # response counts: 7 x3, 5 x3, 9 x2, 11 x1, 30 x1 -> top 3 by (count, id): 5, 7, 9
    vocab = draft_vocabulary(examples, vocab_size=40, draft_vocab_size=3)
    assert vocab.tolist() == [5, 7, 9]
    # fewer distinct response tokens than asked: the lowest unused ids fill up, sorted
    assert draft_vocabulary(examples, 40, 7).tolist() == [0, 1, 5, 7, 9, 11, 30]

    head = random_head(target, torch.tensor([3, 8, 40, 100]), "3.1")
    assert head.to_target_ids(torch.arange(4)).tolist() == [3, 8, 40, 100]
    assert head.t2d.nonzero().flatten().tolist() == [3, 8, 40, 100]
    # labels: the target's full-vocabulary argmax becomes a draft id, -1 outside the draft vocab
    lm_head = torch.randn(target.config.vocab_size, 4)
    last_hidden = torch.randn(1, 4, 4)
    targets = step_targets(
        last_hidden,
        lm_head,
        target_argmax=torch.tensor([[40, 5, 100, -1]]),  # -1: not extracted
        loss_mask=torch.tensor([[0, 1, 1, 1]]),
        lengths=torch.tensor([4]),
        draft_to_target=torch.tensor([3, 8, 40, 100]),
    )
    assert targets.argmax.tolist() == [[2, -1, 3, -1]]
    # position p is trained on when x[p+1] is a response token, p+1 exists and the argmax is drafted
    assert targets.valid.tolist() == [[True, False, True, False]]
    assert targets.row_of.tolist() == [[0, -1, 1, -1]]
    assert torch.allclose(targets.probs.sum(-1), torch.ones(2))
    # the target's distribution over the draft vocab at the trained positions
    assert torch.allclose(targets.probs, (last_hidden[0, [0, 2]] @ lm_head[[3, 8, 40, 100]].T).softmax(-1))


def test_conversations_are_filtered_and_the_loss_mask_covers_the_assistant(tiny_tokenizer):
    good = [
        {"from": "human", "value": "hi"},
        {"from": "gpt", "value": "yo!"},
        {"from": "human", "value": "x"},
    ]
    assert to_messages(good) == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo!"}]
    assert to_messages([{"from": "gpt", "value": "first"}, {"from": "human", "value": "q"}]) is None
    assert to_messages([{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}]) is None

    messages = [
        {"role": "user", "content": "ab"},
        {"role": "assistant", "content": "cd"},
        {"role": "user", "content": "e"},
        {"role": "assistant", "content": "fgh"},
    ]
    example = encode_conversation(tiny_tokenizer, messages, max_len=512)
    ids = tiny_tokenizer.apply_chat_template(messages, tokenize=True)
    assert example.input_ids == list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    response = tiny_tokenizer.decode(
        [t for t, m in zip(example.input_ids, example.loss_mask, strict=True) if m]
    )
    assert response == "cd<|im_end|>fgh<|im_end|>"
    assert len(encode_conversation(tiny_tokenizer, messages, max_len=5).input_ids) == 5


def test_later_turns_become_prompts_of_their_own():
    def chat(*turns, system=None):
        messages = [{"role": "system", "content": system}] if system else []
        for i, text in enumerate(turns):
            messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
        return messages

    long_turn = "please rewrite the whole thing as a short poem"
    conversations = [
        chat("the first question stays out of this", "a1", long_turn, "a2", "go on", "a3"),
        chat("another first turn with enough words", "b1", long_turn, "b2"),  # met before
        chat("q", "c1", "what does the second law of thermodynamics say", "c2", system="be brief"),
    ]
    assert later_turn_prompts(conversations) == [
        [{"role": "user", "content": long_turn}],
        [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "what does the second law of thermodynamics say"},
        ],
    ]
    assert len(later_turn_prompts(conversations, min_words=1)) == 3  # "go on" too
    # one conversation at a time, with the texts met so far carried over: the same prompts
    seen: set[str] = set()
    one_by_one = [p for c in conversations for p in later_turn_prompts([c], seen=seen)]
    assert one_by_one == later_turn_prompts(conversations)
    assert long_turn in seen


def test_a_conversation_file_is_read_in_its_order_in_either_format(tmp_path):
    sharegpt = {"conversations": [{"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"}]}
    openai = {"messages": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]}
    broken = {"conversations": [{"from": "gpt", "value": "an answer to nothing"}]}
    tool_call = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]}
    parts = {
        "messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "q3"}, {"type": "image_url"}]},
            {"role": "assistant", "content": "a3"},
        ]
    }
    lines = "".join(json.dumps(item) + "\n" for item in [openai, broken, sharegpt, tool_call, parts])
    (tmp_path / "chats.jsonl").write_text(lines + "\n")
    with gzip.open(tmp_path / "chats.jsonl.gz", "wt") as f:
        f.write(lines)
    (tmp_path / "chats.json").write_text(json.dumps([openai, broken, sharegpt, tool_call, parts]))
    expected = [
        [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}],
        [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}],
        [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "q3"},
            {"role": "assistant", "content": "a3"},
        ],
    ]
    for name in ["chats.jsonl", "chats.jsonl.gz", "chats.json"]:
        assert load_conversations(path=str(tmp_path / name), seed=3) == expected  # no shuffle
    assert load_conversations(path=str(tmp_path / "chats.jsonl"), limit=1) == expected[:1]
    (tmp_path / "bad.jsonl").write_text(json.dumps(openai) + "\n{not json\n")
    with pytest.raises(ValueError, match="line 2"):
        load_conversations(path=str(tmp_path / "bad.jsonl"))
    config = tiny_config(tmp_path / "run", data=str(tmp_path / "chats.json"))
    before = config.identity()
    (tmp_path / "chats.json").write_text(json.dumps([sharegpt]))  # other data, the same path
    assert config.identity()["data_sha256"] != before["data_sha256"]  # so --resume refuses it
    with pytest.raises(SystemExit):  # argparse's error, before any model is loaded
        parse_args(["--out", str(tmp_path / "run"), "--data", str(tmp_path / "missing.jsonl")])


def test_truncated_json_array_keeps_the_complete_items():
    text = json.dumps([{"id": 1}, {"id": 2, "x": [1, 2]}, {"id": 3, "long": "abc"}])
    assert read_json_array(text) == [{"id": 1}, {"id": 2, "x": [1, 2]}, {"id": 3, "long": "abc"}]
    assert read_json_array(text[:-12]) == [{"id": 1}, {"id": 2, "x": [1, 2]}]


def test_batched_features_are_what_the_verifier_captures_and_the_cache_keeps_them(target, tmp_path):
    torch.manual_seed(0)
    examples = [
        Example(torch.randint(3, 200, (n,)).tolist(), [0] * (n // 2) + [1] * (n - n // 2)) for n in (9, 5, 7)
    ]
    layers = (2, 4, 5)
    batch = extract(target, examples, layers)
    capture = HiddenCapture(target)
    for b, example in enumerate(examples):
        n = len(example.input_ids)
        with torch.no_grad(), capture.layers(layers):
            logits = target(torch.tensor([example.input_ids])).logits[0]
        assert torch.allclose(batch.aux_hidden[b, :n], capture.features(layers), atol=1e-5)
        next_is_response = torch.tensor(example.loss_mask[1:] + [0], dtype=torch.bool)
        assert torch.equal(batch.target_argmax[b, :n][next_is_response], logits.argmax(-1)[next_is_response])
        assert (batch.target_argmax[b, :n][~next_is_response] == -1).all()
        assert torch.allclose(target.lm_head(batch.last_hidden[b, :n]), logits, atol=1e-4)

    cache = FeatureCache.build(tmp_path / "features", target, examples, layers, batch_size=2, shard_tokens=10)
    assert len(cache.index["shards"]) == 2 and len(cache) == 3
    again = FeatureCache(tmp_path / "features").batch([2, 0])
    assert again.lengths.tolist() == [7, 9]
    assert torch.equal(again.input_ids[0, :7], torch.tensor(examples[2].input_ids))
    assert torch.equal(again.loss_mask[1, :9], torch.tensor(examples[0].loss_mask, dtype=torch.bool))
    # stored as bf16: equal to the fresh features up to bf16 rounding
    assert torch.allclose(again.aux_hidden[1, :9].float(), batch.aux_hidden[0, :9], rtol=1e-2, atol=1e-2)
    assert torch.equal(again.target_argmax[0, :7], batch.target_argmax[2, :7])


def sequential_chain_logits(head, fused, tokens, anchor, steps):
    """The inference-time loop (proposer.py) for one chain, teacher-forced: the real pairs
    0..anchor through the head, then one step at a time on the head's own output."""
    positions = torch.arange(anchor + 1)[None]
    hidden, normed, kv = head(fused[None, : anchor + 1], tokens[None, 1 : anchor + 2], positions)
    hidden, out = hidden[:, -1:], [head.logits(normed[0, -1])]
    for k in range(1, steps):
        token = tokens[None, anchor + k + 1 : anchor + k + 2]
        hidden, normed, (k_new, v_new) = head(hidden, token, torch.tensor([[anchor + k]]), past_kv=kv)
        kv = (torch.cat([kv[0], k_new], 2), torch.cat([kv[1], v_new], 2))
        out.append(head.logits(normed[0, -1]))
    return out


@pytest.mark.parametrize("version", ["3.0", "3.1"])
def test_unrolled_training_forward_gives_the_inference_draft_loop_logits(target, version):
    head = random_head(target, torch.arange(0, 256, 2), version).eval()
    torch.manual_seed(1)
    length, steps = 14, 4
    tokens = torch.randint(3, 250, (length,))
    features = extract(target, [Example(tokens.tolist(), [1] * length)], (2, 4, 5)).aux_hidden
    with torch.no_grad():
        unrolled = unrolled_logits(head, features, tokens[None], steps)
        fused = head.fuse(features[0])
        for anchor in range(length - steps - 1):
            reference = sequential_chain_logits(head, fused, tokens, anchor, steps)
            for k in range(steps):
                assert torch.allclose(unrolled[k][0, anchor], reference[k], atol=1e-4), (anchor, k)
    # and it is not the same as feeding every step the target's features (no TTT)
    assert not torch.allclose(unrolled[2][0, 3], unrolled[0][0, 5], atol=1e-3)


def test_unrolled_forward_matches_the_proposer_on_its_own_greedy_chain(target):
    """The real DraftSession with top_k=1 drafts a chain; feeding that chain to the
    training forward must give the same per-step log-probabilities."""
    head = random_head(target, torch.arange(256), "3.1", seed=2).eval()
    torch.manual_seed(3)
    prompt = torch.randint(3, 250, (8,)).tolist()
    depth = 4
    features = extract(target, [Example(prompt, [0] * len(prompt))], (2, 4, 5)).aux_hidden[0]
    session = DraftSession(head)
    session.start(prompt, features[:-1])  # the last prompt token plays the first generated token
    tree = session.propose(TreeShape(depth=depth, top_k=1, total_tokens=depth))
    assert tree.parents == [-1, 0, 1, 2]
    sequence = torch.tensor(prompt + tree.token_ids[:-1])
    padded = torch.cat([features[:-1], torch.zeros(depth, features.shape[1])])  # rows past the anchor unused
    with torch.no_grad():
        unrolled = unrolled_logits(head, padded[None], sequence[None], depth)
    anchor = len(prompt) - 2
    scores = [0.0, *tree.scores]
    for k in range(depth):
        logp = unrolled[k][0, anchor].log_softmax(-1)
        draft_id = int(torch.nonzero(head.to_target_ids(torch.arange(256)) == tree.token_ids[k]))
        assert int(logp.argmax()) == draft_id
        assert abs(float(logp[draft_id]) - (scores[k + 1] - scores[k])) < 1e-4


def test_a_few_training_steps_reduce_the_loss(target):
    """A synthetic task the head can learn: sequences repeating a short random motif, with
    the true next token as the label (a random target's own distribution is too flat to
    learn much from in a few steps)."""
    torch.manual_seed(4)
    examples = []
    for _ in range(4):
        motif = torch.randint(3, 40, (5,)).tolist()
        examples.append(Example((motif * 6)[:28], [0] * 4 + [1] * 24))
    vocab = torch.arange(48)
    head = random_head(target, vocab, "3.1")
    batch = extract(target, examples, (2, 4, 5))
    next_tokens = torch.cat([batch.input_ids[:, 1:], batch.input_ids[:, :1]], 1)
    targets = StepTargets.from_dense(
        probs=torch.nn.functional.one_hot(next_tokens, 48).float(),
        valid=torch.cat([batch.loss_mask[:, 1:], torch.zeros(4, 1, dtype=torch.bool)], 1),
        argmax=next_tokens,
    )
    optimizer = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=3e-3)
    results = []
    for _ in range(25):
        result = ttt_loss(head, unrolled_states(head, batch.aux_hidden, batch.input_ids, 3), targets)
        optimizer.zero_grad()
        result.loss.backward()
        optimizer.step()
        results.append(result)
    first, last = results[0], results[-1]
    assert first.step_count == [4 * 24] * 3  # every response position, at every step
    assert last.loss.item() < 0.5 * first.loss.item(), [r.loss.item() for r in results]
    assert all(b > a for a, b in zip(first.step_accuracy, last.step_accuracy, strict=True))


def tiny_conversations(n: int, seed: int = 0) -> list[list[dict]]:
    gen = torch.Generator().manual_seed(seed)
    letters = "abcdefghij"
    out = []
    for _ in range(n):
        word = "".join(letters[i] for i in torch.randint(0, 10, (4,), generator=gen).tolist())
        out.append([{"role": "user", "content": word}, {"role": "assistant", "content": word[::-1] * 3}])
    return out


def tiny_config(out, **overrides) -> TrainConfig:
    values = dict(
        out=out, target_model="tiny", device="cpu", eagle_version="3.1", conversations=6, max_len=64,
        draft_vocab=48, self_distill=False, distill_max_new_tokens=8, distill_batch_size=2, distill_turns=1,
        features="cache", feature_batch_size=2, ttt_steps=2, step_decay=0.8, epochs=2, batch_size=2,
        lr=1e-3, warmup_ratio=0.0, weight_decay=0.0, grad_clip=0.5, save_every=2, keep_checkpoints=2,
        log_every=1, seed=0, export_dtype="bfloat16", threads=0, bf16=False,
    )  # fmt: skip
    values.update(overrides)
    return TrainConfig(**values)


def test_training_run_exports_a_loadable_head_and_resume_continues(target, tiny_tokenizer, tmp_path):
    conversations = tiny_conversations(6)
    whole = train(
        tiny_config(tmp_path / "whole"), target=target, tokenizer=tiny_tokenizer, conversations=conversations
    )

    files = sorted(p.name for p in whole.iterdir())
    assert "config.json" in files and "training.json" in files
    assert all((whole / f).stat().st_size < MAX_SHARD_BYTES for f in files)
    record = json.loads((whole / "training.json").read_text())
    assert record["steps"] == 6 and record["data"]["conversations"] == 6
    head = load_head(whole, target.model.embed_tokens)
    assert head.config.eagle_version == "3.1" and head.config.capture_layer_ids == (2, 4, 5)
    final = load_head(tmp_path / "whole" / "checkpoints" / "step-0000006", target.model.embed_tokens)
    for name, value in final.state_dict().items():  # the export is the final weights in bf16
        assert torch.allclose(head.state_dict()[name].float(), value.float(), rtol=1e-2, atol=1e-3), name
    assert not torch.allclose(final.fc.weight, random_head(target, torch.arange(48), "3.1").fc.weight)

    # The same run stopped (out of time at once, then after 3 steps) and resumed ends with
    # the same weights.
    split = tiny_config(tmp_path / "split")
    kwargs = dict(target=target, tokenizer=tiny_tokenizer, conversations=conversations)
    assert train(split, max_minutes=0, **kwargs) is None
    assert json.loads((tmp_path / "split" / "times.json").read_text())["features"] > 0
    assert train(split, resume=True, stop_after=3, **kwargs) is None
    saved = sorted(p.name for p in (tmp_path / "split" / "checkpoints").iterdir())
    assert saved == ["step-0000002", "step-0000003"]
    early = train(split, resume=True, stop_after=0, export_early=True, **kwargs)  # a time slot's end
    record = json.loads((early / "training.json").read_text())
    assert (record["steps"], record["planned_steps"]) == (3, 6)
    assert load_head(early, target.model.embed_tokens).config.eagle_version == "3.1"
    with pytest.raises(SystemExit):  # a second run in the same directory must say --resume
        train(split, target=target, tokenizer=tiny_tokenizer, conversations=conversations)
    with pytest.raises(SystemExit):  # and a resume must not change the run's settings
        train(tiny_config(tmp_path / "split", lr=1.0), resume=True, target=target, tokenizer=tiny_tokenizer)
    (tmp_path / "split" / "checkpoints" / "step-0000004.partial").mkdir()  # a save killed midway
    resumed = train(split, resume=True, target=target, tokenizer=tiny_tokenizer, conversations=conversations)
    log = [json.loads(line) for line in (tmp_path / "split" / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2, 3, 4, 5, 6]
    resumed_head = load_head(tmp_path / "split" / "checkpoints" / "step-0000006", target.model.embed_tokens)
    for name, value in final.state_dict().items():
        assert torch.allclose(resumed_head.state_dict()[name], value, atol=1e-6), name
    assert json.loads((resumed / "training.json").read_text())["steps"] == 6


def test_self_distillation_replaces_answers_with_the_targets_greedy_output(target, tiny_tokenizer):
    conversations = [
        [
            {"role": "user", "content": "abc"},
            {"role": "assistant", "content": "old"},
            {"role": "user", "content": "a much longer second question"},
            {"role": "assistant", "content": "old"},
        ],
        [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "x"},
        ],
    ]
    distilled = self_distill(
        target, tiny_tokenizer, conversations, max_new_tokens=4, batch_size=2, max_turns=2
    )
    assert [[m["role"] for m in c] for c in distilled] == [
        ["user", "assistant", "user", "assistant"],
        ["system", "user", "assistant"],
    ]
    # each answer is what the target generates alone for that prompt (left padding is harmless)
    for conversation in distilled:
        for i, message in enumerate(conversation):
            if message["role"] != "assistant":
                continue
            prompt = tiny_tokenizer.apply_chat_template(
                conversation[:i], add_generation_prompt=True, tokenize=True
            )
            prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
            alone = target.generate(torch.tensor([prompt]), max_new_tokens=4, do_sample=False, pad_token_id=0)
            expected = tiny_tokenizer.decode(alone[0, len(prompt) :], skip_special_tokens=True).strip()
            assert message["content"] == (expected or "..."), (i, message)


def test_self_distillation_skips_prompts_over_the_limit(target, tiny_tokenizer):
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "old"}]
    long_first = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "old"}]
    long_second = [
        *short,
        {"role": "user", "content": "word " * 200},
        {"role": "assistant", "content": "old"},
    ]
    rendered = tiny_tokenizer.apply_chat_template(short, tokenize=True)
    limit = len(rendered["input_ids"] if hasattr(rendered, "keys") else rendered) + 4
    distilled = self_distill(
        target,
        tiny_tokenizer,
        [long_second, long_first, short],
        max_new_tokens=2,
        batch_size=2,
        max_turns=2,
        max_prompt_tokens=limit,
    )
    # the first conversation ends before its long turn, the second is dropped, order is kept
    assert [[m["role"] for m in c] for c in distilled] == [["user", "assistant"], ["user", "assistant"]]
    assert all(c[0]["content"] == "hi" and c[1]["content"] != "old" for c in distilled)


def test_a_run_on_later_turns_distils_their_answers_and_records_their_keys(target, tiny_tokenizer, tmp_path):
    conversations = [
        [
            {"role": "user", "content": f"first question {i}"},
            {"role": "assistant", "content": "recorded answer"},
            {"role": "user", "content": f"and a later question number {i} with words"},
            {"role": "assistant", "content": "recorded answer"},
        ]
        for i in range(3)
    ]
    config = tiny_config(
        tmp_path / "later", prompts="later-turns", self_distill=True, epochs=1, conversations=3, max_len=160
    )
    head_dir = train(config, target=target, tokenizer=tiny_tokenizer, conversations=conversations)
    trained = [json.loads(line) for line in (tmp_path / "later" / "conversations.jsonl").open()]
    assert [[m["role"] for m in c] for c in trained] == [["user", "assistant"]] * 3
    assert {c[0]["content"] for c in trained} == {c[2]["content"] for c in conversations}
    assert all(c[1]["content"] != "recorded answer" for c in trained)  # the target's own
    record = json.loads((head_dir / "training.json").read_text())
    assert record["config"]["prompts"] == "later-turns"
    assert set(record["data"]["conversation_keys"]) == {conversation_key(c) for c in trained}
    with pytest.raises(ValueError, match="needs --self-distill"):  # the recorded answers lean on turn 1
        tiny_config(tmp_path / "x", prompts="later-turns")


def test_online_features_and_the_30_architecture_train_too(target, tiny_tokenizer, tmp_path):
    config = tiny_config(tmp_path / "online", features="online", eagle_version="3.0", epochs=1)
    head_dir = train(
        config, target=target, tokenizer=tiny_tokenizer, conversations=tiny_conversations(4, seed=1)
    )
    assert not (tmp_path / "online" / "features").exists()
    head = load_head(head_dir, target.model.embed_tokens)
    assert head.config.eagle_version == "3.0" and head.fc_norm is None
    log = [json.loads(line) for line in (tmp_path / "online" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(len(row["step_loss"]) == 2 for row in log)


def test_init_head_continues_from_an_exported_head_with_its_vocabulary(target, tiny_tokenizer, tmp_path):
    first = train(
        tiny_config(tmp_path / "first", epochs=4, draft_vocab=40),
        target=target,
        tokenizer=tiny_tokenizer,
        conversations=tiny_conversations(6),
    )
    exported = load_head(first, target.model.embed_tokens)
    # New data whose own most frequent tokens differ, and bf16 autocast on the CPU: stopped
    # before its first step, the run holds the exported head, vocabulary included.
    # (the first two are the first run's again: a run from its head passes over them)
    again_and_new = tiny_conversations(6)[:2] + tiny_conversations(6, seed=3)
    later = dict(target=target, tokenizer=tiny_tokenizer, conversations=again_and_new)
    warm = tiny_config(tmp_path / "warm", epochs=1, init_head=str(first), bf16=True)
    assert train(warm, stop_after=0, **later) is None
    start = load_head(tmp_path / "warm" / "checkpoints" / "step-0000000", target.model.embed_tokens)
    assert torch.equal(start.draft_target_ids(), exported.draft_target_ids())
    for name, value in exported.state_dict().items():
        assert torch.equal(start.state_dict()[name], value.float()), name
    trained_dir = train(warm, resume=True, **later)
    trained = load_head(trained_dir, target.model.embed_tokens)
    # the record keeps the round it started from
    lineage = json.loads((trained_dir / "training.json").read_text())["init_head"]
    assert lineage == json.loads((first / "training.json").read_text())
    assert lineage["init_head"] is None
    first_keys = {conversation_key(c) for c in tiny_conversations(6)}
    assert set(lineage["data"]["conversation_keys"]) == first_keys
    warm_keys = json.loads((trained_dir / "training.json").read_text())["data"]["conversation_keys"]
    assert set(warm_keys) == {conversation_key(c) for c in tiny_conversations(6, seed=3)}
    assert torch.equal(trained.draft_target_ids(), exported.draft_target_ids())
    assert not torch.equal(trained.fc.weight, exported.fc.weight)

    cold = load_head(
        train(tiny_config(tmp_path / "cold", epochs=1, draft_vocab=40), **later), target.model.embed_tokens
    )
    assert not torch.equal(cold.draft_target_ids(), exported.draft_target_ids())  # the data's own
    with pytest.raises(SystemExit, match="3.1 head"):
        train(tiny_config(tmp_path / "wrong", eagle_version="3.0", init_head=str(first)), **later)
