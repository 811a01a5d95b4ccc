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
from aerie_common.sampling_limits import SAMPLING_DEFAULT_FIELDS
from aerie_proto.v1 import verifier_pb2, verifier_pb2_grpc
from fastapi import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from .errors import APIError, error_from_grpc
from .metrics import FINISH_REASONS, GatewayMetrics
from .reasoning import Parser, StreamedReasoning
from .reasoning import split as split_reasoning
from .schemas import (
    LEAST_LOGPROB,
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
    ChatTemplateFields,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    Delta,
    DeltaToolCall,
    GenerationRequest,
    PromptTokensDetails,
    ResponseFormat,
    SpeculativeUsage,
    StructuredOutputs,
    TokenLogprob,
    ToolCall,
    TopLogprob,
    Usage,
)
from .tools import StreamedReply, ToolUse, tools_json

log = logging.getLogger(__name__)

T = TypeVar("T")
Body = TypeVar("Body", bound=GenerationRequest)


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


def with_sampling_defaults(body: Body, defaults: verifier_pb2.SamplingDefaults) -> Body:
    """``body`` with the served model's defaults in the sampling fields it left out (or sent
    as null); OpenAI's defaults stay where the model has none."""
    update = {
        field: getattr(defaults, field)
        for field in SAMPLING_DEFAULT_FIELDS
        if defaults.HasField(field) and field not in body.model_fields_set
    }
    return body.model_copy(update=update) if update else body


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
        min_p=body.min_p,
        stop=body.stop,
        max_tokens=max_tokens,
        frequency_penalty=body.frequency_penalty,
        presence_penalty=body.presence_penalty,
        repetition_penalty=body.repetition_penalty,
        logit_bias=body.token_logit_bias,
        structured=structured_output(body.structured_outputs, response_format),
        ignore_eos=body.ignore_eos,
        min_tokens=body.min_tokens,
        stop_token_ids=body.stop_token_ids,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    )
    if body.seed is not None:
        sampling.seed = body.seed
    return sampling


def verifier_message(message: ChatMessage) -> verifier_pb2.ChatMessage:
    calls = getattr(message, "tool_calls", None)
    return verifier_pb2.ChatMessage(
        role=message.verifier_role,
        content=message.text,
        tool_calls_json=json.dumps([call.model_dump() for call in calls]) if calls else "",
        tool_call_id=getattr(message, "tool_call_id", ""),
    )


def template_options(body: ChatTemplateFields) -> verifier_pb2.ChatTemplateOptions:
    return verifier_pb2.ChatTemplateOptions(
        add_generation_prompt=body.add_generation_prompt,
        continue_final_message=body.continue_final_message,
        kwargs_json=json.dumps(body.chat_template_kwargs) if body.chat_template_kwargs else "",
    )


def to_generate_requests(body: ChatCompletionRequest, request_id: str) -> list[verifier_pb2.GenerateRequest]:
    tools = ToolUse.of(body)
    request = verifier_pb2.GenerateRequest(
        request_id=request_id,
        messages=[verifier_message(m) for m in body.messages],
        sampling=sampling_of(
            body, body.completion_token_limit, body.logprobs, body.top_logprobs, body.response_format
        ),
        speculative=body.speculative,
        tools_json=tools_json(tools.tools) if tools is not None else "",
        chat_template=template_options(body),
    )
    if tools is not None and tools.forced:
        request.sampling.structured.CopyFrom(tools.constraint())
    return one_per_choice(request, body.n)


def assistant_reply(
    text: str, finish_reason: str, tools: ToolUse | None, reasoning_parser: Parser = ""
) -> tuple[AssistantMessage, str]:
    """A choice's message and finish reason from its whole output: with a reasoning parser,
    its thinking apart (reasoning.py); with tools, the calls its answer made
    (ToolUse.finish_reason)."""
    thinking = None
    if reasoning_parser:
        thinking, text = split_reasoning(reasoning_parser, text)
    content: str | None = text if text or thinking is None else None
    if tools is None:
        return AssistantMessage(content=content, reasoning_content=thinking), finish_reason
    content, calls = tools.reply(text)
    message = AssistantMessage(content=content, reasoning_content=thinking, tool_calls=calls or None)
    return message, tools.finish_reason(calls, finish_reason)


class ChoiceStream:
    """One choice's output as a stream sends it: its thinking apart (with a reasoning parser)
    and, with tools, its answer held where a call may begin (tools.StreamedReply)."""

    def __init__(self, tools: ToolUse | None, reasoning_parser: Parser):
        self.thinking = StreamedReasoning(reasoning_parser) if reasoning_parser else None
        self.reply = StreamedReply(tools) if tools is not None else None

    def feed(self, text: str) -> tuple[str, str]:
        """The (reasoning, content) to send after ``text``."""
        reasoning, answer = self.thinking.feed(text) if self.thinking is not None else ("", text)
        return reasoning, self.reply.feed(answer) if self.reply is not None else answer

    def finish(self) -> tuple[str, str | None, list[ToolCall]]:
        """What was held, once the output is whole: reasoning, content and calls."""
        reasoning, answer = self.thinking.finish() if self.thinking is not None else ("", "")
        if self.reply is None:
            return reasoning, answer or None, []
        answer = self.reply.feed(answer)
        rest, calls = self.reply.finish()
        return reasoning, (answer + (rest or "")) or None, calls


def one_per_choice(request: verifier_pb2.GenerateRequest, n: int) -> list[verifier_pb2.GenerateRequest]:
    """``n`` copies of ``request``, one per choice. Choice i takes seed + i, so that seeded
    choices differ from each other and each is reproducible."""
    if n == 1:
        return [request]
    requests = []
    for index in range(n):
        choice = verifier_pb2.GenerateRequest()
        choice.CopyFrom(request)
        choice.request_id = f"{request.request_id}-{index}"
        if request.sampling.HasField("seed"):  # wrapping around within int64
            choice.sampling.seed = (request.sampling.seed + index + 2**63) % 2**64 - 2**63
        requests.append(choice)
    return requests


class Generation:
    """One request's Generate calls, one per choice (``n``), from admission on. ``next``
    maps gRPC failures to HTTP errors and feeds the metrics; ``close`` cancels the calls (so
    the verifier stops generating for a client that left), closes the metrics and frees the
    admission slot. ``close`` is idempotent and safe whether or not the calls started."""

    def __init__(self, metrics: GatewayMetrics, release: Callable[[], None], choices: int = 1):
        self._release = release
        self._calls: list[grpc.aio.UnaryStreamCall] = []
        # From admission: time to first token counts what comes before the calls (memory).
        self._trackers = [metrics.track_request() for _ in range(choices)]
        self._closed = False

    def start(
        self,
        verifier: verifier_pb2_grpc.VerifierStub,
        requests: list[verifier_pb2.GenerateRequest],
        timeout_s: float,
    ) -> None:
        """One call per choice (as many requests as the choices it was made for)."""
        if len(requests) != len(self._trackers):
            raise ValueError(f"{len(requests)} requests for {len(self._trackers)} choices")
        self._calls = [verifier.Generate(request, timeout=timeout_s) for request in requests]

    @property
    def choices(self) -> int:
        return len(self._calls)

    async def next(self, choice: int = 0) -> verifier_pb2.GenerateResponse:
        try:
            response = await self._calls[choice].read()
        except grpc.aio.AioRpcError as err:
            raise error_from_grpc(err) from err
        if response is grpc.aio.EOF:
            # The contract puts a finish reason on the last message; callers stop there.
            raise APIError(500, "The model backend ended the reply without a finish reason.", "server_error")
        self._trackers[choice].observe(response)
        return response

    async def firsts(self) -> list[verifier_pb2.GenerateResponse]:
        """Every choice's first response (the verifier has taken each, or refused)."""
        return list(await asyncio.gather(*(self.next(choice) for choice in range(self.choices))))

    async def responses(
        self, firsts: list[verifier_pb2.GenerateResponse]
    ) -> AsyncIterator[tuple[int, verifier_pb2.GenerateResponse]]:
        """(choice, response) as they come, from each choice's first response to its last."""
        queue: asyncio.Queue[tuple[int, verifier_pb2.GenerateResponse | APIError]] = asyncio.Queue()

        async def follow(choice: int, response: verifier_pb2.GenerateResponse) -> None:
            try:
                while True:
                    queue.put_nowait((choice, response))
                    if finished(response):
                        return
                    response = await self.next(choice)
            except APIError as err:
                queue.put_nowait((choice, err))

        followers = [asyncio.ensure_future(follow(choice, first)) for choice, first in enumerate(firsts)]
        try:
            running = len(followers)
            while running:
                choice, item = await queue.get()
                if isinstance(item, APIError):
                    raise item
                yield choice, item
                running -= finished(item)
        finally:
            for follower in followers:
                follower.cancel()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for call in self._calls:
            call.cancel()
        for tracker in self._trackers:
            tracker.close()
        self._release()


def finished(response: verifier_pb2.GenerateResponse) -> bool:
    return response.finish_reason in FINISH_REASONS


@dataclass(frozen=True)
class CompletionIdentity:
    """What every response body and chunk of one completion repeats."""

    id: str
    created: int
    model: str


def usage_of(finals: list[verifier_pb2.GenerateResponse], prompts: int = 1) -> Usage:
    """The usage of a request from its choices' last responses, the choices of each of its
    ``prompts`` together: each prompt once, every choice's completion, and the speculation
    of those that speculated."""
    firsts_of_prompts = finals[:: len(finals) // prompts]
    prompt_tokens = sum(final.prompt_tokens for final in firsts_of_prompts)
    completion_tokens = sum(final.completion_tokens for final in finals)
    stats = [
        final.speculative for final in finals if final.HasField("speculative") and final.speculative.drafts
    ]
    speculative = None
    if stats:
        drafts, accepted = sum(s.drafts for s in stats), sum(s.accepted_tokens for s in stats)
        speculative = SpeculativeUsage(
            drafts=drafts,
            draft_tokens=sum(s.draft_tokens for s in stats),
            accepted_tokens=accepted,
            mean_acceptance_length=1 + accepted / drafts,  # vLLM's: the bonus token included
        )
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details=PromptTokensDetails(
            cached_tokens=sum(final.cached_prompt_tokens for final in firsts_of_prompts)
        ),
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
    generation: Generation,
    identity: CompletionIdentity,
    logprobs: bool,
    tools: ToolUse | None,
    reasoning_parser: Parser = "",
) -> ChatCompletion:
    async def collect(index: int) -> tuple[Choice, verifier_pb2.GenerateResponse]:
        text: list[str] = []
        token_logprobs: list[TokenLogprob] = []
        while True:
            response = await generation.next(index)
            text.append(response.text)
            token_logprobs += logprobs_of(response)
            if finished(response):
                break
        message, finish_reason = assistant_reply(
            "".join(text), FINISH_REASONS[response.finish_reason], tools, reasoning_parser
        )
        choice = Choice(
            index=index,
            message=message,
            logprobs=ChoiceLogprobs(content=token_logprobs) if logprobs else None,
            finish_reason=finish_reason,
        )
        return choice, response

    collected = await asyncio.gather(*(collect(index) for index in range(generation.choices)))
    return ChatCompletion(
        id=identity.id,
        created=identity.created,
        model=identity.model,
        choices=[choice for choice, _ in collected],
        usage=usage_of([final for _, final in collected]),
    )


def sse(payload: str) -> str:
    return f"data: {payload}\n\n"


async def stream_chunks(
    generation: Generation,
    firsts: list[verifier_pb2.GenerateResponse],
    identity: CompletionIdentity,
    include_usage: bool,
    logprobs: bool,
    tools: ToolUse | None,
    reasoning_parser: Parser = "",
) -> AsyncIterator[str]:
    """Server-sent chat.completion.chunk events for a stream whose choices' first responses
    have already arrived; the choices' chunks interleave as they come, each naming its
    choice. Errors after the headers went out can only be reported in-band. With
    ``logprobs``, each chunk carries the entries of the tokens that came with it, and a
    chunk goes out for tokens whose text is still held back (a possible stop string).
    With ``tools``, content streams until a call may have begun (tools.StreamedReply); the
    calls go out in one chunk when the choice ends. With a reasoning parser, the thinking
    streams as ``reasoning_content`` (ChoiceStream)."""

    def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> str:
        body = ChatCompletionChunk(
            id=identity.id, created=identity.created, model=identity.model, choices=choices, usage=usage
        )
        return sse(body.model_dump_json())

    for index in range(len(firsts)):
        yield chunk([ChunkChoice(index=index, delta=Delta(role="assistant", content=""))])
    finals: list[verifier_pb2.GenerateResponse] = list(firsts)
    streams = [ChoiceStream(tools, reasoning_parser) for _ in firsts]
    try:
        async for index, response in generation.responses(firsts):
            reasoning, text = streams[index].feed(response.text)
            if logprobs and response.logprobs:
                content = ChoiceLogprobs(content=logprobs_of(response))
                delta = Delta(content=text, reasoning_content=reasoning or None)
                yield chunk([ChunkChoice(index=index, delta=delta, logprobs=content)])
            elif text or reasoning:
                delta = Delta(content=text or None, reasoning_content=reasoning or None)
                yield chunk([ChunkChoice(index=index, delta=delta)])
            if finished(response):
                finals[index] = response
                finish_reason = FINISH_REASONS[response.finish_reason]
                reasoning, rest, calls = streams[index].finish()
                if tools is not None:
                    finish_reason = tools.finish_reason(calls, finish_reason)
                if reasoning or rest or calls:
                    deltas = [DeltaToolCall(index=i, **call.model_dump()) for i, call in enumerate(calls)]
                    delta = Delta(
                        content=rest, reasoning_content=reasoning or None, tool_calls=deltas or None
                    )
                    yield chunk([ChunkChoice(index=index, delta=delta)])
                yield chunk([ChunkChoice(index=index, delta=Delta(), finish_reason=finish_reason)])
        if include_usage:
            yield chunk([], usage=usage_of(finals))
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
