"""``python -m aerie_gateway``: serve the gateway with uvicorn, draining on SIGTERM."""

from __future__ import annotations

import logging
import time

import prometheus_client
import uvicorn
from aerie_common.logs import setup_logging

from .app import create_app
from .auth import KeysFileError
from .drain import Drain
from .settings import GatewaySettings

log = logging.getLogger("aerie_gateway")


class DrainingServer(uvicorn.Server):
    """uvicorn, except that SIGTERM/SIGINT first drains (see drain.py): the listener stays
    open, answering 503, until the requests in flight are done or ``drain_timeout_s`` has
    passed; then uvicorn's own shutdown closes it and cancels whatever is left. A second
    signal skips the wait."""

    def __init__(self, config: uvicorn.Config, drain: Drain, drain_timeout_s: float):
        super().__init__(config)
        self.drain = drain
        self.drain_timeout_s = drain_timeout_s

    def handle_exit(self, sig, frame) -> None:
        if self.drain.draining:
            super().handle_exit(sig, frame)
            return
        # uvicorn's own handler would also re-raise the signal after shutdown, ending the
        # process by the signal; a completed drain exits 0 instead.
        self.drain.begin()
        log.info("draining: /ready 503, %d requests in flight", self.drain.in_flight)

    async def on_tick(self, counter: int) -> bool:
        if self.drain.draining:
            left_s = self.drain.started_at + self.drain_timeout_s - time.monotonic()
            if self.drain.in_flight == 0 or left_s <= 0:
                if self.drain.in_flight:
                    log.warning("drain timeout: cancelling %d requests in flight", self.drain.in_flight)
                # uvicorn's own graceful wait gets what is left of the drain timeout.
                self.config.timeout_graceful_shutdown = max(left_s, 0.0)
                return True
        return await super().on_tick(counter)


def main() -> None:
    settings = GatewaySettings()
    setup_logging(settings.log_level)
    # Drop the *_created series from /metrics, as vLLM does (process-wide switch).
    prometheus_client.disable_created_metrics()
    try:
        app = create_app(settings)
    except KeysFileError as err:
        raise SystemExit(f"aerie_gateway: {err}") from None
    config = uvicorn.Config(
        app,
        host=settings.gateway_host,
        port=settings.gateway_port,
        log_level=settings.log_level.lower(),
        # Keep setup_logging's format instead of uvicorn's own logging config.
        log_config=None,
        timeout_graceful_shutdown=settings.drain_timeout_s,
    )
    DrainingServer(config, app.state.drain, settings.drain_timeout_s).run()


if __name__ == "__main__":
    main()
