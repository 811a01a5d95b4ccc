"""Typed configuration shared by every service.

Every field is read from an ``AERIE_``-prefixed environment variable (``redis_url`` from
``AERIE_REDIS_URL``), the same names in local runs, docker compose and Kubernetes. Each
service extends :class:`ServiceSettings` with its own fields in its own package.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_TARGET_MODEL = "smollm2-135m-instruct"


class AerieSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AERIE_", extra="ignore")


class ServiceSettings(AerieSettings):
    """Where the services find each other, and what they all share."""

    verifier_addr: str = "127.0.0.1:50051"
    drafter_addr: str = "127.0.0.1:50052"
    memory_addr: str = "127.0.0.1:50053"
    redis_url: str = "redis://127.0.0.1:6379/0"
    log_level: str = "INFO"
    model_cache: Path = Field(default=Path.home() / ".cache" / "aerie")
    # Seconds a draining service keeps serving in-flight work after SIGTERM.
    drain_timeout_s: float = 20.0


class ThreadSettings(AerieSettings):
    # On the CPU, the verifier, the drafter and the memory run on one torch thread fewer while
    # other processes keep a core busy (aerie_common/thread_governor.py). false: always their
    # configured threads.
    adaptive_threads: bool = True


class ModelSettings(ThreadSettings):
    """Which target model to load and where. Used by every service that loads it."""

    # A built-in name (see aerie_common.model_store.BUILTIN_MODELS) or a local
    # Hugging Face model directory.
    target_model: str = DEFAULT_TARGET_MODEL
    model_cache: Path = Field(default=Path.home() / ".cache" / "aerie")
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    dtype: str = "auto"  # "auto" | "float32" | "bfloat16" | "float16"
    torch_threads: int = 0  # 0: torch's default, capped at the container's CPU quota
    # On a GPU, replay the verifier's steps and the drafter's tree growth as CUDA graphs,
    # over KV caches of fixed size (aerie_verifier/static_slot.py, aerie_drafter/proposer.py):
    # a request takes a slot of cuda_graph_slot_tokens when its prompt fits, and carries on
    # eagerly once it has filled it.
    cuda_graphs: bool = True
    cuda_graph_slot_tokens: int = 4096


class DraftTreeSettings(AerieSettings):
    """The draft tree's shape, read by the verifier (which asks for it: it pays for the
    tree's forward) and the drafter (its default). 0 = the per-device default."""

    draft_tree_depth: int = 0
    draft_tree_top_k: int = 0
    draft_tree_total_tokens: int = 0
    # Also draft the context's continuation of the last tokens (prompt lookup), as a chain
    # that takes room in the tree only when it outscores the head's nodes
    # (aerie_drafter/context_ngram.py).
    draft_tree_context_ngram: bool = True
