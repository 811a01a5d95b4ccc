"""Chat completions over the verifier's Generate stream: request mapping, the call's
lifetime, and the two response shapes (one JSON body, or server-sent chunks)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc
from aerie_proto.v1 import verifier_pb2, verifier_pb2_grpc
from fastapi import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from .errors import APIError, error_from_grpc
from .metrics import FINISH_REASONS, RequestTracker
from .schemas import (
    LEAST_LOGPROB,
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    Delta,
    GenerationRequest,
    ResponseFormat,
    SpeculativeUsage,
    StructuredOutputs,
    TokenLogprob,
    TopLogprob,
    Usage,
)

log = logging.getLogger(__name__)

T = TypeVar("T")


def structured_output(
    structured: StructuredOutputs | None, response_format: ResponseFormat | None = None
) -> verifier_pb2.StructuredOutput | None:
    """A request's structured_outputs or response_format, as the verifier takes them."""
    if response_format is not None and response_format.type == "json_object":
        return verifier_pb2.StructuredOutput(json_object=True)
    if response_format is not None and response_format.type == "json_schema":
        return verifier_pb2.StructuredOutput(json_schema=json.dumps(response_format.json_schema.json_schema))
    if structured is None:
        return None
    if isinstance(structured.json_schema, str):
        return verifier_pb2.StructuredOutput(json_schema=structured.json_schema)
    if structured.json_schema is not None:
        return verifier_pb2.StructuredOutput(json_schema=json.dumps(structured.json_schema))
    if structured.choice is not None:
        return verifier_pb2.StructuredOutput(
            choice=verifier_pb2.StructuredOutput.Choice(options=structured.choice)
        )
    if structured.regex is not None:
        return verifier_pb2.StructuredOutput(regex=structured.regex)
    return verifier_pb2.StructuredOutput(grammar=structured.grammar)


def sampling_of(
    body: GenerationRequest,
    max_tokens: int,
    logprobs: bool,
    top_logprobs: int,
    response_format: ResponseFormat | None = None,
) -> verifier_pb2.SamplingParams:
    sampling = verifier_pb2.SamplingParams(
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        stop=body.stop,
        max_tokens=max_tokens,
        frequency_penalty=body.frequency_penalty,
        presence_penalty=body.presence_penalty,
        repetition_penalty=body.repetition_penalty,
        logit_bias=body.token_logit_bias,
        structured=structured_output(body.structured_outputs, response_format),
        ignore_eos=body.ignore_eos,
        min_tokens=body.min_tokens,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    )
    if body.seed is not None:
        sampling.seed = body.seed
    return sampling


def to_generate_request(body: ChatCompletionRequest, request_id: str) -> verifier_pb2.GenerateRequest:
    return verifier_pb2.GenerateRequest(
        request_id=request_id,
        messages=[verifier_pb2.ChatMessage(role=m.verifier_role, content=m.text) for m in body.messages],
        sampling=sampling_of(
            body, body.completion_token_limit, body.logprobs, body.top_logprobs, body.response_format
        ),
        speculative=body.speculative,
    )


class Generation:
    """One Generate call, from admission on. ``next`` maps gRPC failures to HTTP errors
    and feeds the metrics; ``close`` cancels the call (so the verifier stops generating
    for a client that left), closes the metrics and frees the admission slot. ``close``
    is idempotent and safe whether or not the call started."""

    def __init__(self, tracker: RequestTracker, release: Callable[[], None]):
        self._tracker = tracker
        self._release = release
        self._call: grpc.aio.UnaryStreamCall | None = None
        self._closed = False

    def start(
        self,
        verifier: verifier_pb2_grpc.VerifierStub,
        request: verifier_pb2.GenerateRequest,
        timeout_s: float,
    ) -> None:
        self._call = verifier.Generate(request, timeout=timeout_s)

    async def next(self) -> verifier_pb2.GenerateResponse:
        try:
            response = await self._call.read()
        except grpc.aio.AioRpcError as err:
            raise error_from_grpc(err) from err
        if response is grpc.aio.EOF:
            # The contract puts a finish reason on the last message; callers stop there.
            raise APIError(500, "The model backend ended the reply without a finish reason.", "server_error")
        self._tracker.observe(response)
        return response

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._call is not None:
            self._call.cancel()
        self._tracker.close()
        self._release()


@dataclass(frozen=True)
class CompletionIdentity:
    """What every response body and chunk of one completion repeats."""

    id: str
    created: int
    model: str


def usage_of(final: verifier_pb2.GenerateResponse) -> Usage:
    speculative = None
    if final.HasField("speculative") and final.speculative.drafts > 0:
        stats = final.speculative
        speculative = SpeculativeUsage(
            drafts=stats.drafts,
            draft_tokens=stats.draft_tokens,
            accepted_tokens=stats.accepted_tokens,
            mean_acceptance_length=stats.mean_acceptance_length,
        )
    return Usage(
        prompt_tokens=final.prompt_tokens,
        completion_tokens=final.completion_tokens,
        total_tokens=final.prompt_tokens + final.completion_tokens,
        speculative=speculative,
    )


def token_text(entry: verifier_pb2.TokenLogprob) -> str:
    """A token's text; one holding part of a character spells that part as escapes."""
    return entry.token_bytes.decode("utf-8", errors="backslashreplace")


def finite_logprob(entry: verifier_pb2.TokenLogprob) -> float:
    return max(entry.logprob, LEAST_LOGPROB)


def _top_logprob(entry: verifier_pb2.TokenLogprob) -> TopLogprob:
    return TopLogprob(token=token_text(entry), logprob=finite_logprob(entry), bytes=list(entry.token_bytes))


def logprobs_of(response: verifier_pb2.GenerateResponse) -> list[TokenLogprob]:
    """The OpenAI logprobs entries of the tokens ``response`` carries."""
    return [
        TokenLogprob(
            **_top_logprob(entry).model_dump(), top_logprobs=[_top_logprob(top) for top in entry.top]
        )
        for entry in response.logprobs
    ]


async def collect_completion(
    generation: Generation, identity: CompletionIdentity, logprobs: bool
) -> ChatCompletion:
    text: list[str] = []
    token_logprobs: list[TokenLogprob] = []
    response = await generation.next()
    while True:
        text.append(response.text)
        token_logprobs += logprobs_of(response)
        finish_reason = FINISH_REASONS.get(response.finish_reason)
        if finish_reason is not None:
            break
        response = await generation.next()
    choice = Choice(
        message=AssistantMessage(content="".join(text)),
        logprobs=ChoiceLogprobs(content=token_logprobs) if logprobs else None,
        finish_reason=finish_reason,
    )
    return ChatCompletion(
        id=identity.id,
        created=identity.created,
        model=identity.model,
        choices=[choice],
        usage=usage_of(response),
    )


def sse(payload: str) -> str:
    return f"data: {payload}\n\n"


async def stream_chunks(
    generation: Generation,
    first: verifier_pb2.GenerateResponse,
    identity: CompletionIdentity,
    include_usage: bool,
    logprobs: bool,
) -> AsyncIterator[str]:
    """Server-sent chat.completion.chunk events for a stream whose first response has
    already arrived. Errors after the headers went out can only be reported in-band. With
    ``logprobs``, each chunk carries the entries of the tokens that came with it, and a
    chunk goes out for tokens whose text is still held back (a possible stop string)."""

    def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> str:
        body = ChatCompletionChunk(
            id=identity.id, created=identity.created, model=identity.model, choices=choices, usage=usage
        )
        return sse(body.model_dump_json())

    yield chunk([ChunkChoice(delta=Delta(role="assistant", content=""))])
    response = first
    try:
        while True:
            if logprobs and response.logprobs:
                content = ChoiceLogprobs(content=logprobs_of(response))
                yield chunk([ChunkChoice(delta=Delta(content=response.text), logprobs=content)])
            elif response.text:
                yield chunk([ChunkChoice(delta=Delta(content=response.text))])
            finish_reason = FINISH_REASONS.get(response.finish_reason)
            if finish_reason is not None:
                break
            response = await generation.next()
        yield chunk([ChunkChoice(delta=Delta(), finish_reason=finish_reason)])
        if include_usage:
            yield chunk([], usage=usage_of(response))
    except APIError as err:
        log.warning("%s failed mid-stream: %s", identity.id, err.message)
        yield sse(json.dumps(err.body()))
    yield sse("[DONE]")


class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that runs ``on_close`` however the response ends: finished,
    failed, or cut short by a client disconnect (Starlette then cancels the body)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None], **kwargs):
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


class ClientDisconnected(Exception):
    pass


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def run_unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it if the HTTP client disconnects first (then raise
    ClientDisconnected). FastAPI does not notice a client leaving while a handler waits."""
    work_task = asyncio.ensure_future(work)
    disconnect_task = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({work_task, disconnect_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        disconnect_task.cancel()
        work_task.cancel()  # no-op once it is done
    if work_task in done:
        return work_task.result()
    await asyncio.wait({work_task})  # let its cleanup run before reporting
    raise ClientDisconnected
