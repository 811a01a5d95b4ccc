"""The speculative-decoding bench's own pieces: the Hugging Face baselines decode what the
engine decodes, the chart is drawn, and the acceptance eval covers every category."""

from __future__ import annotations

import argparse

import pytest
import torch
from aerie_drafter.proposer import TreeShape
from aerie_verifier.engine import Engine
from aerie_verifier.speculative import SpeculativeStats

from bench.eagle_eval import Tally as EvalTally
from bench.prompts import select_questions
from bench.speculative import Tally, draw_chart, parse_tree_shape, run_hf, run_once, tree_row_name


def test_hf_rows_decode_the_engines_greedy_output(tiny_model, tiny_tokenizer):
    engine = Engine(tiny_model, tiny_tokenizer, max_running=1)
    engine.start()
    try:
        prompt = engine.encode_chat([{"role": "user", "content": "hello there"}])
        plain, _, _ = run_once(engine, prompt, 24, speculative=False)
    finally:
        engine.stop()
    generated, seconds = run_hf(tiny_model, prompt, 24, engine.eos_ids, lookup=None)
    looked_up, _ = run_hf(tiny_model, prompt, 24, engine.eos_ids, lookup=3)
    assert len(plain) == 24 and seconds > 0
    assert generated == plain
    assert looked_up == plain


def test_hf_row_stops_before_eos(tiny_model, tiny_tokenizer):
    prompt = tiny_tokenizer("abc")["input_ids"]
    # every token is an end token here: generate() stops at once, and the EOS is not counted
    tokens, _ = run_hf(tiny_model, prompt, 8, frozenset(range(len(tiny_tokenizer))), lookup=None)
    assert tokens == []


def test_chart_is_written(tmp_path):
    row = {"tokens_per_s": 1.0, "speedup_vs_plain": 1.0, "outputs_differing_from_plain": 0}
    result = {
        "prompts": 2,
        "max_tokens": 8,
        "device": "cpu",
        "head": "h",
        "rows": [
            {**row, "config": "hf-generate", "speedup_vs_hf_generate": 1.0, "acceptance_by_position": []},
            {
                **row,
                "config": "grpc-head",
                "speedup_vs_hf_generate": 1.4,
                "acceptance_by_position": [0.6, 0.3],
                "ms_per_step": {"draft": 20.0, "hop": 2.0, "verify": 100.0, "step": 130.0},
            },
        ],
    }
    path = tmp_path / "img" / "speculative.png"
    draw_chart(result, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_per_category_selection_covers_every_category():
    questions = [{"category": c, "id": i} for c in "abc" for i in range(4)]
    picked = select_questions(questions, None, 2)
    assert [(q["category"], q["id"]) for q in picked] == [
        ("a", 0), ("a", 1), ("b", 0), ("b", 1), ("c", 0), ("c", 1)
    ]  # fmt: skip
    assert select_questions(questions, 3, None) == questions[:3]
    assert select_questions(questions, 3, 2) == picked[:3]


def test_rows_split_step_time_per_tree_and_per_verification():
    stats = SpeculativeStats(drafts=4, trees=5, draft_seconds=0.05, hop_seconds=0.01, verify_seconds=0.2)
    stats.accepted_tokens, stats.accepted_per_position = 6, [3, 2, 1]
    tally = Tally(tokens=10, seconds=0.4)
    tally.add_speculation(stats)
    row = tally.row("grpc-head", plain_tps=20.0, hf_tps=20.0, tie_tolerance=0.0)
    assert row["mean_acceptance_length"] == 2.5
    assert row["ms_per_step"] == {"draft": 10.0, "hop": 2.0, "verify": 50.0, "step": 100.0}
    guarded = tally.row("grpc-head-guarded", plain_tps=20.0, hf_tps=20.0, tie_tolerance=0.0)
    assert guarded["ms_per_step"]["step"] is None  # its requests also decoded plainly
    assert Tally(tokens=1, seconds=1.0).row("plain", 1.0, 1.0, 0.0)["ms_per_step"] is None


def test_rows_count_the_divergences_beyond_the_tie_tolerance():
    tally = Tally(tokens=10, seconds=1.0, divergence_gaps=[0.25, 3.0, 0.0])
    row = tally.row("grpc-head", plain_tps=10.0, hf_tps=10.0, tie_tolerance=2.0)
    assert row["outputs_differing_from_plain"] == 3
    assert row["divergences_beyond_tie_tolerance"] == 1
    assert row["largest_gap_at_divergence"] == 3.0
    strict = tally.row("grpc-head", plain_tps=10.0, hf_tps=10.0, tie_tolerance=0.0)
    assert strict["divergences_beyond_tie_tolerance"] == 2  # an exact tie (gap 0) may go either way
    clean = Tally(tokens=10, seconds=1.0).row("plain", 10.0, 10.0, 0.0)
    assert clean["outputs_differing_from_plain"] == clean["divergences_beyond_tie_tolerance"] == 0
    assert clean["largest_gap_at_divergence"] is None


def test_tree_shapes_parse_from_the_command_line():
    assert parse_tree_shape("3/4/8") == TreeShape(3, 4, 8)
    assert tree_row_name(TreeShape(3, 4, 8)) == "inprocess-head-3/4/8"
    for bad in ("3/4", "3/x/8", "0/4/8", "3/4/8/1"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_tree_shape(bad)


def test_acceptance_eval_sums_requests_and_reports_depth_rates():
    tally = EvalTally()
    assert tally.acceptance_length != tally.acceptance_length  # NaN before any step
    stats = SpeculativeStats(drafts=3, accepted_tokens=3, accepted_per_position=[2, 1])
    tally.add(stats, tokens=7, in_draft_vocab=7)
    stats = SpeculativeStats(drafts=1, accepted_tokens=3, accepted_per_position=[1, 1, 1])
    tally.add(stats, tokens=4, in_draft_vocab=1)
    assert (tally.steps, tally.tokens, tally.acceptance_length) == (4, 11, 2.5)
    assert tally.draft_vocab_coverage == 8 / 11
    assert tally.by_depth() == [
        {"depth": 1, "rate": 0.75, "conditional": 0.75},
        {"depth": 2, "rate": 0.5, "conditional": 2 / 3},
        {"depth": 3, "rate": 0.25, "conditional": 0.5},
    ]


def test_round_robin_takes_each_category_in_turn():
    from bench.prompts import round_robin_by_category

    questions = [{"category": c, "id": i} for i, c in enumerate("aaabbc")]
    assert [q["id"] for q in round_robin_by_category(questions)] == [0, 3, 5, 1, 4, 2]
    assert round_robin_by_category(questions)[:3] == select_questions(questions, None, 1)


def test_target_confidence_is_the_targets_probability_of_each_token_it_chose(tiny_model):
    from bench.eagle_eval import own_token_probabilities

    prompt, tokens = [5, 9, 2, 7], [11, 3, 3, 8]
    got = own_token_probabilities(tiny_model, prompt, tokens)
    with torch.inference_mode():  # one forward per prefix, the long way
        expected = [
            tiny_model(input_ids=torch.tensor([prompt + tokens[:i]])).logits[0, -1].softmax(-1)[t].item()
            for i, t in enumerate(tokens)
        ]
    assert got == pytest.approx(expected, rel=1e-4)
    tally = EvalTally()
    tally.add(SpeculativeStats(drafts=2), tokens=4, in_draft_vocab=4, own_probabilities=got)
    assert tally.target_confidence == pytest.approx(sum(expected) / 4)


def test_the_oracle_session_serves_behind_the_drafter_servicer(tiny_model):
    """bench.oracle_drafter runs OracleSession in the real DrafterServicer: its session
    factory, its checks of a start, and its drafting."""
    from aerie_common.tensors import to_chunks
    from aerie_drafter.eagle import EagleConfig, EagleHead
    from aerie_drafter.server import DrafterServicer
    from aerie_proto.v1 import drafter_pb2

    from bench.speculative import OracleSession

    config = EagleConfig.for_target(tiny_model.config, draft_vocab_size=16)
    head = EagleHead(config, tiny_model.model.embed_tokens)
    shape = TreeShape(depth=3, top_k=1, total_tokens=3, context_ngram=True)
    servicer = DrafterServicer(head, shape, 1, "oracle", lambda counts: OracleSession([[5, 6, 7, 8, 9, 10]]))
    session = servicer.new_session(servicer.context_counts)
    start = drafter_pb2.DraftStart(request_id="r", token_ids=[5, 6, 7])
    hidden = to_chunks(torch.zeros(2, servicer.feature_width))
    tree, _ = servicer._start(session, start, hidden, shape)
    assert tree.token_ids == [8, 9, 10] and servicer.context_counts.drafted == 0
