"""Where a decoding step's time goes, op by op: torch.profiler over the verifier's engine
decoding one MT-bench question plainly and with the head in-process, as the services run
them (on a GPU: on a KV cache slot whose steps replay CUDA graphs, the head growing its
trees as graph replays; AERIE_CUDA_GRAPHS).

`bench.speculative` says how fast each configuration decodes and splits a speculative step
into draft, hop and verification; this says which ops fill those milliseconds, and how
often a step waits for the device (a `.item()`/`.tolist()` read, a synchronisation, a copy
back to the host). It is meant for the short GPU slots (scripts/offline_gpu/run.sh runs it
after the bench), so that what a step spends can be studied without the machine.

Each configuration runs once unprofiled (which captures its graphs) and once profiled. The
engine decodes on a thread of its own, so the profiler records every thread. Recording
each op costs host time (on the CPU a plain step took about 16 ms profiled against 10 to
12 unprofiled), so read the ops' shares and the waits, not the totals, as the speed.

    python -m bench.step_profile --out bench/results/step_profile.json
    python -m bench.step_profile --max-tokens 32 --trace /tmp/trace   # also Chrome traces
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from aerie_common.model_store import load_target
from aerie_common.settings import ModelSettings
from aerie_common.torch_threads import in_passing_thread
from aerie_drafter.loading import load_drafter_head
from aerie_drafter.proposer import draft_slots
from aerie_drafter.settings import DrafterSettings
from aerie_verifier.drafter_client import InProcessDrafterFactory
from aerie_verifier.engine import Engine, make_slots
from aerie_verifier.speculative import SpeculativeStats
from aerie_verifier.tree_cost import serving_tree
from torch.profiler import ProfilerActivity, profile

from bench.prompts import mtbench_questions
from bench.results_json import write_results
from bench.speculative import run_on_own_engine

CONFIGS = ("plain", "inprocess-head")
# Ops and runtime calls that make the host wait for the device, or copy to or from it.
HOST_WAITS = (
    "aten::_local_scalar_dense",  # .item(), .tolist() of a device tensor
    "cudaStreamSynchronize",
    "cudaDeviceSynchronize",
    "cudaEventSynchronize",
    "cudaMemcpyAsync",
    "cudaMemcpy",
)
TOP_OPS = 15

Generation = tuple[list[int], float, SpeculativeStats | None]


def recorded_everywhere() -> dict:
    """The profiler's settings that record ops on every thread, where this torch can."""
    try:
        from torch._C._profiler import _ExperimentalConfig

        return {"experimental_config": _ExperimentalConfig(profile_all_threads=True)}
    except (ImportError, TypeError):  # an older torch: the engine thread's ops go unseen
        return {}


def self_time_ms(event, device: bool) -> float:
    """An op's own time in ms: on the device, or on the host."""
    if device:  # torch < 2.4 named it for CUDA
        micros = getattr(event, "self_device_time_total", None)
        if micros is None:
            micros = getattr(event, "self_cuda_time_total", 0.0)
    else:
        micros = event.self_cpu_time_total
    return micros / 1000


def profile_generation(
    generate: Callable[[], Generation], on_device: bool, trace: Path | None = None
) -> dict:
    """Run ``generate`` under the profiler: its tokens, seconds and forwards (one a step:
    the prefill, then a plain step per token or a tree verification per draft), the ops
    that took most time (on the device where there is one) and the host waits per forward."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_device else [])
    with profile(activities=activities, **recorded_everywhere()) as prof:
        tokens, seconds, stats = generate()
    if trace is not None:
        prof.export_chrome_trace(str(trace))
    forwards = 1 + (stats.drafts if stats is not None and stats.drafts else len(tokens) - 1)
    events = prof.key_averages()
    ranked = sorted(events, key=lambda e: self_time_ms(e, on_device), reverse=True)
    return {
        "tokens": len(tokens),
        "seconds": round(seconds, 4),
        "forwards": forwards,
        "ms_per_forward": round(1000 * seconds / forwards, 3),
        "mean_acceptance_length": round(stats.mean_acceptance_length, 3)
        if stats is not None and stats.drafts
        else None,
        "top_ops": [
            {
                "op": e.key,
                "calls_per_forward": round(e.count / forwards, 2),
                "self_ms_per_forward": round(self_time_ms(e, on_device) / forwards, 4),
                "self_host_ms_per_forward": round(self_time_ms(e, False) / forwards, 4),
            }
            for e in ranked[:TOP_OPS]
        ],
        "host_waits_per_forward": {
            e.key: round(e.count / forwards, 2) for e in events if e.key in HOST_WAITS
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--question", type=int, default=0, help="which MT-bench question (first turn)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--head", default="", help="EAGLE head directory (default: the shipped one)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/step_profile.json"))
    parser.add_argument("--trace", type=Path, help="also write a Chrome trace per configuration here")
    args = parser.parse_args()

    settings = ModelSettings()
    model, tokenizer, _ = in_passing_thread(load_target, settings)
    shape = in_passing_thread(serving_tree, model, context_ngram=DrafterSettings().draft_tree_context_ngram)
    head, origin = in_passing_thread(
        load_drafter_head,
        settings.target_model,
        settings.model_cache,
        args.head,
        dtype=DrafterSettings().drafter_dtype,
    )
    question = mtbench_questions()[args.question]
    # an engine never started encodes it, as the bench's do
    prompt = Engine(model, tokenizer, max_running=1).encode_chat(
        [{"role": "user", "content": question["turns"][0]}]
    )
    on_device = model.device.type == "cuda"
    longest = len(prompt) + args.max_tokens + 64
    slots = make_slots(model, 1, longest) if on_device else []
    factories = {
        "plain": None,
        "inprocess-head": InProcessDrafterFactory(head, shape, draft_slots(head, on_device, longest)),
    }
    if args.trace is not None:
        args.trace.mkdir(parents=True, exist_ok=True)

    results = {}
    for name in CONFIGS:

        def generate(name=name) -> Generation:
            return run_on_own_engine(
                model, tokenizer, factories[name], prompt, args.max_tokens, name != "plain", slots=slots
            )

        generate()  # captures this configuration's graphs, off the record
        trace = args.trace / f"{name}.json" if args.trace is not None else None
        results[name] = profile_generation(generate, on_device, trace)
    write_results(
        args.out,
        {
            "device": str(model.device),
            "dtype": str(model.dtype).removeprefix("torch."),
            "cuda_graphs": bool(slots) and all(slot.graphs.enabled for slot in slots),
            "head": origin,
            "tree": vars(shape),
            "question": {"id": question.get("question_id"), "category": question.get("category")},
            "max_tokens": args.max_tokens,
            "configs": results,
        },
    )
    print_tables(results, on_device)


def print_tables(results: dict, on_device: bool) -> None:
    for name, result in results.items():
        print(
            f"\n{name}: {result['tokens']} tokens in {result['seconds']} s, {result['forwards']} forwards, "
            f"{result['ms_per_forward']} ms a forward; host waits a forward: {result['host_waits_per_forward']}\n"
        )
        if on_device:
            print(
                "| op | calls a forward | own device ms a forward | own host ms a forward |\n|---|---:|---:|---:|"
            )
        else:
            print("| op | calls a forward | own ms a forward |\n|---|---:|---:|")
        for op in result["top_ops"]:
            times = [op["self_ms_per_forward"]] + ([op["self_host_ms_per_forward"]] if on_device else [])
            print(f"| {op['op']} | {op['calls_per_forward']} | " + " | ".join(map(str, times)) + " |")


if __name__ == "__main__":
    main()
