"""The gateway's FastAPI app: OpenAI-compatible routes over the verifier's gRPC API,
plus liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import grpc
from aerie_proto.v1 import verifier_pb2
from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel

from . import completions as legacy
from .auth import KeyRegistry, authenticated_key
from .backends import Backends
from .body_limit import BodySizeLimit
from .chat import (
    Body,
    ClientDisconnected,
    ClosingStreamingResponse,
    CompletionIdentity,
    Generation,
    collect_completion,
    run_unless_disconnected,
    stream_chunks,
    template_options,
    to_generate_requests,
    verifier_message,
    with_sampling_defaults,
)
from .drain import Drain, DrainMiddleware
from .errors import (
    error_from_grpc,
    install_error_handlers,
    model_not_found,
    rate_limited,
    service_unavailable,
)
from .memory_compose import MemoryComposer, with_memory_in_first_chunk
from .memory_routes import INGEST_PATH
from .memory_routes import build_router as build_memory_router
from .metrics import GatewayMetrics
from .rate_limit import AdmittedKey, RateLimiter, admitted_key
from .schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    GenerationRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from .settings import GatewaySettings
from .tools import ToolUse, tools_json

log = logging.getLogger(__name__)

# nginx's "client closed request"; nobody reads it, but access logs show what happened.
CLIENT_CLOSED_REQUEST = 499


class AdmissionLimit:
    """Counts requests in flight. The event loop is single-threaded, so a plain int is
    race-free."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_flight = 0

    def try_enter(self) -> bool:
        if self.in_flight >= self.limit:
            return False
        self.in_flight += 1
        return True

    def leave(self) -> None:
        self.in_flight -= 1


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    settings = settings or GatewaySettings()
    backends = Backends(settings)
    metrics = GatewayMetrics()
    admission = AdmissionLimit(settings.max_concurrent_requests)
    keys = KeyRegistry.from_settings(settings)
    any_key_limited = any(key.rate_limit_rps for key in keys.keys)
    limiter = RateLimiter(settings.redis_url) if settings.rate_limit_rps or any_key_limited else None
    started_at = int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        backends.open()
        log.info(
            "gateway up: verifier %s, auth %s, rate limits %s, at most %d requests in flight",
            settings.verifier_addr,
            f"on ({len(keys.keys)} keys)" if keys.enabled else "off",
            "on" if limiter else "off",
            settings.max_concurrent_requests,
        )
        try:
            yield
        finally:
            await backends.close()
            if limiter is not None:
                await limiter.close()

    app = FastAPI(title="Aerie gateway", lifespan=lifespan)
    app.state.settings = settings
    app.state.backends = backends
    app.state.metrics = metrics
    app.state.admission = admission
    app.state.keys = keys
    app.state.rate_limiter = limiter
    app.state.drain = drain = Drain()
    install_error_handlers(app)
    app.add_middleware(
        BodySizeLimit,
        max_bytes=settings.max_request_bytes,
        max_bytes_by_path={INGEST_PATH: settings.max_ingest_request_bytes},
    )

    async def verifier_model() -> verifier_pb2.ModelInfo:
        try:
            return await backends.model_info()
        except grpc.aio.AioRpcError as err:
            raise service_unavailable(f"The model backend is unavailable: {err.details()}") from err

    def served_name(info: verifier_pb2.ModelInfo) -> str:
        return settings.served_model_name or info.model_id

    async def served_model() -> str:
        return served_name(await verifier_model())

    async def with_model_defaults(body: Body) -> Body:
        """``body`` with the served model's sampling defaults where it left fields out."""
        return with_sampling_defaults(body, (await verifier_model()).sampling_defaults)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(admitted_key)])

    async def model_card() -> ModelCard:
        info = await verifier_model()
        return ModelCard(
            id=served_name(info), created=started_at, root=info.model_id, max_model_len=info.context_length
        )

    @v1.get("/models")
    async def list_models() -> JSONResponse:
        return JSONResponse(ModelList(data=[await model_card()]).model_dump(mode="json"))

    @v1.get("/models/{model:path}")  # a served name may hold slashes: "meta-llama/Llama-3.1-8B-Instruct"
    async def retrieve_model(model: str) -> JSONResponse:
        if not model:  # "/v1/models/": the list, as without the slash
            return await list_models()
        card = await model_card()
        if model != card.id:
            raise model_not_found(model)
        return JSONResponse(card.model_dump(mode="json"))

    async def admit(body: GenerationRequest, id_prefix: str) -> tuple[CompletionIdentity, Generation]:
        """The served model's check and an admission slot (held by the Generation)."""
        model = await served_model()
        if body.model != model:
            raise model_not_found(body.model)
        if not admission.try_enter():
            raise rate_limited(f"Over {admission.limit} requests in flight; retry shortly.")
        identity = CompletionIdentity(
            id=f"{id_prefix}-{uuid.uuid4().hex}", created=int(time.time()), model=model
        )
        return identity, Generation(metrics, release=admission.leave, choices=body.choices)

    async def respond(
        request: Request,
        generation: Generation,
        identity: CompletionIdentity,
        begin: Callable[[], Awaitable[dict | None]],
        collect: Callable[[], Awaitable[BaseModel]],
        stream: Callable[[list[verifier_pb2.GenerateResponse]], AsyncIterator[str]] | None,
    ) -> Response:
        """Runs ``begin`` (which starts the generation and may return what memory added),
        then replies with ``collect``'s body or, given ``stream``, its server-sent events.
        The generation is closed however this ends, or, when streaming, once the stream does."""
        streaming = False
        try:
            memory_info = await begin()
            if stream is None:
                payload = (await run_unless_disconnected(request, collect())).model_dump(mode="json")
                if memory_info is not None:
                    payload["memory"] = memory_info  # Aerie extension: what memory contributed
                return JSONResponse(payload)
            # Wait for every choice's first response before sending headers, so that the
            # verifier refusing the request (too long, too busy, down) is still an HTTP status.
            firsts = await run_unless_disconnected(request, generation.firsts())
            events = stream(firsts)
            if memory_info is not None:
                events = with_memory_in_first_chunk(events, memory_info)
            streaming = True
            return ClosingStreamingResponse(
                events,
                on_close=generation.close,
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        except ClientDisconnected:
            log.info("%s: client disconnected, generation cancelled", identity.id)
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        finally:
            if not streaming:
                generation.close()

    # With "stream": true the reply is server-sent events; the OpenAPI schema says so.
    @v1.post("/chat/completions", responses={200: {"content": {"text/event-stream": {}}}})
    async def chat_completions(body: ChatCompletionRequest, request: Request, key: AdmittedKey) -> Response:
        if body.memory is not None:
            key.check_namespace(body.memory.namespace)
        identity, generation = await admit(body, "chatcmpl")
        tools = ToolUse.of(body)

        async def begin() -> dict | None:
            nonlocal body
            body = await with_model_defaults(body)
            memory_info = None
            if body.memory is not None:
                composer = MemoryComposer(backends.memory, backends.verifier, settings, metrics)
                body, memory_info = await run_unless_disconnected(request, composer.run(body))
            generation.start(
                backends.verifier, to_generate_requests(body, identity.id), settings.grpc_timeout_s
            )
            return memory_info

        return await respond(
            request,
            generation,
            identity,
            begin,
            lambda: collect_completion(generation, identity, body.logprobs, tools, settings.reasoning_parser),
            (
                lambda firsts: stream_chunks(
                    generation,
                    firsts,
                    identity,
                    body.include_usage,
                    body.logprobs,
                    tools,
                    settings.reasoning_parser,
                )
            )
            if body.stream
            else None,
        )

    @v1.post("/completions", responses={200: {"content": {"text/event-stream": {}}}})
    async def completions(body: CompletionRequest, request: Request) -> Response:
        identity, generation = await admit(body, "cmpl")

        async def begin() -> None:
            requests = legacy.to_generate_requests(await with_model_defaults(body), identity.id)
            generation.start(backends.verifier, requests, settings.grpc_timeout_s)

        return await respond(
            request,
            generation,
            identity,
            begin,
            lambda: legacy.collect_completion(generation, identity, body),
            (lambda firsts: legacy.stream_completion(generation, firsts, identity, body))
            if body.stream
            else None,
        )

    app.include_router(v1)

    # vLLM's tokenizer endpoints (at the root, as vLLM serves them).
    tokenizer = APIRouter(dependencies=[Depends(admitted_key)])

    async def check_model(model: str | None) -> None:
        if model is not None and model != await served_model():
            raise model_not_found(model)

    @tokenizer.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        """A prompt's token ids as /v1/completions reads it, or messages' as
        /v1/chat/completions renders them; ``count`` is that endpoint's prompt_tokens."""
        await check_model(body.model)
        request = verifier_pb2.TokenizeRequest(
            messages=[verifier_message(m) for m in body.messages or []],
            text=body.prompt or "",
            add_special_tokens=body.add_special_tokens,
            tools_json=tools_json(body.tools) if body.tools else "",
            chat_template=template_options(body),
        )
        try:
            reply = await backends.verifier.Tokenize(request, timeout=settings.grpc_timeout_s)
            info = await backends.model_info()
        except grpc.aio.AioRpcError as err:
            raise error_from_grpc(err) from err
        return TokenizeResponse(
            count=len(reply.token_ids),
            max_model_len=info.context_length,
            tokens=list(reply.token_ids),
            token_strs=list(reply.token_strs) if body.return_token_strs else None,
        )

    @tokenizer.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        await check_model(body.model)
        try:
            reply = await backends.verifier.Detokenize(
                verifier_pb2.DetokenizeRequest(token_ids=body.tokens), timeout=settings.grpc_timeout_s
            )
        except grpc.aio.AioRpcError as err:
            raise error_from_grpc(err) from err
        return DetokenizeResponse(prompt=reply.text)

    app.include_router(tokenizer)
    app.include_router(build_memory_router(backends, settings))

    @app.get("/health")
    async def health() -> dict[str, str]:
        """Liveness: the process answers. Backends are /ready's business."""
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> dict[str, object]:
        if drain.draining:
            raise service_unavailable("Not ready: the gateway is shutting down.")
        status = await backends.readiness()
        down = [name for name, ok in status.items() if not ok]
        if down:
            raise service_unavailable(
                f"Not ready: no answer from {', '.join(down)}.", extra={"backends": status}
            )
        return {"status": "ready", "backends": status}

    @app.get(
        "/metrics",
        response_class=PlainTextResponse,  # for the OpenAPI schema: Prometheus' text format
        dependencies=[Depends(authenticated_key)] if settings.metrics_require_key else [],
    )
    async def prometheus_metrics() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    # Added last, so outermost: a draining gateway refuses before any other work.
    app.add_middleware(DrainMiddleware, drain=drain)
    return app
