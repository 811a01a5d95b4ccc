"""The real Drafter gRPC service with its proposer replaced by bench.speculative's
oracle, so the benchmark can measure the hop with drafts that are always accepted.

    python -m bench.oracle_drafter REFERENCES.json    # port from AERIE_DRAFTER_PORT
"""

from __future__ import annotations

import asyncio
import json
import sys

from aerie_common.grpc_utils import GrpcService
from aerie_common.logs import setup_logging
from aerie_drafter.loading import UNTRAINED, load_drafter_head
from aerie_drafter.proposer import tree_shape
from aerie_drafter.server import SERVICE_NAME, DrafterServicer
from aerie_drafter.settings import DrafterSettings
from aerie_proto.v1 import drafter_pb2_grpc

from bench.speculative import OracleSession


async def serve(settings: DrafterSettings, references: list[list[int]]) -> None:
    # The untrained head only supplies the shapes the servicer validates against.
    head, _ = load_drafter_head(settings.target_model, settings.model_cache, UNTRAINED)
    servicer = DrafterServicer(
        head,
        tree_shape("cpu"),
        settings.drafter_max_sessions,
        "oracle",
        lambda counts: OracleSession(references),
    )
    service = GrpcService(
        lambda s: drafter_pb2_grpc.add_DrafterServicer_to_server(servicer, s), [SERVICE_NAME]
    )
    await service.start(settings.drafter_host, settings.drafter_port)
    await service.set_serving(True)
    await service.serve_until_signalled(0)


def main() -> None:
    settings = DrafterSettings()
    setup_logging(settings.log_level)
    references = json.loads(open(sys.argv[1]).read())
    asyncio.run(serve(settings, references))


if __name__ == "__main__":
    main()
