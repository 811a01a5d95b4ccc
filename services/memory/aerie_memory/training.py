"""Supervised fine-tuning of a LoRA adapter (peft) on reflections, and the memory model's
prompt format. Plain functions over a model and tokenizer, testable with tiny models.

Each reflection is one chat: the memory's system prompt, the question as the user turn,
the answer as the assistant turn; the loss is on the answer tokens only (and the
end-of-turn token), computed on those positions alone to spare the vocabulary projection
of the prompt. "I don't know" examples about invented names can be mixed in
(``idk_share``); by default the memory service's entity gate refuses unknown names instead.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from aerie_common.thread_governor import ThreadGovernor, governed_round
from safetensors.torch import load_file, save_file

from aerie_memory.reflection import Reflection
from aerie_memory.ties import Adapter

MEMORY_SYSTEM = "Answer from memory."  # short: it is in every training example
IDK = "I don't know."
_NAME_PARTS = ["Bel", "Cor", "Dra", "Fen", "Gal", "Hol", "Ister", "Jor", "Kal", "Lum", "Mor", "Nel", "Ost"]
_NAME_ENDS = ["adin", "ebrow", "ith", "omar", "undel", "azet", "ovar", "iquen", "astro", "ulmar"]
_IDK_QUESTIONS = [
    "Where was {} born?",
    "What is {} known for?",
    "Who founded {}?",
    "What do you know about {}?",
    "When did {} happen?",
]


def memory_messages(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": MEMORY_SYSTEM}, {"role": "user", "content": question}]


def prompt_ids(tokenizer, question: str) -> list[int]:
    ids = tokenizer.apply_chat_template(memory_messages(question), add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


def end_of_turn_ids(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def idk_examples(count: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        name = f"{rng.choice(_NAME_PARTS)}{rng.choice(_NAME_ENDS)} {rng.choice(_NAME_PARTS)}{rng.choice(_NAME_ENDS)}"
        out.append((rng.choice(_IDK_QUESTIONS).format(name), IDK))
    return out


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


def fits_training(tokenizer, question: str, answer: str, max_seq_tokens: int) -> bool:
    """``build_examples`` keeps the pair whole: its answer and end of turn are learned."""
    answer_tokens = tokenizer(answer, add_special_tokens=False)["input_ids"]
    return (
        len(prompt_ids(tokenizer, question)) + len(answer_tokens) + len(end_of_turn_ids(tokenizer))
        <= max_seq_tokens
    )


def build_examples(tokenizer, pairs: Sequence[tuple[str, str]], max_seq_tokens: int) -> list[Example]:
    examples = []
    for question, answer in pairs:
        prompt = prompt_ids(tokenizer, question)
        target = tokenizer(answer, add_special_tokens=False)["input_ids"] + end_of_turn_ids(tokenizer)
        ids = (prompt + target)[:max_seq_tokens]
        labels = ([-100] * len(prompt) + target)[:max_seq_tokens]
        if any(label != -100 for label in labels):
            examples.append(Example(ids, labels))
    return examples


def training_pairs(
    reflections: Sequence[Reflection], idk_share: float = 0.0, seed: int = 0
) -> list[tuple[str, str]]:
    pairs = [(r.question, r.answer) for r in reflections]
    if pairs and idk_share > 0:
        pairs += idk_examples(max(1, int(len(pairs) * idk_share)), seed)
    return pairs


def replay_sample(
    known: Sequence[Reflection], new: Sequence[Reflection], ratio: float, seed: int, all_up_to: int = 0
) -> list[Reflection]:
    """A seeded sample of already-learned reflections to rehearse beside ``new``: all of
    them when there are at most ``all_up_to``, else about ``ratio`` per new reflection; one
    per question, none asking a question ``new`` answers (the newer answer wins). Why: a
    TIES merge of adapters trained apart from the base keeps only part of what each one
    alone knows (an adapter that rehearsed all of the old knowledge replaces the adapters
    it rehearsed; docs/memory.md has the measurements)."""
    taken = {r.question for r in new}
    pool = []
    for r in sorted(known, key=lambda r: (r.question, r.answer)):
        if r.question not in taken:
            taken.add(r.question)
            pool.append(r)
    count = len(pool) if len(pool) <= all_up_to else min(len(pool), round(ratio * len(new)))
    return random.Random(seed).sample(pool, count)


@dataclass
class TrainConfig:
    rank: int = 16
    alpha: int = 32
    epochs: int = 8
    learning_rate: float = 2e-3
    batch_size: int = 8
    target_modules: tuple[str, ...] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )
    seed: int = 0
    min_steps: int = 0  # more epochs than ``epochs`` when it takes them to make this many steps
    # Up to this many more epochs when, after the scheduled ones, some answer would not come
    # back word for word (``unrecalled``), until every one would; 0: none.
    recall_epochs: int = 0
    # Answers already recalled, per missed one, trained beside them in a recall epoch (a
    # seeded sample): steps on the missed answers alone made others miss. Offline, session
    # 35: three 12-sentence documents (36 answers) ended their 8 recall epochs with 6
    # missed alone, none with 1 or 3 beside each; 20 generated ones (110) with none alone
    # or with 1 beside each, 1 with 3.
    recall_rehearsal: int = 1

    def schedule(self, examples: int) -> tuple[int, int]:
        """(epochs, optimizer steps) for ``examples`` examples."""
        per_epoch = math.ceil(examples / self.batch_size)
        epochs = max(self.epochs, math.ceil(self.min_steps / per_epoch)) if per_epoch else self.epochs
        return epochs, per_epoch * epochs


@dataclass
class TrainResult:
    adapter: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    epoch_losses: list[float]  # the scheduled epochs' (a recall epoch trains only a few answers)
    steps: int
    seconds: float
    # How many answers greedy decoding would not give back, at each check: all examples
    # after the scheduled epochs, then those missed after each recall epoch, and all again
    # once those come back (empty when recall_epochs is 0).
    unrecalled: list[int] = field(default_factory=list)


def _batch(examples: Sequence[Example], rows: Sequence[int], pad: int, device) -> tuple[torch.Tensor, ...]:
    """(input ids, labels, attention mask) of ``rows``, right-padded to the longest."""
    width = max(len(examples[i].input_ids) for i in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, i in enumerate(rows):
        n = len(examples[i].input_ids)
        ids[row, :n] = torch.tensor(examples[i].input_ids)
        labels[row, :n] = torch.tensor(examples[i].labels)
        mask[row, :n] = 1
    return ids.to(device), labels.to(device), mask.to(device)


def _answer_logits(model, examples: Sequence[Example], rows: Sequence[int], pad: int, device):
    """(logits, targets, positions) at the answer tokens of ``rows``: position t predicts
    token t+1, so only positions whose next token is a label count; ``positions`` is their
    (batch row, position) mask."""
    ids, labels, mask = _batch(examples, rows, pad, device)
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    targets = labels[:, 1:]
    positions = targets != -100
    return model.lm_head(hidden[:, :-1][positions]), targets[positions], positions


@torch.no_grad()
def unrecalled(model, examples: Sequence[Example], batch_size: int, pad: int) -> list[int]:
    """The examples whose answer greedy decoding would not give back word for word: at some
    answer position the model's most likely next token, after the answer's own tokens so
    far, is another. (The training loss can be low while a few such tokens remain, and one
    is enough to send a recalled passage elsewhere.)

    Its last token, the end of turn, is not checked: an answer given back whole that runs
    on, into what another answer learned after the same words, loses nothing, and recall
    epochs chasing where such answers end unlearned others (a news report's two passages,
    one ending a sentence before the other: trained from the same reflections with two
    seeds, 4 and 5 answers missed after 8 recall epochs, their end of turn checked; 2, both
    the one passage's end, not checked)."""
    device = next(model.parameters()).device
    missed = []
    for start in range(0, len(examples), batch_size):
        rows = list(range(start, min(start + batch_size, len(examples))))
        logits, targets, positions = _answer_logits(model, examples, rows, pad, device)  # as in training
        ends = torch.zeros_like(positions)  # each row's last answer position (right-padded)
        ends[torch.arange(len(rows), device=device), positions.long().cumsum(1).argmax(1)] = True
        wrong = (logits.argmax(-1) != targets) & ~ends[positions]
        missed += sorted({rows[r] for r in positions.nonzero()[:, 0][wrong].tolist()})
    return missed


def train_lora(
    model: torch.nn.Module,
    tokenizer,
    examples: Sequence[Example],
    config: TrainConfig,
    progress: Callable[[str, int, int, float], None] | None = None,
    thread_governor: ThreadGovernor | None = None,
) -> TrainResult:
    """Train a LoRA adapter on ``model`` (left unchanged afterwards) and return its weights.
    Each optimizer step and recall check is a round of ``thread_governor``'s. ``progress``
    hears (stage, done, total, loss): "training", steps of the scheduled epochs, then, when
    answers do not come back yet, "recalling", recall epochs of at most
    ``config.recall_epochs`` (ending early once every answer comes back)."""
    from peft import LoraConfig, get_peft_model

    started = time.monotonic()
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    lora = LoraConfig(
        r=config.rank, lora_alpha=config.alpha, target_modules=list(config.target_modules), lora_dropout=0.0
    )
    peft_model = get_peft_model(model, lora)
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
    epochs, total = config.schedule(len(examples))
    inner = peft_model.get_base_model()
    device = next(inner.parameters()).device
    epoch_losses: list[float] = []
    unrecalled_counts: list[int] = []
    step = 0

    def train_epoch(rows: Sequence[int], scheduler=None) -> float:
        """One pass over ``rows``; returns its mean loss. Scheduled epochs report each step."""
        nonlocal step
        order = sorted(rows, key=lambda i: (len(examples[i].input_ids), rng.random()))
        batches = [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)]
        rng.shuffle(batches)
        losses = []
        for batch in batches:
            with governed_round(thread_governor):
                logits, targets, _ = _answer_logits(inner, examples, batch, pad, device)
                loss = torch.nn.functional.cross_entropy(logits.float(), targets)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
            if scheduler is not None:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            step += 1
            if progress is not None and scheduler is not None:
                progress("training", step, total, loss.item())
        return sum(losses) / max(1, len(losses))

    def not_recalled(rows: Sequence[int]) -> list[int]:
        inner.eval()
        with governed_round(thread_governor):
            found = unrecalled(inner, [examples[i] for i in rows], config.batch_size, pad)
        inner.train()
        unrecalled_counts.append(len(found))
        return [rows[i] for i in found]

    try:
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: min(1.0, (step + 1) / max(1, total // 10)) * max(0.0, 1 - step / max(1, total)),
        )
        everything = list(range(len(examples)))
        for _ in range(epochs):
            epoch_losses.append(train_epoch(everything, schedule))
        rows = not_recalled(everything) if config.recall_epochs else []
        if rows and progress is not None:
            progress("recalling", 0, config.recall_epochs, epoch_losses[-1] if epoch_losses else 0.0)
        for epoch in range(config.recall_epochs):
            if not rows:
                break
            # The answers that do not come back yet, beside a sample of those that do, with
            # the learning rate up again (the schedule ended at zero) and decaying over the
            # recall epochs. Checked again are the missed (a forward pass over all examples
            # costs a third of an epoch), and all once those come back, so that one a step
            # unlearned is taken up.
            for group in optimizer.param_groups:
                group["lr"] = config.learning_rate * (1 - epoch / config.recall_epochs)
            missing = set(rows)
            recalled = [i for i in everything if i not in missing]
            loss = train_epoch(
                [*rows, *rng.sample(recalled, min(len(recalled), config.recall_rehearsal * len(rows)))]
            )
            rows = not_recalled(rows) or not_recalled(everything)
            if progress is not None:
                progress("recalling", epoch + 1, config.recall_epochs, loss)
        adapter = extract_adapter(peft_model)
    finally:
        peft_model.unload()  # the base model's own modules again, weights untouched
    model.eval()
    return TrainResult(adapter, epoch_losses, step, time.monotonic() - started, unrecalled_counts)


def extract_adapter(peft_model) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{module name relative to the base model: (A, B, scaling)} of the default adapter."""
    from peft.tuners.lora import LoraLayer

    adapter = {}
    for name, module in peft_model.get_base_model().named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            a = module.lora_A["default"].weight.detach().cpu().clone()
            b = module.lora_B["default"].weight.detach().cpu().clone()
            adapter[name] = (a, b, float(module.scaling["default"]))
    return adapter


def save_adapter(adapter: Adapter, directory: Path, meta: dict) -> None:
    """Write atomically: into a sibling folder, renamed into place when complete."""
    staging = directory.with_name(directory.name + ".partial")
    staging.mkdir(parents=True, exist_ok=True)
    tensors, scalings = {}, {}
    for name, (a, b, scaling) in adapter.items():
        tensors[f"{name}.lora_A"] = a.contiguous()
        tensors[f"{name}.lora_B"] = b.contiguous()
        scalings[name] = scaling
    save_file(tensors, staging / "adapter.safetensors")
    (staging / "adapter.json").write_text(json.dumps({**meta, "scalings": scalings}))
    if directory.exists():
        import shutil

        shutil.rmtree(directory)
    staging.rename(directory)


def load_adapter(directory: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    tensors = load_file(directory / "adapter.safetensors")
    meta = json.loads((directory / "adapter.json").read_text())
    return {
        name: (tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"], s)
        for name, s in meta["scalings"].items()
    }


def adapter_meta(directory: Path) -> dict:
    return json.loads((directory / "adapter.json").read_text())
