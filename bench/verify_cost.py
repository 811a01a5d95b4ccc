"""What a draft tree's verification forward costs, by its number of new tokens, on the
stock target and on the target as the engine tunes it (aerie_verifier.cpu_kernels: the
layers it reads from packed weights, and the row counts it pads, timed on this machine,
are printed and recorded).

A tree of N nodes is one forward of N+1 new tokens (the root and the nodes) over a KV
cache; the 1-token row is the plain decoding step. Both copies of the target run
interleaved on the same prefix, so machine noise falls on both alike; each cell is the
median of ``--repeats`` forwards. Also checks that both copies pick the same argmax on
every row.

    python -m bench.verify_cost                       # 200 tokens of context
    python -m bench.verify_cost --context 800 --sizes 1 5 9 13 17
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections import Counter
from pathlib import Path

import torch
from aerie_common.cpu_linear import PaddedRowsLinear
from aerie_common.model_store import load_target
from aerie_common.packed_weights import PackedLinear
from aerie_common.settings import ModelSettings
from aerie_verifier.cpu_kernels import speed_up_tree_verification
from aerie_verifier.kv_cache import GrowingCache
from aerie_verifier.tree_cost import bushy_tree
from aerie_verifier.tree_verify import tree_inputs

from bench.results_json import write_results

ROOT = Path(__file__).resolve().parents[1]


def timed_forward(model, prefix_cache, context: int, new_tokens: int):
    cache = copy.deepcopy(prefix_cache)
    if new_tokens == 1:  # the engine's plain step
        kwargs = {"input_ids": torch.tensor([[7]]), "logits_to_keep": 1}
    else:
        kwargs = tree_inputs(
            7, bushy_tree(new_tokens - 1), context, model.config, "cpu", torch.float32
        ).model_kwargs()
    started = time.perf_counter()
    logits = model(past_key_values=cache, **kwargs).logits
    return time.perf_counter() - started, logits[0].argmax(-1)


def measure(stock, tuned, context: int, sizes: list[int], repeats: int) -> list[dict]:
    """One row per size: median ms of each copy, their ratio, the tuned forward in plain
    steps (when size 1 is measured), and whether the copies' argmax ever differed."""
    models = {"stock": stock, "tuned": tuned}
    prefix = torch.randint(
        100, stock.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(0)
    )
    seconds = {(name, n): [] for name in models for n in sizes}
    argmax_differs = dict.fromkeys(sizes, False)
    with torch.inference_mode():
        caches = {}
        for name, model in models.items():
            caches[name] = GrowingCache()  # as the engine keeps a request's (lean_forward.py)
            model(prefix, past_key_values=caches[name])
        for _ in range(repeats):
            for n in sizes:
                picks = {}
                for name, model in models.items():
                    dt, picks[name] = timed_forward(model, caches[name], context, n)
                    seconds[(name, n)].append(dt)
                argmax_differs[n] |= not torch.equal(picks["stock"], picks["tuned"])
    plain_ms = 1000 * statistics.median(seconds[("tuned", 1)]) if 1 in sizes else None
    rows = []
    for n in sizes:
        stock_ms = 1000 * statistics.median(seconds[("stock", n)])
        tuned_ms = 1000 * statistics.median(seconds[("tuned", n)])
        rows.append(
            {
                "new_tokens": n,
                "stock_ms": round(stock_ms, 2),
                "tuned_ms": round(tuned_ms, 2),
                "tuned_over_stock": round(tuned_ms / stock_ms, 3),
                "tuned_in_plain_steps": round(tuned_ms / plain_ms, 3) if plain_ms else None,
                "argmax_differs": argmax_differs[n],
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--context", type=int, default=200, help="tokens already in the KV cache")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 3, 5, 7, 9, 13, 17])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "verify_cost.json")
    args = parser.parse_args()

    settings = ModelSettings()
    stock, _, _ = load_target(settings)
    tuned, _, _ = load_target(settings)
    speed_up_tree_verification(tuned)
    padding = {
        "x".join(map(str, m.weight.shape)): {
            rows: f"{kernel} x{padded}" for rows, (kernel, padded) in m.plan.items()
        }
        for m in tuned.modules()
        if isinstance(m, PaddedRowsLinear)
    }
    packed = Counter(m.packed.format for m in tuned.modules() if isinstance(m, PackedLinear))
    rows = measure(stock, tuned, args.context, args.sizes, args.repeats)
    print(f"linear layers read from packed weights, by format: {dict(packed) or 'none'}")
    print(f"row counts multiplied another way, by weight shape (rows: kernel x rows): {padding or 'none'}")
    print(f"{args.context} tokens of context, {torch.get_num_threads()} threads, medians of {args.repeats}")
    print("new tokens | stock ms | tuned ms | tuned/stock | tuned in plain steps | argmax differs")
    for r in rows:
        steps = f"{r['tuned_in_plain_steps']:.2f}" if r["tuned_in_plain_steps"] else "-"
        print(
            f"{r['new_tokens']:10d} | {r['stock_ms']:8.1f} | {r['tuned_ms']:8.1f} | "
            f"{r['tuned_over_stock']:11.2f} | {steps:>20} | {r['argmax_differs']}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "context": args.context,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "packed_layers": dict(packed),
        "padding": padding,
        "rows": rows,
    }
    write_results(args.out, record)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
