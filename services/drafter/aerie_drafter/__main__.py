"""python -m aerie_drafter: serve the Drafter gRPC service.

The EAGLE head is not wired in yet, so DraftSession answers UNIMPLEMENTED; the verifier
treats that like an unavailable drafter and decodes without speculation.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from aerie_common.grpc_utils import GrpcService
from aerie_common.logs import setup_logging
from aerie_proto.v1 import drafter_pb2, drafter_pb2_grpc

from aerie_drafter.settings import DrafterSettings

log = logging.getLogger("aerie_drafter")
SERVICE_NAME = drafter_pb2.DESCRIPTOR.services_by_name["Drafter"].full_name


class DrafterServicer(drafter_pb2_grpc.DrafterServicer):
    async def DraftSession(self, request_iterator, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "no EAGLE head is loaded in this drafter yet")
        yield  # makes this an async generator, as a streaming handler must be


async def serve(settings: DrafterSettings) -> None:
    service = GrpcService(
        lambda s: drafter_pb2_grpc.add_DrafterServicer_to_server(DrafterServicer(), s), [SERVICE_NAME]
    )
    port = await service.start(settings.drafter_host, settings.drafter_port)
    await service.set_serving(True)
    log.info("serving on %s:%d", settings.drafter_host, port)
    await service.serve_until_signalled(settings.drain_timeout_s)


def main() -> None:
    settings = DrafterSettings()
    setup_logging(settings.log_level)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
