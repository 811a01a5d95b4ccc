"""python -m aerie_verifier: load the target model and serve the Verifier gRPC service."""

from __future__ import annotations

import asyncio
import logging

from aerie_common.grpc_utils import GrpcService
from aerie_common.logs import setup_logging
from aerie_common.metrics import start_metrics_server
from aerie_common.model_store import load_target
from aerie_common.thread_governor import process_governor
from aerie_common.torch_threads import in_passing_thread
from aerie_proto.v1 import verifier_pb2_grpc

from aerie_verifier.cpu_kernels import speed_up_tree_verification
from aerie_verifier.drafter_client import GrpcDrafterFactory, InProcessDrafterFactory
from aerie_verifier.engine import Engine, make_slots
from aerie_verifier.metrics import EngineCollector
from aerie_verifier.prefix_cache import PrefixCache
from aerie_verifier.sampling import sampling_defaults
from aerie_verifier.server import SERVICE_NAME, VerifierServicer
from aerie_verifier.settings import VerifierSettings
from aerie_verifier.speculative import PaceGuard
from aerie_verifier.tree_cost import serving_tree

log = logging.getLogger("aerie_verifier")


def make_drafter_factory(settings: VerifierSettings, model):
    """Where draft trees come from (AERIE_DRAFTER_MODE); None turns speculation off."""
    if settings.drafter_mode == "off":
        return None
    shape = serving_tree(
        model,
        settings.draft_tree_depth,
        settings.draft_tree_top_k,
        settings.draft_tree_total_tokens,
        settings.draft_tree_context_ngram,
    )
    from aerie_drafter.loading import UNTRAINED, load_drafter_head
    from aerie_drafter.proposer import draft_slots
    from aerie_drafter.settings import DrafterSettings

    # An untrained head only slows decoding down; speculate with one only when it was asked
    # for by name (AERIE_DRAFTER_HEAD=untrained: tests and benchmarks of the machinery).
    drafter = DrafterSettings()
    untrained_asked_for = drafter.drafter_head == UNTRAINED
    if settings.drafter_mode == "grpc":
        log.info("drafting over gRPC from %s, tree %s", settings.drafter_addr, shape)
        return GrpcDrafterFactory(
            settings.drafter_addr,
            shape,
            settings.drafter_step_timeout_s,
            accept_untrained=untrained_asked_for,
        )
    head, origin = load_drafter_head(
        settings.target_model,
        settings.model_cache,
        drafter.drafter_head,
        settings.device,
        drafter.drafter_dtype,
        drafter.drafter_eagle_version,
    )
    if origin == UNTRAINED and not untrained_asked_for:
        log.warning(
            "no trained EAGLE head for %s: decoding without speculation. Set AERIE_DRAFTER_HEAD to a trained "
            "head, or to 'untrained' to speculate anyway.",
            settings.target_model,
        )
        return None
    log.info(
        "drafting in-process with the EAGLE %s head %s, tree %s", head.config.eagle_version, origin, shape
    )
    slots = draft_slots(head, settings.cuda_graphs, settings.cuda_graph_slot_tokens)
    return InProcessDrafterFactory(head, shape, slots)


def build_engine(settings: VerifierSettings):
    """Load the target (and an in-process head) and wrap them in an engine; returns
    (engine, model directory)."""
    model, tokenizer, model_dir = load_target(settings)
    speed_up_tree_verification(model, settings.packed_weights)  # before the tree is timed on it
    # One KV cache slot per running request on a GPU; none on a CPU, where the growing
    # cache is faster.
    graphed = settings.cuda_graphs and model.device.type == "cuda"
    slots = settings.max_running_requests if graphed else 0
    engine = Engine(
        model,
        tokenizer,
        settings.max_running_requests,
        settings.max_waiting_requests,
        drafter_factory=make_drafter_factory(settings, model),
        breaker_cooldown_s=settings.drafter_retry_after_s,
        pace_guard=PaceGuard(probe_every=settings.speculation_probe_every)
        if settings.drop_slow_speculation
        else None,
        slots=make_slots(model, slots, settings.cuda_graph_slot_tokens),
        prefix_cache=PrefixCache(settings.prefix_cache_mb * 2**20) if settings.prefix_cache_mb > 0 else None,
        prefill_chunk_tokens=settings.prefill_chunk_tokens,
        thread_governor=process_governor(settings.adaptive_threads, model.device.type == "cpu"),
    )
    return engine, model_dir


async def serve(settings: VerifierSettings) -> None:
    # From here on only the engine thread runs torch work (aerie_common.torch_threads).
    engine, model_dir = in_passing_thread(build_engine, settings)
    model = engine.model
    engine.start()
    start_metrics_server(EngineCollector(engine), settings.verifier_host, settings.verifier_metrics_port)
    device = str(engine.device)
    defaults = sampling_defaults(
        getattr(model, "generation_config", None),
        settings.generation_config == "auto",
        settings.sampling_defaults,
    )
    if defaults:
        log.info(
            "requests that leave them out are decoded with %s (AERIE_GENERATION_CONFIG, AERIE_SAMPLING_DEFAULTS)",
            defaults,
        )
    servicer = VerifierServicer(
        engine, settings.target_model, device, str(model.dtype).removeprefix("torch."), defaults
    )
    service = GrpcService(
        lambda s: verifier_pb2_grpc.add_VerifierServicer_to_server(servicer, s), [SERVICE_NAME]
    )
    port = await service.start(settings.verifier_host, settings.verifier_port)
    await service.set_serving(True)
    log.info(
        "serving %s (%s on %s) on %s:%d",
        settings.target_model,
        model_dir,
        device,
        settings.verifier_host,
        port,
    )
    try:
        await service.serve_until_signalled(settings.drain_timeout_s)
    finally:
        engine.stop()


def main() -> None:
    settings = VerifierSettings()
    setup_logging(settings.log_level)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
