"""Request body size limits, as pure ASGI middleware in front of the whole app.

A declared ``Content-Length`` over the limit is refused before any of the body is read.
Bodies without one (chunked) are counted while they are read, and refused as soon as they
pass the limit. The body read is then handed to the app in one piece, which is how the
app reads JSON bodies anyway. Refusals are 400 with the OpenAI error envelope.
"""

from __future__ import annotations

from collections.abc import Mapping

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import invalid_request, request_too_large


class BodySizeLimit:
    def __init__(self, app: ASGIApp, *, max_bytes: int, max_bytes_by_path: Mapping[str, int] | None = None):
        self.app = app
        self.max_bytes = max_bytes
        self.max_bytes_by_path = dict(max_bytes_by_path or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes_by_path.get(scope["path"], self.max_bytes)
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await invalid_request("The Content-Length header is not a number.").response()(
                    scope, receive, send
                )
                return
            if int(declared) > limit:
                await self._refuse(limit, scope, receive, send)
                return

        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its whole body: nobody to answer
            body += message.get("body", b"")
            if len(body) > limit:
                await self._refuse(limit, scope, receive, send)
                return
            if not message.get("more_body", False):
                break

        body_sent = False

        async def receive_read_body() -> Message:
            nonlocal body_sent
            if body_sent:
                return await receive()  # from here on: http.disconnect, when the client leaves
            body_sent = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, receive_read_body, send)

    @staticmethod
    async def _refuse(limit: int, scope: Scope, receive: Receive, send: Send) -> None:
        error = request_too_large(f"The request body is larger than this endpoint's limit of {limit} bytes.")
        await error.response()(scope, receive, send)
