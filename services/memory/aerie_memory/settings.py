"""Memory service configuration (AERIE_-prefixed environment variables)."""

from __future__ import annotations

from aerie_common.settings import DEFAULT_TARGET_MODEL, ServiceSettings, ThreadSettings
from pydantic import Field


class MemorySettings(ServiceSettings, ThreadSettings):
    memory_host: str = "127.0.0.1"
    memory_port: int = 50053
    # Prometheus metrics on http://AERIE_MEMORY_HOST:PORT/metrics; 0 turns them off.
    memory_metrics_port: int = 0

    # --- ingestion limits (bad input is INVALID_ARGUMENT, HTTP 400 at the gateway) -------
    memory_max_documents: int = 64  # documents per ingest request
    memory_max_document_chars: int = 20_000  # characters per document
    memory_chunk_chars: int = 600  # chunks are whole sentences up to about this size

    # --- the generator LLM that writes reflections ---------------------------------------
    # Empty: Aerie's verifier over gRPC (AERIE_VERIFIER_ADDR). Otherwise the base URL of an
    # OpenAI-compatible API (".../v1"), called at /chat/completions.
    memory_generator_url: str = ""
    memory_generator_model: str = ""  # the `model` sent to an OpenAI-compatible generator
    memory_generator_api_key: str = ""
    memory_generator_concurrency: int = 8  # generation calls in flight at once
    # Tokens of a fact-writing call; the other steps' calls get two thirds of it.
    memory_generator_max_tokens: int = 80
    # Per call. Calls queue at the verifier (8 at a time, round-robin), so allow the wait.
    memory_generator_timeout_s: float = 900.0
    # Ask the verifier for speculative decoding on reflection calls. Off by default: these
    # calls run 8 at a time, where the verifier is busy anyway, and an untrained draft
    # head makes speculation slower than plain decoding (the text is the same either way).
    memory_generator_speculative: bool = False

    # --- the MEMORY model -----------------------------------------------------------------
    # Base model: a built-in name or a Hugging Face model directory.
    memory_base_model: str = DEFAULT_TARGET_MODEL
    memory_lora_rank: int = 16
    memory_lora_alpha: int = 32
    # 8 epochs at 2e-3 take the loss on the answers to about 0.04: the facts, not just the
    # answer templates, are learned (5 at 1e-3 left 0.48 and wrong facts; measured).
    memory_train_epochs: int = 8
    # More epochs for a small job, up to this many optimizer steps: a job of two documents
    # (13 reflections, 2 batches an epoch) recalled 4 of its 6 entity passages whole after
    # 8 epochs (16 steps), all 6 after 32 steps (measured). Jobs of 25 reflections or more
    # (4 batches of 8) are unaffected. 0: always memory_train_epochs.
    memory_min_train_steps: int = 32
    # Up to this many more epochs, of the answers greedy decoding would not give back word
    # for word (up to their end of turn: training.unrecalled) after the scheduled ones,
    # until it gives back all. Trained on three documents of 12 sentences (36 examples,
    # answers up to 130 tokens), a memory recalled 5 of its 13 entity passages whole after
    # 8 epochs at loss 0.05, and all 13 with recall epochs (docs/memory.md). 0: never more
    # than the scheduled epochs.
    memory_recall_epochs: int = 8
    memory_learning_rate: float = 2e-3
    # Share of "I don't know" examples about invented names. 0 by default: invented names
    # look like the corpus' own, and the memory learned to refuse those too (22 of 40
    # single-hop facts recalled at 3%, 31 of 40 at 0; measured). Unknown entities are
    # refused by the entity gate instead (models.names_known_entity).
    memory_idk_share: float = 0.0
    # Replayed examples per new reflection: a job whose namespace already serves a memory
    # also rehearses a seeded sample of what that memory learned, so that the TIES merge
    # keeps the old facts (merged without replay, a second 20-document corpus cut the first
    # one's recall from 30 to 11 of 40 facts; with 0.5, 24 of 40). In the memory QA
    # benchmark, 1.0 (about all of the first corpus) lost 15 cross-document points to the
    # distractors where 0.5 lost 25 (docs/memory.md). Training time grows by the same
    # share. 0 turns replay off.
    memory_replay_ratio: float = 1.0
    # A memory holding at most this many reflections is rehearsed in full by every job
    # (replay on), and the new adapter replaces the adapters it rehearsed instead of being
    # TIES-merged with them: averaged with an adapter that never saw them, a job's new
    # facts are mostly forgotten (a second 20-document corpus kept 7 of its 37 entity
    # passages whole when merged, 37 alone; docs/memory.md). Training a job costs up to
    # this many examples more. Larger memories rehearse a ratio sample and are merged.
    memory_replay_all_up_to: int = 256
    memory_batch_size: int = 8
    memory_max_seq_tokens: int = 160
    ties_density: float = 0.3  # TIES trim: the fraction of each task vector kept (MEMO: 0.3)
    ties_lambda: float = 1.0  # scale of the merged task vector added to the base
    memory_loaded_models: int = 2  # namespaces whose memory model stays loaded for queries
    memory_query_max_tokens: int = 48
    # Answers each loaded memory keeps, by question, and gives again without generating
    # (aerie_memory.models.LoadedMemory.recall): exactly the answers it would generate.
    # About a kilobyte each. 0 keeps none.
    memory_recent_answers: int = Field(default=4096, ge=0)
    # Torch threads of the service's queries. One: on a small CPU shared with the verifier,
    # two threads fighting other processes were 4x slower than one (measured), and even
    # governed (adaptive threads), 4 memory chats at once came slower on two (docs/memory.md).
    # 0: every core the container may use (aerie_common.torch_threads.set_torch_threads).
    memory_torch_threads: int = 1
    # Torch threads of the worker's training. 0: every core, with AERIE_ADAPTIVE_THREADS one
    # fewer while another process keeps a core busy, taken back only when it is free (alone
    # on two cores, a corpus was learned 1.6x faster than on one); one without adaptive threads.
    memory_train_threads: int = Field(default=0, ge=0)

    # --- the worker ------------------------------------------------------------------------
    # Seconds a job may go without its worker's heartbeat before another worker reclaims
    # it (XAUTOCLAIM). The worker renews its claim every memory_heartbeat_s.
    memory_reclaim_idle_s: float = 60.0
    memory_heartbeat_s: float = 5.0
    # Run the worker as a child process of the service (restarted when it dies).
    memory_worker_enabled: bool = True
