"""``python -m aerie_gateway``: serve the gateway with uvicorn."""

from __future__ import annotations

import prometheus_client
import uvicorn
from aerie_common.logs import setup_logging

from .app import create_app
from .settings import GatewaySettings


def main() -> None:
    settings = GatewaySettings()
    setup_logging(settings.log_level)
    # Drop the *_created series from /metrics, as vLLM does (process-wide switch).
    prometheus_client.disable_created_metrics()
    uvicorn.run(
        create_app(settings),
        host=settings.gateway_host,
        port=settings.gateway_port,
        log_level=settings.log_level.lower(),
        # Keep setup_logging's format instead of uvicorn's own logging config.
        log_config=None,
        # On SIGTERM, streams in flight get the same grace as the gRPC services give theirs.
        timeout_graceful_shutdown=settings.drain_timeout_s,
    )


if __name__ == "__main__":
    main()
