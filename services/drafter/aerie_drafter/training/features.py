"""The target's features for training: what the verifier captures at inference, plus labels.

For every token position of a training sequence:

    aux_hidden     [3*Ht]  the residual stream entering the three capture layers, low|mid|high
                           (exactly what aerie_verifier.speculative.HiddenCapture sends)
    last_hidden    [Ht]    the target's final normed hidden state; with the target's frozen
                           lm_head it gives the target's whole next-token distribution
    target_argmax  []      the target's top next token over its full vocabulary, where the
                           next token is a response token (training reads no other); -1 elsewhere

They are computed on the fly (``extract``) or cached to disk once and read back per batch.

Cache format (a directory):

    index.json                 {"format": "aerie-eagle-features/1", "target": ..., "capture_layer_ids": [...],
                                "hidden_size": Ht, "num_sequences": n, "num_tokens": N,
                                "shards": [{"file": "shard-00000.safetensors", "sequences": s}, ...]}
    shard-XXXXX.safetensors    the sequences of the shard, concatenated along the token axis:
                                 input_ids int32 [N_s], loss_mask bool [N_s],
                                 aux_hidden bf16 [N_s, 3*Ht], last_hidden bf16 [N_s, Ht],
                                 target_argmax int32 [N_s], offsets int64 [s+1]
                               (sequence i of the shard is rows offsets[i]:offsets[i+1])

A shard is written whole and the index last, so an interrupted extraction resumes from
the last complete shard.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from aerie_drafter.training.data import Example

FORMAT = "aerie-eagle-features/1"
STORE_DTYPE = torch.bfloat16


@dataclass
class FeatureBatch:
    """A right-padded batch of sequences."""

    input_ids: torch.Tensor  # [B, T] long
    loss_mask: torch.Tensor  # [B, T] bool
    lengths: torch.Tensor  # [B] long
    aux_hidden: torch.Tensor  # [B, T, 3*Ht]
    last_hidden: torch.Tensor  # [B, T, Ht]
    target_argmax: torch.Tensor  # [B, T] long, -1 where not needed

    def to(self, device) -> FeatureBatch:
        return FeatureBatch(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())


def pad_examples(examples: list[Example], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(e.input_ids) for e in examples], device=device)
    width = int(lengths.max())
    ids = torch.zeros(len(examples), width, dtype=torch.long, device=device)
    mask = torch.zeros(len(examples), width, dtype=torch.bool, device=device)
    for i, e in enumerate(examples):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids, device=device)
        mask[i, : len(e.loss_mask)] = torch.tensor(e.loss_mask, dtype=torch.bool, device=device)
    return ids, mask, lengths


@torch.no_grad()  # not inference_mode: on the fly, these tensors enter the head's autograd graph
def extract(target, examples: list[Example], capture_layer_ids: tuple[int, ...]) -> FeatureBatch:
    """Run the target over a batch of examples (right-padded; causal attention keeps the
    padding out of the real positions) and collect the features."""
    device = next(target.parameters()).device
    ids, mask, lengths = pad_examples(examples, device)
    attention = (torch.arange(ids.shape[1], device=device)[None] < lengths[:, None]).long()
    out = target.model(input_ids=ids, attention_mask=attention, output_hidden_states=True)
    # hidden_states[i] is the input of layer i (hidden_states[0] the embeddings), the last
    # entry the final normed state: the same tensors HiddenCapture's pre-hooks see.
    states = out.hidden_states
    aux = torch.cat([states[i] for i in capture_layer_ids], dim=-1)
    last = out.last_hidden_state
    # The full-vocabulary lm_head is a fifth of a small target's cost: run it only where
    # training reads the argmax, at positions whose next token is a response token.
    needed = torch.zeros_like(mask)
    needed[:, :-1] = mask[:, 1:]
    argmax = torch.full_like(ids, -1)
    argmax[needed] = target.lm_head(last[needed]).argmax(-1)
    return FeatureBatch(ids, mask, lengths, aux, last, argmax)


class FeatureCache:
    """Features of a fixed list of examples on disk (see the module docstring)."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.index = json.loads((self.directory / "index.json").read_text())
        if self.index.get("format") != FORMAT:
            raise ValueError(f"{directory} is not an {FORMAT} cache")
        self._where: list[tuple[str, int]] = []  # sequence -> (shard file, index in shard)
        for shard in self.index["shards"]:
            self._where.extend((shard["file"], i) for i in range(shard["sequences"]))
        self._offsets: dict[str, list[int]] = {}

    def __len__(self) -> int:
        return len(self._where)

    @staticmethod
    def build(
        directory: Path,
        target,
        examples: list[Example],
        capture_layer_ids: tuple[int, ...],
        batch_size: int,
        shard_tokens: int = 200_000,
        meta: dict | None = None,
    ) -> FeatureCache:
        """Extract and write the features of ``examples`` (in order), resuming after the
        last complete shard of an earlier, interrupted build of the same cache."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        progress_file = directory / "progress.json"
        header = {
            "format": FORMAT,
            "capture_layer_ids": list(capture_layer_ids),
            "hidden_size": target.config.hidden_size,
            "num_sequences": len(examples),
            **(meta or {}),
        }
        shards: list[dict] = []
        if progress_file.is_file():
            saved = json.loads(progress_file.read_text())
            if saved["header"] == header:
                shards = saved["shards"]
        done = sum(s["sequences"] for s in shards)
        pending: list[FeatureBatch] = []
        pending_tokens = 0

        def flush() -> None:
            nonlocal pending_tokens
            name = f"shard-{len(shards):05d}.safetensors"
            _write_shard(directory / name, pending)
            shards.append({"file": name, "sequences": sum(len(b.lengths) for b in pending)})
            progress_file.write_text(json.dumps({"header": header, "shards": shards}))
            pending.clear()
            pending_tokens = 0

        total_tokens = sum(len(e.input_ids) for e in examples)
        bar = tqdm(total=total_tokens, desc="features", unit="tok", unit_scale=True)
        bar.update(sum(len(e.input_ids) for e in examples[:done]))
        for start in range(done, len(examples), batch_size):
            batch = extract(target, examples[start : start + batch_size], capture_layer_ids)
            pending.append(batch.to("cpu"))
            pending_tokens += batch.num_tokens
            bar.update(batch.num_tokens)
            if pending_tokens >= shard_tokens:
                flush()
        if pending:
            flush()
        bar.close()
        index = {**header, "num_tokens": total_tokens, "shards": shards}
        (directory / "index.json").write_text(json.dumps(index, indent=2) + "\n")
        return FeatureCache(directory)

    def _shard_offsets(self, file: str) -> list[int]:
        if file not in self._offsets:
            with safe_open(self.directory / file, framework="pt") as f:
                self._offsets[file] = f.get_tensor("offsets").tolist()
        return self._offsets[file]

    def batch(self, indices: list[int]) -> FeatureBatch:
        """Sequences ``indices`` as a right-padded batch, read by slicing the shards."""
        rows = []
        for i in indices:
            file, j = self._where[i]
            offsets = self._shard_offsets(file)
            lo, hi = offsets[j], offsets[j + 1]
            with safe_open(self.directory / file, framework="pt") as f:
                rows.append({name: f.get_slice(name)[lo:hi] for name in _SEQUENCE_TENSORS})
        lengths = torch.tensor([len(r["input_ids"]) for r in rows])
        width = int(lengths.max())

        def stack(name: str, dtype=None) -> torch.Tensor:
            first = rows[0][name]
            out = torch.zeros(len(rows), width, *first.shape[1:], dtype=dtype or first.dtype)
            for b, r in enumerate(rows):
                out[b, : len(r[name])] = r[name]
            return out

        return FeatureBatch(
            input_ids=stack("input_ids", torch.long),
            loss_mask=stack("loss_mask"),
            lengths=lengths,
            aux_hidden=stack("aux_hidden"),
            last_hidden=stack("last_hidden"),
            target_argmax=stack("target_argmax", torch.long),
        )

    def lengths(self) -> list[int]:
        out = []
        for shard in self.index["shards"]:
            offsets = self._shard_offsets(shard["file"])
            out.extend(b - a for a, b in zip(offsets, offsets[1:], strict=False))
        return out


_SEQUENCE_TENSORS = ("input_ids", "loss_mask", "aux_hidden", "last_hidden", "target_argmax")


def _write_shard(path: Path, batches: list[FeatureBatch]) -> None:
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in _SEQUENCE_TENSORS}
    offsets = [0]
    for batch in batches:
        for b, n in enumerate(batch.lengths.tolist()):
            parts["input_ids"].append(batch.input_ids[b, :n].to(torch.int32))
            parts["loss_mask"].append(batch.loss_mask[b, :n])
            parts["aux_hidden"].append(batch.aux_hidden[b, :n].to(STORE_DTYPE))
            parts["last_hidden"].append(batch.last_hidden[b, :n].to(STORE_DTYPE))
            parts["target_argmax"].append(batch.target_argmax[b, :n].to(torch.int32))
            offsets.append(offsets[-1] + n)
    tensors = {name: torch.cat(values).contiguous() for name, values in parts.items()}
    tensors["offsets"] = torch.tensor(offsets, dtype=torch.int64)
    partial = path.with_suffix(".partial")
    save_file(tensors, partial, metadata={"format": FORMAT})
    partial.rename(path)
