"""python -m aerie_verifier: load the target model and serve the Verifier gRPC service."""

from __future__ import annotations

import asyncio
import logging

from aerie_common.grpc_utils import GrpcService
from aerie_common.logs import setup_logging
from aerie_common.model_store import load_target
from aerie_proto.v1 import verifier_pb2_grpc

from aerie_verifier.engine import Engine
from aerie_verifier.server import SERVICE_NAME, VerifierServicer
from aerie_verifier.settings import VerifierSettings

log = logging.getLogger("aerie_verifier")


async def serve(settings: VerifierSettings) -> None:
    model, tokenizer, model_dir = load_target(settings)
    engine = Engine(model, tokenizer, settings.max_running_requests, settings.max_waiting_requests)
    engine.start()
    device = str(engine.device)
    servicer = VerifierServicer(
        engine, settings.target_model, device, str(model.dtype).removeprefix("torch.")
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
