"""Structured outputs: constraints compiled with xgrammar, tree rows masked along their own
paths, and decoding that matches its constraint, plain or speculative, with the same text."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
import xgrammar
from aerie_common.draft_tree import DraftTree
from aerie_drafter.proposer import TreeShape
from aerie_verifier.drafter_client import InProcessDrafterFactory
from aerie_verifier.engine import Engine
from aerie_verifier.sampling import SamplingParams
from aerie_verifier.structured_output import GrammarCompiler, GrammarConstraint, StructuredOutput

from .spec_helpers import Factory, OracleDrafter, TargetTopKDrafter, request_events
from .test_speculative import VOCAB, random_head


@pytest.fixture(scope="module")
def target():
    from tests.conftest import build_tiny_llama

    return build_tiny_llama(VOCAB, seed=11, layers=8)


@pytest.fixture(scope="module")
def compiler(tiny_tokenizer):
    return GrammarCompiler(tiny_tokenizer, VOCAB, frozenset({tiny_tokenizer.eos_token_id}))


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize(
    ("kind", "spec", "says"),
    [
        ("xml", "<a/>", "kind"),
        ("json_object", "{}", "takes no"),
        ("regex", "", "needs a"),
    ],
)
def test_malformed_constraints_are_refused(kind, spec, says):
    with pytest.raises(ValueError, match=says):
        StructuredOutput(kind, spec)
    with pytest.raises(ValueError, match="at least one option"):
        StructuredOutput.choice([])


@pytest.mark.parametrize(
    ("structured", "says"),
    [
        (
            StructuredOutput("json_schema", '{"type": "nonsense"}'),
            'json schema does not compile: Unsupported type "nonsense"',
        ),
        (StructuredOutput("json_schema", "{not json"), "json schema does not compile"),
        (StructuredOutput("regex", "(ab"), "regex does not compile: .*parenthesis"),
        (StructuredOutput("grammar", "root ::= missing"), "grammar does not compile"),
    ],
)
def test_constraints_that_do_not_compile_say_why(compiler, structured, says):
    with pytest.raises(ValueError, match=says):
        compiler.compile(structured)


def test_a_choice_matches_its_options_exactly_whatever_they_hold(compiler, tiny_tokenizer):
    options = ['say "hi"', "back\\slash", "naïve\nline"]
    compiled = compiler.compile(StructuredOutput.choice(options))
    for option in options:
        matcher = xgrammar.GrammarMatcher(compiled)
        assert all(matcher.accept_token(token) for token in ids(tiny_tokenizer, option))
        assert matcher.is_completed()
    matcher = xgrammar.GrammarMatcher(compiled)
    assert not all(matcher.accept_token(token) for token in ids(tiny_tokenizer, "say hi"))


def allowed(tokenizer, compiled, path):
    """The tokens a fresh matcher allows after ``path``: the reference for one row."""
    matcher = xgrammar.GrammarMatcher(compiled)
    for token in path:
        assert matcher.accept_token(token)
    scores = torch.zeros(1, VOCAB)
    bitmask = xgrammar.allocate_token_bitmask(1, VOCAB)
    matcher.fill_next_token_bitmask(bitmask, 0)
    xgrammar.apply_token_bitmask_inplace(scores, bitmask)
    return scores[0] == 0


def test_tree_rows_are_masked_along_their_own_paths(compiler, tiny_tokenizer):
    compiled = compiler.compile(StructuredOutput("regex", r"(ab|ac)d[0-9]+"))
    constraint = GrammarConstraint(compiled, VOCAB)
    constraint.accept(ids(tiny_tokenizer, "a"))
    b, c, x, d = (ids(tiny_tokenizer, char)[0] for char in "bcxd")
    # root's children: b, c and x (which the grammar forbids, and its child d)
    tree = DraftTree(token_ids=[b, c, x, d, d], parents=[-1, -1, -1, 0, 2], scores=[0.0] * 5)
    scores = torch.zeros(6, VOCAB)
    constraint.mask(scores, tree)
    a = ids(tiny_tokenizer, "a")
    for row, path in enumerate([[], [b], [c], None, [b, d]]):
        if path is not None:
            assert torch.equal(scores[row] == 0, allowed(tiny_tokenizer, compiled, a + path)), row
    assert (scores[3] == 0).all()  # forbidden node x: its row is left alone
    assert (scores[0] == 0).sum() == 2  # b or c
    # the walk left the matcher where it was: after "a", "d" is still refused
    assert not constraint.matcher.accept_token(d)


def generate(engine, prompt, params, speculative):
    events = request_events(engine, prompt, params, speculative)
    return "".join(event.text for event in events), events[-1]


SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "size": {"enum": ["S", "M", "L"]}},
    "required": ["ok", "size"],
    "additionalProperties": False,
}


def valid_json(text: str, schema: dict) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return False
    return True


CONSTRAINTS = {
    "regex": (
        StructuredOutput("regex", r"[a-c]{3}-[0-9]{2}"),
        lambda text: re.fullmatch(r"[a-c]{3}-[0-9]{2}", text),
    ),
    "choice": (
        StructuredOutput.choice(["red", "green", "blue"]),
        lambda text: text in ("red", "green", "blue"),
    ),
    "json_schema": (
        StructuredOutput("json_schema", json.dumps(SCHEMA)),
        lambda text: valid_json(text, SCHEMA),
    ),
}


@pytest.mark.parametrize("name", CONSTRAINTS)
def test_decoding_matches_its_constraint_and_speculation_is_lossless(target, tiny_tokenizer, name):
    structured, matches = CONSTRAINTS[name]
    drafters = {
        "head": InProcessDrafterFactory(random_head(target), TreeShape(depth=3, top_k=3, total_tokens=8)),
        "branching": Factory(lambda: TargetTopKDrafter(target, top_k=3, levels=2)),
        "oracle": Factory(lambda: OracleDrafter(target, 4)),
    }
    engines = {
        name: Engine(target, tiny_tokenizer, drafter_factory=factory) for name, factory in drafters.items()
    }
    for engine in engines.values():
        engine.start()
    try:
        for prompt in ([5, 6, 7], [40, 41, 42, 43, 44]):
            params = SamplingParams(max_tokens=400, structured=structured)
            plain, final = generate(engines["head"], prompt, params, speculative=False)
            assert final.finish_reason == "stop" and matches(plain), plain
            unconstrained, _ = generate(
                engines["head"], prompt, SamplingParams(max_tokens=20), speculative=False
            )
            assert not matches(unconstrained)  # the constraint did the work
            for engine in engines.values():
                assert generate(engine, prompt, params, speculative=True)[0] == plain
        for seed in range(3):
            sampled, final = generate(
                engines["branching"],
                [5, 6, 7],
                SamplingParams(temperature=1.0, seed=seed, max_tokens=400, structured=structured),
                speculative=True,
            )
            assert final.finish_reason == "stop" and matches(sampled), sampled
    finally:
        for engine in engines.values():
            engine.stop()


def test_an_uncompilable_constraint_is_refused_at_submit(target, tiny_tokenizer):
    engine = Engine(target, tiny_tokenizer)
    with pytest.raises(ValueError, match="regex does not compile"):
        engine.submit("r", [5], SamplingParams(structured=StructuredOutput("regex", "[")), lambda event: None)


def test_the_gpus_plain_torch_masking_is_the_cpus(compiler, tiny_tokenizer):
    """GrammarConstraint masks GPU scores with xgrammar's plain-torch backend (its GPU
    kernels compile at first use); on the CPU's scores both must agree."""
    constraint = GrammarConstraint(compiler.compile(StructuredOutput("regex", r"[a-c]+[0-9]")), VOCAB)
    bitmask = xgrammar.allocate_token_bitmask(1, VOCAB)
    constraint.matcher.fill_next_token_bitmask(bitmask, 0)
    masked = {}
    for backend in ("cpu", "torch_native"):
        masked[backend] = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(0))
        xgrammar.apply_token_bitmask_inplace(masked[backend], bitmask, vocab_size=VOCAB, backend=backend)
    assert torch.equal(masked["cpu"], masked["torch_native"])
    assert torch.isfinite(masked["cpu"]).sum() == 3  # a, b or c


def test_a_tokenizer_xgrammar_cannot_index_is_a_clear_refusal(tiny_tokenizer, monkeypatch):
    def cannot(*args, **kwargs):
        raise RuntimeError("unsupported vocabulary")

    monkeypatch.setattr(xgrammar.TokenizerInfo, "from_huggingface", cannot)
    compiler = GrammarCompiler(tiny_tokenizer, VOCAB, frozenset({2}))
    with pytest.raises(ValueError, match="not available for this model's tokenizer: unsupported vocabulary"):
        compiler.compile(StructuredOutput("json_object"))
