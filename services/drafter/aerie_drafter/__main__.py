"""python -m aerie_drafter: load the EAGLE head and serve the Drafter gRPC service."""

from __future__ import annotations

import asyncio
import logging

from aerie_common.grpc_utils import GrpcService
from aerie_common.logs import setup_logging
from aerie_common.metrics import start_metrics_server
from aerie_common.thread_governor import process_governor
from aerie_common.torch_threads import compute_thread, set_torch_threads
from aerie_proto.v1 import drafter_pb2_grpc

from aerie_drafter.loading import load_drafter_head
from aerie_drafter.metrics import SessionCollector
from aerie_drafter.proposer import DraftSession, draft_slots, tree_shape
from aerie_drafter.server import SERVICE_NAME, DrafterServicer
from aerie_drafter.settings import DrafterSettings

log = logging.getLogger("aerie_drafter")


async def serve(settings: DrafterSettings) -> None:
    set_torch_threads(settings.torch_threads)
    # The head loads on the thread that will draft with it: the process's only torch thread.
    compute = compute_thread("drafter-compute")
    head, origin = await asyncio.get_running_loop().run_in_executor(
        compute,
        load_drafter_head,
        settings.target_model,
        settings.model_cache,
        settings.drafter_head,
        settings.device,
        settings.drafter_dtype,
        settings.drafter_eagle_version,
    )
    device = str(head.fc.weight.device)
    shape = tree_shape(
        device,
        settings.draft_tree_depth,
        settings.draft_tree_top_k,
        settings.draft_tree_total_tokens,
        settings.draft_tree_context_ngram,
    )
    slots = draft_slots(head, settings.cuda_graphs, settings.cuda_graph_slot_tokens)
    servicer = DrafterServicer(
        head,
        shape,
        settings.drafter_max_sessions,
        origin,
        new_session=lambda counts: DraftSession(head, slots, counts),
        compute=compute,
        thread_governor=process_governor(settings.adaptive_threads, head.fc.weight.device.type == "cpu"),
    )
    start_metrics_server(SessionCollector(servicer), settings.drafter_host, settings.drafter_metrics_port)
    service = GrpcService(
        lambda s: drafter_pb2_grpc.add_DrafterServicer_to_server(servicer, s), [SERVICE_NAME]
    )
    port = await service.start(settings.drafter_host, settings.drafter_port)
    await service.set_serving(True)
    log.info(
        "serving EAGLE %s head (%s) on %s, tree %s, on %s:%d",
        head.config.eagle_version,
        origin,
        device,
        shape,
        settings.drafter_host,
        port,
    )
    await service.serve_until_signalled(settings.drain_timeout_s)


def main() -> None:
    settings = DrafterSettings()
    setup_logging(settings.log_level)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
