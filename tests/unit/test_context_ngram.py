"""The context branch of the draft tree: n-gram lookup and its merge into the head's tree."""

from __future__ import annotations

import math
import random

import pytest
from aerie_drafter.context_ngram import MAX_N, PRECISION, PRIOR_WEIGHT, ContextNgrams
from aerie_drafter.proposer import DraftSession, TreeShape

from tests.unit.test_drafter import VOCAB, features, make_head, target  # noqa: F401 (fixture)
from tests.unit.test_drafter import tree_paths as paths


def brute_force_continuation(tokens: list[int], length: int) -> tuple[list[int], int]:
    for n in range(min(MAX_N, len(tokens)), 0, -1):
        suffix = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):  # latest first, never the suffix itself
            if tokens[start : start + n] == suffix:
                return tokens[start + n : start + n + length], n
    return [], 0


def test_continuation_follows_the_latest_longest_match():
    context = ContextNgrams()
    context.extend([1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3])
    # "2 3" was last followed by 7 8; "5 2 3" never occurred before
    assert context.continuation(3) == ([7, 8, 5], 2)
    context.extend([7])  # "2 3 7" now matches its earlier occurrence
    assert context.continuation(2) == ([8, 5], 3)
    assert ContextNgrams().continuation(4) == ([], 0)
    fresh = ContextNgrams()
    fresh.extend([4, 5, 6])
    assert fresh.continuation(4) == ([], 0)  # no token repeats: nothing to copy


def test_incremental_lookups_match_a_brute_force_scan():
    rng = random.Random(0)
    for _ in range(50):
        tokens = [rng.randrange(6) for _ in range(rng.randrange(1, 40))]
        context = ContextNgrams()
        i = 0
        while i < len(tokens):  # extended a few tokens at a time, as a session is
            step = rng.randrange(1, 4)
            context.extend(tokens[i : i + step])
            i += step
            seen = tokens[: min(i, len(tokens))]
            assert context.continuation(4) == brute_force_continuation(seen, 4), seen


def chain_scores(match_length, length):  # a fresh session's: the prior's
    return ContextNgrams().chain_scores(match_length, length)


def test_chain_scores_fall_with_depth_and_match_length():
    assert chain_scores(3, 2) == pytest.approx([math.log(PRECISION[3]), 2 * math.log(PRECISION[3])])
    assert chain_scores(1, 1)[0] < chain_scores(2, 1)[0] < chain_scores(3, 1)[0] < 0


def test_the_precision_follows_the_sessions_own_outcomes():
    context = ContextNgrams()
    context.extend([1, 2, 3, 4, 1, 2, 3])
    misses = 3 * PRIOR_WEIGHT
    for i in range(misses):  # "1 2 3" -> what followed it last; the target says something new
        assert context.continuation(2)[1] == 3
        context.extend([100 + i, 1, 2, 3])
    # only the first token of each proposal counts, and only once
    assert context.precision(3) == pytest.approx(PRIOR_WEIGHT * PRECISION[3] / (misses + PRIOR_WEIGHT))
    assert context.precision(2) == pytest.approx(PRECISION[2])  # untried: the prior
    hits = ContextNgrams()
    hits.extend([5, 6, 7, 8, 5, 6, 7])
    for _ in range(misses):
        first = hits.continuation(1)[0][0]
        hits.extend([first, 5, 6, 7])
    assert PRECISION[3] < hits.precision(3) < 1
    assert hits.chain_scores(3, 1)[0] > chain_scores(3, 1)[0]
    hits.extend([1])  # no proposal pending: nothing recorded
    assert hits.precision(3) == pytest.approx(
        (misses + PRIOR_WEIGHT * PRECISION[3]) / (misses + PRIOR_WEIGHT)
    )


def head_pool(head, token_ids, hidden, depth, top_k) -> dict[tuple[int, ...], float]:
    """Every candidate the head considers, by path: a tree that keeps them all."""
    session = DraftSession(head)
    session.start(token_ids, hidden)
    return paths(session.propose(TreeShape(depth=depth, top_k=top_k, total_tokens=256)))


@pytest.mark.parametrize("total", [3, 8, 20])
def test_the_chain_joins_the_tree_by_score(target, total):  # noqa: F811
    head = make_head(target, seed=2)
    outside = next(t for t in range(VOCAB) if not head.t2d[t])  # a token the head cannot draft
    # the prompt ends "a b c", which went on "outside, 7, 8" earlier
    token_ids = [11, 12, 13, outside, 7, 8, 40, 41, 11, 12, 13]
    hidden = features(len(token_ids) - 1, 64, seed=1)
    shape = TreeShape(depth=3, top_k=3, total_tokens=total)
    plain, both = DraftSession(head), DraftSession(head)
    plain.start(token_ids, hidden)
    both.start(token_ids, hidden)
    head_tree = plain.propose(shape)
    tree = both.propose(TreeShape(depth=3, top_k=3, total_tokens=total, context_ngram=True))
    assert plain.propose(shape) == head_tree  # proposing again changes nothing

    head_paths, got = paths(head_tree), paths(tree)
    step = chain_scores(3, 3)
    chain = {(outside,): step[0], (outside, 7): step[1], (outside, 7, 8): step[2]}
    # what a tree of ``total`` nodes keeps from the union of both, by score
    pool = {**head_pool(head, token_ids, hidden, depth=3, top_k=3), **chain}
    assert len(tree) <= total
    kept = sorted(pool.items(), key=lambda kv: (-kv[1], len(kv[0])))[:total]
    assert set(got) == {path for path, _ in kept}
    for path, score in got.items():
        assert score == pytest.approx(pool[path], abs=1e-5)
    assert (outside,) in got  # outside the draft vocabulary, yet drafted
    if total >= 3:
        assert (outside, 7, 8) in got
    assert set(got) != set(head_paths)
    tree.validate(VOCAB)
    depth_order = tree.depths()
    assert depth_order == sorted(depth_order)


def test_a_chain_the_head_also_drafted_is_merged_not_repeated(target):  # noqa: F811
    head = make_head(target, seed=5)
    hidden = features(6, 64, seed=3)

    def context(first):  # "22 23" went on "first, 99" earlier
        return [22, 23, first, 99, 5, 22, 23]

    # a first chain token the head drafts too, at the root
    best = next(x for x in range(VOCAB) if (x,) in head_pool(head, context(x), hidden, depth=2, top_k=2))
    token_ids = context(best)
    pool = head_pool(head, token_ids, hidden, depth=2, top_k=2)
    session = DraftSession(head)
    session.start(token_ids, hidden)
    tree = session.propose(TreeShape(depth=2, top_k=2, total_tokens=256, context_ngram=True))
    got = paths(tree)
    for siblings in tree.children():  # no path twice: siblings never repeat a token
        tokens = [tree.token_ids[i] for i in siblings]
        assert len(tokens) == len(set(tokens))
    step = chain_scores(2, 2)
    assert got[(best,)] == pytest.approx(max(pool[(best,)], step[0]), abs=1e-5)
    assert got[(best, 99)] == pytest.approx(max(pool.get((best, 99), -math.inf), step[1]), abs=1e-5)
    assert set(got) == set(pool) | {(best, 99)}


@pytest.mark.parametrize("context_ngram", [False, True])
def test_the_session_counts_what_the_context_branch_drafted_and_got_accepted(target, context_ngram):  # noqa: F811
    head = make_head(target, seed=2)
    outside = next(t for t in range(VOCAB) if not head.t2d[t])
    token_ids = [11, 12, 13, outside, 7, 8, 40, 41, 11, 12, 13]
    hidden = features(len(token_ids) + 2, 64, seed=1)
    session = DraftSession(head)
    session.start(token_ids, hidden[: len(token_ids) - 1])
    tree = session.propose(TreeShape(depth=3, top_k=3, total_tokens=8, context_ngram=context_ngram))
    chain_nodes = tree.path([outside, 7, 8])
    assert len(chain_nodes) == (3 if context_ngram else 0)
    # the head proposes none of them: outside its vocabulary, and (7, 8) below that
    assert session.context_counts.drafted == len(chain_nodes)
    # the verifier accepted "outside, 7", then its bonus token 99
    session.extend([outside, 7, 99], features(3, 64, seed=2))
    assert session.context_counts.accepted == (2 if context_ngram else 0)
