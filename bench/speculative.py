"""Speculative decoding against its peers, in one run on the same MT-bench prompts
(temperature 0), interleaved per prompt so that machine noise falls on every
configuration alike:

    hf-generate       Hugging Face generate(), plain greedy, the baseline
    hf-prompt-lookup  Hugging Face assisted generation with prompt lookup
                      (prompt_lookup_num_tokens), the peer a user tries first
    plain             the verifier's engine without speculation
    inprocess-head    EAGLE head inside the verifier (no hop)
    grpc-head         EAGLE head in the drafter service, over the DraftSession stream
    grpc-head-guarded the same with the verifier's default pace guard, which drops a
                      request's speculation once it measures slower than plain decoding,
                      and, once recent requests' speculation has, starts requests plainly
                      but for a probe now and then (one guard for every prompt of the row,
                      as one serving verifier has)
    inprocess-oracle  a drafter that knows the plain output: every draft is accepted
    grpc-oracle       the same oracle behind the real Drafter gRPC service
    inprocess-head-context-off (or -on)
                      the head in-process with the context branch the other way from
                      AERIE_DRAFT_TREE_CONTEXT_NGRAM (aerie_drafter.context_ngram)

On a GPU the engines decode on fixed-size KV cache slots whose steps replay CUDA graphs,
and the head grows its trees as graph replays, as the services do there (AERIE_CUDA_GRAPHS),
and two more rows run without any graphs: plain-eager and inprocess-head-eager. The graphs are captured before
the clock starts: the slot's for every tree size up front, the rest in a warm-up generation per configuration
(--no-cuda-graphs: none of this). The results say whether a capture failed (cuda_graphs_failed).

Each generation runs on a thread that ends with it (an engine of its own, stopped after;
Hugging Face's generate() on a passing thread), as a service process runs its torch work
on one thread: idle threads holding OpenMP teams would slow every forward in the process
(aerie_common.torch_threads). The drafter rows' drafter services are processes of their
own, as they are when served.

The oracle shows the ceiling (mean acceptance length = depth + 1) and the pure cost of
capture, tree verification and the hop; the head rows show a real head. Every output is
checked token for token against plain decoding (the Hugging Face rows too: same model,
same greedy rule); one that differs must part from it at a numerical tie of the target's
(bench.lossless), else the bench fails.

    python -m bench.speculative                       # the shipped head, one question per category
    python -m bench.speculative --head PATH --per-category 3 --chart docs/img/speculative.png
    python -m bench.speculative --trees 3/3/6 2/4/6   # also the head in-process with these
                                                      # tree shapes (depth/top-k/nodes)
    python -m bench.speculative --head-dtypes float32 # also the head in-process in fp32
    python -m bench.speculative --python-drafting     # also the head drafting in Python, not C++
                                                      # (the head rows: AERIE_DRAFTER_DTYPE)
    python -m bench.speculative --no-cuda-graphs      # on a GPU: every engine eager
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from aerie_common.draft_tree import MAX_TREE_NODES, DraftTree
from aerie_common.model_store import load_target
from aerie_common.settings import ModelSettings
from aerie_common.torch_threads import in_passing_thread
from aerie_drafter import native_draft
from aerie_drafter.eagle import default_capture_layers
from aerie_drafter.loading import UNTRAINED, load_drafter_head
from aerie_drafter.proposer import TreeShape, draft_slots
from aerie_drafter.settings import DrafterSettings
from aerie_verifier.drafter_client import GrpcDrafterFactory, InProcessDrafter, InProcessDrafterFactory
from aerie_verifier.engine import Engine, make_slots
from aerie_verifier.sampling import SamplingParams
from aerie_verifier.speculative import PaceGuard, SpeculativeStats
from aerie_verifier.tree_cost import serving_tree
from transformers import GenerationConfig

from bench.lossless import TIE_TOLERANCE, divergence_gap
from bench.prompts import mtbench_questions, select_questions
from bench.results_json import write_results

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = (
    "hf-generate",
    "hf-prompt-lookup",
    "plain",
    "inprocess-head",
    "grpc-head",
    "grpc-head-guarded",
    "inprocess-oracle",
    "grpc-oracle",
)
HF_CONFIGS = {"hf-generate": None, "hf-prompt-lookup": 10}  # -> prompt_lookup_num_tokens
# With CUDA graphs, these run without them, for comparison.
EAGER_CONFIGS = ("plain-eager", "inprocess-head-eager")


class OracleSession:
    """DraftSession's interface, proposing the next ``depth`` tokens of the known plain
    output as a chain. Costs nothing to run, so it isolates the machinery's cost."""

    def __init__(self, references: list[list[int]]):
        self.references = references
        self.tokens: list[int] = []
        self.reference: list[int] = []

    def start(self, token_ids, hidden) -> None:
        self.tokens = list(token_ids)
        n = len(self.tokens)
        self.reference = next((r for r in self.references if r[:n] == self.tokens), [])

    def extend(self, token_ids, hidden) -> None:
        self.tokens.extend(token_ids)

    def propose(self, shape: TreeShape) -> DraftTree:
        n = len(self.tokens)
        on_track = self.reference[:n] == self.tokens
        chain = self.reference[n : n + shape.depth] if on_track else []
        return DraftTree(chain, list(range(-1, len(chain) - 1)), [0.0] * len(chain))

    def close(self) -> None:
        pass


class OracleFactory:
    def __init__(self, references, layer_ids, shape):
        self.references, self.layer_ids, self.shape = references, layer_ids, shape

    def capture_layer_ids(self):
        return self.layer_ids  # captured and shipped like a real head's, for a fair cost

    def open(self, request_id):
        return InProcessDrafter(OracleSession(self.references), self.shape)

    def forget(self):
        pass


def parse_tree_shape(text: str) -> TreeShape:
    """'depth/top_k/nodes', as --trees takes it."""
    try:
        depth, top_k, nodes = (int(part) for part in text.split("/"))
        return TreeShape(depth, top_k, nodes)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"tree shape {text!r}: want depth/top-k/nodes, {exc}") from None


def tree_row_name(shape: TreeShape) -> str:
    return f"inprocess-head-{shape.depth}/{shape.top_k}/{shape.total_tokens}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_drafter_process(
    head: str, oracle_file: Path | None, cuda_graphs: bool
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {
        **os.environ,
        "AERIE_DRAFTER_PORT": str(port),
        "AERIE_DRAFTER_HEAD": head,
        "AERIE_LOG_LEVEL": "WARNING",
        "AERIE_CUDA_GRAPHS": str(cuda_graphs).lower(),
    }
    if oracle_file is None:
        command = [sys.executable, "-m", "aerie_drafter"]
    else:
        command = [sys.executable, "-m", "bench.oracle_drafter", str(oracle_file)]
    proc = subprocess.Popen(command, env=env, cwd=ROOT)
    factory = GrpcDrafterFactory(f"127.0.0.1:{port}", TreeShape(1, 1, 1))
    deadline = time.monotonic() + 120
    while True:
        try:
            factory.info(timeout_s=1.0)
            break
        except Exception:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("drafter process did not start") from None
            time.sleep(0.5)
    factory.channel.close()
    return proc, f"127.0.0.1:{port}"


@dataclass
class Tally:
    tokens: int = 0
    seconds: float = 0.0
    # per output differing from plain decoding: the logit gap where it parted (bench.lossless)
    divergence_gaps: list[float] = field(default_factory=list)
    speculation: SpeculativeStats = field(default_factory=SpeculativeStats)  # summed over requests
    requests_speculating: int = 0  # that drafted at all (a guard may start a request plainly)

    def add_speculation(self, stats: SpeculativeStats) -> None:
        self.speculation.merge(stats)
        self.requests_speculating += 1

    def step_ms(self, all_speculative: bool) -> dict | None:
        """Where a speculative step's time goes: drafting and hop per tree, verification per
        tree verified, and the whole step: the requests' time over their steps, so it also
        carries prefill and bookkeeping; only where every token came from speculation."""
        spec = self.speculation
        if not spec.drafts:
            return None
        return {
            "draft": round(1000 * spec.draft_seconds / spec.trees, 2),
            "hop": round(1000 * spec.hop_seconds / spec.trees, 2),
            "verify": round(1000 * spec.verify_seconds / spec.drafts, 2),
            "step": round(1000 * self.seconds / spec.drafts, 2) if all_speculative else None,
        }

    def row(self, name: str, plain_tps: float, hf_tps: float, tie_tolerance: float) -> dict:
        tps = self.tokens / self.seconds
        spec = self.speculation
        return {
            "config": name,
            "tokens": self.tokens,
            "requests_speculating": self.requests_speculating,
            "tokens_per_s": round(tps, 2),
            "speedup_vs_plain": round(tps / plain_tps, 3),
            "speedup_vs_hf_generate": round(tps / hf_tps, 3),
            "mean_acceptance_length": round(spec.mean_acceptance_length, 3) if spec.drafts else None,
            "acceptance_by_position": [round(c / spec.drafts, 3) for c in spec.accepted_per_position]
            if spec.drafts
            else [],
            "outputs_differing_from_plain": len(self.divergence_gaps),
            "largest_gap_at_divergence": round(max(self.divergence_gaps), 4)
            if self.divergence_gaps
            else None,
            "divergences_beyond_tie_tolerance": sum(gap > tie_tolerance for gap in self.divergence_gaps),
            "ms_per_step": self.step_ms(all_speculative=not name.endswith("-guarded")),
        }


def run_once(engine: Engine, prompt_ids: list[int], max_tokens: int, speculative: bool):
    done, tokens, final = threading.Event(), [], []

    def on_event(event):
        tokens.extend(event.token_ids)
        if event.finish_reason is not None:
            final.append(event)
            done.set()

    started = time.perf_counter()
    engine.submit(
        "bench", prompt_ids, SamplingParams(max_tokens=max_tokens), on_event, speculative=speculative
    )
    if not done.wait(600):
        raise TimeoutError("generation did not finish")
    if final[0].error is not None:
        raise RuntimeError(final[0].error)
    return tokens, time.perf_counter() - started, final[0].speculative


def run_on_own_engine(
    model,
    tokenizer,
    factory,
    prompt_ids: list[int],
    max_tokens: int,
    speculative: bool,
    guard: PaceGuard | None = None,
    slots=(),
):
    """``run_once`` on an engine started for it and stopped after, so no engine thread
    outlives its generation. A guarded engine calibrates the plain step again before the
    clock starts; what ``guard`` measured of speculation carries over from the engines
    before. The engines of one run share ``slots`` and their captured graphs."""
    if guard is not None:
        guard.plain_batch_s.clear()  # this engine's calibration refills it
    engine = Engine(model, tokenizer, max_running=1, drafter_factory=factory, pace_guard=guard, slots=slots)
    engine.start()
    try:
        while guard is not None and guard.plain_step_s is None:
            time.sleep(0.005)
        return run_once(engine, prompt_ids, max_tokens, speculative)
    finally:
        engine.stop()


def run_hf(model, prompt_ids: list[int], max_tokens: int, eos_ids, lookup: int | None):
    """Hugging Face generate() on the same prompt, greedy, on a passing thread; the tokens
    up to the first EOS (which the engine does not emit either) and the seconds taken."""
    return in_passing_thread(_generate_hf, model, prompt_ids, max_tokens, eos_ids, lookup)


def _generate_hf(model, prompt_ids: list[int], max_tokens: int, eos_ids, lookup: int | None):
    config = GenerationConfig(
        max_new_tokens=max_tokens,
        do_sample=False,
        eos_token_id=sorted(eos_ids),
        pad_token_id=min(eos_ids),
        prompt_lookup_num_tokens=lookup,
    )
    input_ids = torch.tensor([prompt_ids], device=model.device)
    started = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config
        )
    seconds = time.perf_counter() - started
    tokens = output[0, len(prompt_ids) :].tolist()
    end = next((i for i, t in enumerate(tokens) if t in eos_ids), len(tokens))
    return tokens[:end], seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=8, help="MT-bench questions (first turns), at most")
    parser.add_argument(
        "--per-category",
        type=int,
        default=1,
        help="the first N questions of each of MT-bench's 8 categories (0: the first --prompts "
        "questions, which are all 'writing')",
    )
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument(
        "--head", default="", help='EAGLE head directory, or "untrained" (default: the shipped head)'
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "speculative.json")
    parser.add_argument("--chart", type=Path, default=None, help="also draw the results as this PNG")
    parser.add_argument(
        "--trees",
        nargs="*",
        type=parse_tree_shape,
        default=[],
        metavar="D/K/N",
        help="more inprocess-head rows, one per tree shape (depth/top-k/nodes)",
    )
    parser.add_argument(
        "--head-dtypes",
        nargs="*",
        default=[],
        choices=["float32", "bfloat16", "float16", "int8"],
        help="more inprocess-head rows, the head in each of these dtypes (the head rows take "
        "AERIE_DRAFTER_DTYPE, auto by default)",
    )
    parser.add_argument(
        "--python-drafting",
        action="store_true",
        help="one more inprocess-head row, the head drafting in Python where it would draft in C++ "
        "(aerie_drafter.native_draft), so the two compare side by side",
    )
    parser.add_argument(
        "--tie-tolerance",
        type=float,
        default=None,
        help="the largest logit gap at which an output may part from plain decoding, as numerical "
        "noise (default: bench.lossless.TIE_TOLERANCE for the target's dtype; 0 requires identical outputs)",
    )
    parser.add_argument(
        "--no-cuda-graphs",
        action="store_true",
        help="on a GPU, run every engine eagerly (default: on CUDA graph slots, plus eager rows)",
    )
    args = parser.parse_args()
    logging.basicConfig(format="%(message)s")
    logging.getLogger("aerie_verifier.tree_cost").setLevel(logging.INFO)  # which tree, and why

    settings = ModelSettings()
    model, tokenizer, _ = in_passing_thread(load_target, settings)
    # The engines tune their model for tree verification (aerie_verifier.cpu_kernels), so
    # the Hugging Face rows run a stock copy of their own, as a user would.
    hf_model, _, _ = in_passing_thread(load_target, settings)
    device = str(model.device)
    # the verifier's: timed on this machine, with the context branch as configured
    shape = in_passing_thread(serving_tree, model, context_ngram=DrafterSettings().draft_tree_context_ngram)

    def load_head(dtype: str):
        return in_passing_thread(
            load_drafter_head, settings.target_model, settings.model_cache, args.head, dtype=dtype
        )

    head, origin = load_head(DrafterSettings().drafter_dtype)  # as the drafter processes read it
    questions = select_questions(mtbench_questions(), args.prompts, args.per_category or None)
    plain_engine = Engine(model, tokenizer, max_running=1)  # never started: encodes, names EOS
    prompts = [plain_engine.encode_chat([{"role": "user", "content": q["turns"][0]}]) for q in questions]
    graphed = model.device.type == "cuda" and not args.no_cuda_graphs
    # One slot, as long as the longest generation, shared by the engines one after another.
    longest = max(map(len, prompts)) + args.max_tokens + MAX_TREE_NODES + 1
    slots = make_slots(model, 1, longest) if graphed else []
    head_slots = draft_slots(head, graphed, longest)

    # The oracle needs the plain outputs first (also the reference for every check).
    print(f"plain reference outputs for {len(prompts)} prompts ...", flush=True)
    references = []
    for i, prompt in enumerate(prompts):
        tokens, seconds, _ = run_on_own_engine(
            model, tokenizer, None, prompt, args.max_tokens, False, slots=slots
        )
        references.append(tokens)
        print(f"  reference {i + 1}/{len(prompts)}: {len(tokens)} tokens in {seconds:.2f} s", flush=True)
    oracle_file = args.out.with_suffix(".oracle.json")
    oracle_file.parent.mkdir(parents=True, exist_ok=True)
    oracle_file.write_text(json.dumps([p + r for p, r in zip(prompts, references, strict=True)]))
    layer_ids = default_capture_layers(model.config.num_hidden_layers)

    processes = []
    try:
        # each stopped in the end even if a later one fails to start
        head_proc, head_addr = start_drafter_process(args.head, None, graphed)
        processes.append(head_proc)
        oracle_proc, oracle_addr = start_drafter_process(UNTRAINED, oracle_file, graphed)
        processes.append(oracle_proc)
        factories = {
            "plain": None,
            "inprocess-head": InProcessDrafterFactory(head, shape, head_slots),
            "grpc-head": GrpcDrafterFactory(head_addr, shape),
            "grpc-head-guarded": GrpcDrafterFactory(head_addr, shape),
            "inprocess-oracle": OracleFactory(json.loads(oracle_file.read_text()), layer_ids, shape),
            "grpc-oracle": GrpcDrafterFactory(oracle_addr, shape),
        }
        # the head with the context branch the other way, side by side
        other = replace(shape, context_ngram=not shape.context_ngram)
        extra_rows = {f"inprocess-head-context-{'on' if other.context_ngram else 'off'}": other}
        extra_rows.update(
            {tree_row_name(extra): replace(extra, context_ngram=shape.context_ngram) for extra in args.trees}
        )
        factories.update(
            {name: InProcessDrafterFactory(head, extra, head_slots) for name, extra in extra_rows.items()}
        )
        dtype_rows = {f"inprocess-head-{dtype}": dtype for dtype in args.head_dtypes}
        factories.update(
            {name: InProcessDrafterFactory(load_head(dtype)[0], shape) for name, dtype in dtype_rows.items()}
        )
        python_rows = ["inprocess-head-python-drafting"] if args.python_drafting else []
        for name in python_rows:  # the same head, loaded again, without its C++ drafting
            python_head = load_head(DrafterSettings().drafter_dtype)[0]
            native_draft.detach(python_head)
            factories[name] = InProcessDrafterFactory(python_head, shape)
        eager_rows = EAGER_CONFIGS if graphed else ()
        factories.update({"plain-eager": None, "inprocess-head-eager": InProcessDrafterFactory(head, shape)})
        configs = [*CONFIGS, *eager_rows, *extra_rows, *dtype_rows, *python_rows]
        tallies = {name: Tally() for name in configs}
        guards = {name: PaceGuard() for name in configs if name.endswith("-guarded")}

        def run_engine(name, prompt, max_tokens):
            return run_on_own_engine(
                model,
                tokenizer,
                factories[name],
                prompt,
                max_tokens,
                speculative=name not in ("plain", "plain-eager"),
                guard=guards.get(name),
                slots=[] if name in eager_rows else slots,
            )

        if graphed:  # capture every configuration's graphs (tree sizes differ) off the clock
            largest_tree = max(extra.total_tokens for extra in [shape, *extra_rows.values()])
            for slot in slots:  # every row bucket: trees vary in size from step to step
                slot.warm(largest_tree, layer_ids)
            for name in configs:
                if name not in HF_CONFIGS:
                    run_engine(name, prompts[0], min(args.max_tokens, 16))
        for i, (prompt, reference) in enumerate(zip(prompts, references, strict=True)):
            # Rotate the order per prompt, so no configuration always runs first.
            order = configs[i % len(configs) :] + configs[: i % len(configs)]
            took = {}  # seconds by configuration, printed: a slot's log then shows which one stalled
            for name in order:
                if name in HF_CONFIGS:
                    stats = None
                    tokens, seconds = run_hf(
                        hf_model, prompt, args.max_tokens, plain_engine.eos_ids, HF_CONFIGS[name]
                    )
                else:
                    tokens, seconds, stats = run_engine(name, prompt, args.max_tokens)
                took[name] = seconds
                tally = tallies[name]
                tally.tokens += len(tokens)
                tally.seconds += seconds
                if tokens != reference:
                    gap = in_passing_thread(
                        divergence_gap, hf_model, prompt, reference, tokens, plain_engine.eos_ids
                    )
                    tally.divergence_gaps.append(gap)
                if stats is not None and stats.drafts:
                    tally.add_speculation(stats)
            seconds_taken = ", ".join(f"{name} {took[name]:.2f}" for name in configs)
            print(f"  prompt {i + 1}/{len(prompts)} done (s: {seconds_taken})", flush=True)
    finally:
        for proc in processes:
            proc.terminate()
            proc.wait(30)

    plain_tps = tallies["plain"].tokens / tallies["plain"].seconds
    hf_tps = tallies["hf-generate"].tokens / tallies["hf-generate"].seconds
    tie_tolerance = args.tie_tolerance if args.tie_tolerance is not None else TIE_TOLERANCE[model.dtype]
    rows = [tallies[name].row(name, plain_tps, hf_tps, tie_tolerance) for name in configs]
    result = {
        "device": device,
        "dtype": str(model.dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "cuda_graphs": graphed,
        # a capture that failed turned graphs off: those rows then ran eagerly
        "cuda_graphs_failed": any(slot.graphs.failed for slot in slots)
        or bool(head_slots and head_slots.graphs_failed),
        "head": origin,
        "head_dtype": str(head.fc.weight.dtype).removeprefix("torch."),
        "tree": vars(shape),
        "prompts": len(prompts),
        "categories": sorted({q["category"] for q in questions}),
        "max_tokens": args.max_tokens,
        "tie_tolerance": tie_tolerance,
        "rows": rows,
    }
    write_results(args.out, result)
    if args.chart is not None:
        draw_chart(result, args.chart)
    print(
        f"\n{device} {result['dtype']}, head {origin} ({result['head_dtype']}), tree {shape}, {len(prompts)} MT-bench prompts, "
        f"max_tokens {args.max_tokens}\n"
    )
    print(
        "| config | tokens/s | vs HF generate | vs Aerie plain | mean acceptance length "
        "| outputs differing from plain | largest logit gap where they part |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        mal = row["mean_acceptance_length"] or "–"
        gap = row["largest_gap_at_divergence"]
        print(
            f"| {row['config']} | {row['tokens_per_s']} | {row['speedup_vs_hf_generate']:.2f}× "
            f"| {row['speedup_vs_plain']:.2f}× | {mal} | {row['outputs_differing_from_plain']} "
            f"| {'–' if gap is None else gap} |"
        )
    print("\nwhere a speculative step's time goes (ms; draft and hop per tree, verify per tree verified)\n")
    print("| config | draft | hop | verify | whole step |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        if ms := row["ms_per_step"]:
            print(f"| {row['config']} | {ms['draft']} | {ms['hop']} | {ms['verify']} | {ms['step'] or '–'} |")
    if result["cuda_graphs_failed"]:
        print("\nA CUDA graph capture failed (the log says why): the graphed rows ran eagerly.")
    if any(row["divergences_beyond_tie_tolerance"] for row in rows):
        sys.exit(
            f"an output parts from plain decoding where the target's two choices are more than "
            f"{tie_tolerance:g} logits apart: not a numerical tie"
        )
    if any(row["outputs_differing_from_plain"] for row in rows):
        print(
            f"\nEvery differing output parts from plain decoding at a numerical tie (within {tie_tolerance:g} logits)."
        )


def draw_chart(result: dict, path: Path) -> None:
    """Three panels: tokens/s relative to Hugging Face generate() per configuration; the
    fraction of verification steps accepting at least d drafted tokens, per speculative
    configuration; and where a speculative step's time goes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, (speed, depth, parts) = plt.subplots(1, 3, figsize=(18, 4.5))
    names = [row["config"] for row in rows]
    ratios = [row["speedup_vs_hf_generate"] for row in rows]
    bars = speed.barh(names[::-1], ratios[::-1], color="tab:blue")
    speed.bar_label(bars, labels=[f"{r:.2f}×" for r in ratios[::-1]], padding=3)
    speed.axvline(1.0, color="grey", linewidth=0.8, linestyle="--")
    speed.set_xlabel("tokens/s relative to Hugging Face generate()")
    speed.set_title(
        f"{result['prompts']} MT-bench prompts, {result['max_tokens']} new tokens, "
        f"{result['device']} {result.get('dtype', '')}"
    )
    for row in rows:  # (a guarded row's steps are the first few of each request only)
        if row["acceptance_by_position"] and not row["config"].endswith("-guarded"):
            by_depth = row["acceptance_by_position"]
            depth.plot(range(1, len(by_depth) + 1), by_depth, marker="o", label=row["config"])
    depth.set_xlabel("draft depth d")
    depth.xaxis.get_major_locator().set_params(integer=True)
    depth.set_ylabel("steps accepting ≥ d drafts")
    depth.set_ylim(0, 1.05)
    depth.set_title(f"acceptance by depth, head {Path(result['head']).name}")
    depth.legend()
    timed = [row for row in rows if row.get("ms_per_step") and row["ms_per_step"]["step"]]
    left = [0.0] * len(timed)
    for part, color in (("draft", "tab:orange"), ("hop", "tab:red"), ("verify", "tab:blue")):
        widths = [row["ms_per_step"][part] for row in timed]
        parts.barh([row["config"] for row in timed], widths, left=left, color=color, label=part)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    rest = [row["ms_per_step"]["step"] - done for row, done in zip(timed, left, strict=True)]
    parts.barh([row["config"] for row in timed], rest, left=left, color="lightgrey", label="the rest")
    parts.invert_yaxis()
    parts.set_xlabel("ms per verification step")
    parts.set_title("where a speculative step's time goes")
    parts.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
