"""Is a speculative output that differs from plain decoding still lossless?

In exact arithmetic greedy speculative decoding emits the target's own argmax at every
step. In floating point the tree forward and the one-token forward sum in other orders,
so where the target's two best tokens are nearly tied the two decodes may pick different
ones, and from there they go apart. That is the target's own indifference, not a drafter
leaking into the output: Hugging Face's generate() differs from itself the same way when
it runs prompt lookup.

The check, per differing output: at the first token where the two outputs part, a plain
forward over the prefix they share gives the target's logits, and the gap between the
logits of the two tokens chosen there must lie within the dtype's numerical noise
(``TIE_TOLERANCE``). A drafter that changed the output would show a gap of whole logits.

``python -m bench.lossless`` measures that noise for the configured target and dtype: the
largest difference between a full forward's logits and those of incremental decoding of
the same tokens (on a 2-core Xeon, SmolLM2-135M over 3 MT-bench prompts of 48 tokens:
below 1e-4 in float32; up to 1.31 in bfloat16, whose argmax then differs at up to 8% of
the positions).
"""

from __future__ import annotations

import argparse

import torch

# Logit gaps at a divergence that count as a numerical tie: about ten times the noise
# measured above for float32, and about 1.5 times the largest seen for bfloat16 (float16
# keeps 3 more mantissa bits).
TIE_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 2.0, torch.float16: 0.5}


def first_divergence(reference: list[int], output: list[int]) -> int | None:
    """The first position where ``output`` leaves ``reference`` (one ending before the
    other counts), or None where they are equal."""
    if output == reference:
        return None
    return next(
        (i for i, (a, b) in enumerate(zip(reference, output, strict=False)) if a != b),
        min(len(reference), len(output)),
    )


@torch.inference_mode()
def divergence_gap(model, prompt: list[int], reference: list[int], output: list[int], eos_ids) -> float:
    """The absolute difference between the target's logits for the two tokens chosen at
    the first divergence, from a forward over the prompt and the shared prefix. An output
    that ended there chose an end token (the likelier of ``eos_ids``)."""
    at = first_divergence(reference, output)
    if at is None:
        return 0.0
    ids = torch.tensor([prompt + reference[:at]], device=model.device)
    logits = model(input_ids=ids).logits[0, -1].float()
    eos = max(eos_ids, key=lambda token: logits[token].item())

    def chosen(tokens: list[int]) -> int:
        return tokens[at] if at < len(tokens) else eos

    return abs(logits[chosen(reference)] - logits[chosen(output)]).item()


@torch.inference_mode()
def incremental_noise(model, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """Greedy-decode ``new_tokens`` with a KV cache, then score the same tokens in one full
    forward: (largest logit difference between the two, fraction of positions whose argmax
    differs)."""
    ids = torch.tensor([prompt], device=model.device)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    incremental = torch.stack(out.logits, 1)[0].float()
    full = model(input_ids=out.sequences).logits[0, len(prompt) - 1 : -1].float()
    differing = (full.argmax(-1) != incremental.argmax(-1)).float().mean().item()
    return (full - incremental).abs().max().item(), differing


def main() -> None:
    from aerie_common.model_store import load_target
    from aerie_common.settings import ModelSettings

    from bench.prompts import mtbench_questions

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=3, help="MT-bench questions (first turns)")
    parser.add_argument("--new-tokens", type=int, default=48)
    args = parser.parse_args()
    model, tokenizer, _ = load_target(ModelSettings())
    print(
        f"{model.device} {str(model.dtype).removeprefix('torch.')}: tie tolerance {TIE_TOLERANCE[model.dtype]}"
    )
    for question in mtbench_questions()[: args.prompts]:
        messages = [{"role": "user", "content": question["turns"][0]}]
        prompt = list(
            tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
        )
        largest, differing = incremental_noise(model, prompt, args.new_tokens)
        print(
            f"question {question['question_id']}: largest logit difference {largest:.4g}, argmax differs at {differing:.1%}"
        )


if __name__ == "__main__":
    main()
