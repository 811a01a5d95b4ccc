"""python -m aerie_memory: serve the Memory gRPC service.

Ingestion, reflection synthesis and the memory model are not built yet, so every RPC
answers UNIMPLEMENTED. Health is SERVING only while Redis, where all memory state will
live, answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
import redis.asyncio as aioredis
from aerie_common.grpc_utils import GrpcService
from aerie_common.logs import setup_logging
from aerie_proto.v1 import memory_pb2, memory_pb2_grpc

from aerie_memory.settings import MemorySettings

log = logging.getLogger("aerie_memory")
SERVICE_NAME = memory_pb2.DESCRIPTOR.services_by_name["Memory"].full_name
_NOT_YET = "the memory service does not implement this yet"


class MemoryServicer(memory_pb2_grpc.MemoryServicer):
    async def Ingest(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, _NOT_YET)

    async def GetJob(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, _NOT_YET)

    async def Query(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, _NOT_YET)


async def watch_redis(service: GrpcService, client: aioredis.Redis, interval_s: float = 2.0) -> None:
    """Keep gRPC health in step with Redis reachability."""
    serving = None
    while True:
        try:
            ok = bool(await asyncio.wait_for(client.ping(), timeout=interval_s))
        except Exception:  # any failure to reach Redis means not serving
            ok = False
        if ok != serving:
            log.info("redis %s", "reachable: SERVING" if ok else "unreachable: NOT_SERVING")
            await service.set_serving(ok)
            serving = ok
        await asyncio.sleep(interval_s)


async def serve(settings: MemorySettings) -> None:
    client = aioredis.from_url(settings.redis_url)
    service = GrpcService(
        lambda s: memory_pb2_grpc.add_MemoryServicer_to_server(MemoryServicer(), s), [SERVICE_NAME]
    )
    port = await service.start(settings.memory_host, settings.memory_port)
    log.info("serving on %s:%d (redis %s)", settings.memory_host, port, settings.redis_url)
    watcher = asyncio.create_task(watch_redis(service, client))
    try:
        await service.serve_until_signalled(settings.drain_timeout_s, on_drain=watcher.cancel)
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        await client.aclose()


def main() -> None:
    settings = MemorySettings()
    setup_logging(settings.log_level)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
