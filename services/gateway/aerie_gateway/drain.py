"""Draining on SIGTERM. While the gateway drains, /ready answers 503 (so load balancers
stop sending traffic), new requests get a 503 in OpenAI's envelope with
``Connection: close``, and the requests already in flight, streams included, run to their
end. ``__main__`` starts the drain on the signal and closes the listener once nothing is
in flight or the drain timeout has passed."""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import RETRY_AFTER_S, service_unavailable

# Answered while draining: liveness, readiness (503 then) and metrics.
PROBE_PATHS = frozenset({"/health", "/ready", "/metrics"})


class Drain:
    """Whether the gateway drains, since when, and how many HTTP requests are in flight.
    Plain attributes: the event loop is single-threaded, and the signal handler that
    starts the drain runs on the loop's thread between bytecodes."""

    def __init__(self) -> None:
        self.draining = False
        self.started_at = 0.0
        self.in_flight = 0

    def begin(self) -> None:
        if not self.draining:
            self.draining = True
            self.started_at = time.monotonic()


class DrainMiddleware:
    """Counts HTTP requests in flight (a streamed response until its last chunk is sent)
    and refuses new ones, probes aside, while draining."""

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.drain.draining and scope["path"] not in PROBE_PATHS:
            refusal = service_unavailable("The server is shutting down; retry the request.")
            refusal.headers.update({"Connection": "close", "Retry-After": str(RETRY_AFTER_S)})
            await refusal.response()(scope, receive, send)
            return
        self.drain.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.in_flight -= 1
