"""Legacy completions (``/v1/completions``) over the verifier's Generate stream: a raw
prompt (text, or token ids) continued as it is, no chat template. vLLM's and SGLang's
serving benchmarks, and lm-eval's generation tasks, speak this API. The call's lifetime is
chat's (aerie_gateway.chat.Generation); only the shapes differ."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

from aerie_proto.v1 import verifier_pb2

from .chat import (
    CompletionIdentity,
    Generation,
    finished,
    finite_logprob,
    one_per_choice,
    sampling_of,
    sse,
    token_text,
    usage_of,
)
from .errors import APIError
from .metrics import FINISH_REASONS
from .schemas import Completion, CompletionChoice, CompletionLogprobs, CompletionRequest

log = logging.getLogger(__name__)


def to_generate_requests(body: CompletionRequest, request_id: str) -> list[verifier_pb2.GenerateRequest]:
    """The verifier requests of every choice, prompt by prompt."""
    requests = []
    for position, prompt in enumerate(body.prompt):
        text_prompt = isinstance(prompt, str)
        request = verifier_pb2.GenerateRequest(
            request_id=request_id if len(body.prompt) == 1 else f"{request_id}-p{position}",
            prompt=prompt if text_prompt else "",
            prompt_token_ids=[] if text_prompt else prompt,
            sampling=sampling_of(body, body.max_tokens, body.logprobs is not None, body.logprobs or 0),
            speculative=body.speculative,
        )
        request.sampling.prompt_logprobs = body.scores_prompt(prompt)
        requests += one_per_choice(request, body.n)
    return requests


class LegacyLogprobs:
    """Builds the legacy logprobs of a choice's tokens, keeping each token's offset in the
    choice's text across the chunks of a stream."""

    def __init__(self) -> None:
        self.offset = 0

    def of(self, entries) -> CompletionLogprobs:
        tokens, chosen, tops, offsets = [], [], [], []
        for entry in entries:
            text = token_text(entry)
            tokens.append(text)
            offsets.append(self.offset)
            self.offset += len(text)
            if not entry.HasField("logprob"):  # an echoed prompt's first token
                chosen.append(None)
                tops.append(None)
                continue
            chosen.append(finite_logprob(entry))
            # the alternatives, and the chosen token itself as OpenAI's do
            top = {token_text(alternative): finite_logprob(alternative) for alternative in entry.top}
            tops.append(top | {text: finite_logprob(entry)})
        return CompletionLogprobs(
            tokens=tokens, token_logprobs=chosen, top_logprobs=tops, text_offset=offsets
        )


def echoed(body: CompletionRequest, index: int, first: verifier_pb2.GenerateResponse) -> str:
    """Choice ``index``'s prompt as the reply repeats it (with ``echo``): a text as it was
    sent, token ids as their bytes spell them."""
    if not body.echo:
        return ""
    prompt = body.prompt[index // body.n]
    if isinstance(prompt, str):
        return prompt
    return b"".join(entry.token_bytes for entry in first.prompt_logprobs).decode("utf-8", errors="replace")


async def collect_completion(
    generation: Generation, identity: CompletionIdentity, body: CompletionRequest
) -> Completion:
    async def collect(index: int) -> tuple[CompletionChoice, verifier_pb2.GenerateResponse]:
        response = await generation.next(index)
        text = [echoed(body, index, response)]
        logprobs = LegacyLogprobs() if body.logprobs is not None else None
        parts: list[CompletionLogprobs] = []
        if logprobs is not None and body.echo:
            parts.append(logprobs.of(response.prompt_logprobs))
        while True:
            text.append(response.text)
            if logprobs is not None:
                parts.append(logprobs.of(response.logprobs))
            if finished(response):
                break
            response = await generation.next(index)
        merged = None
        if logprobs is not None:
            fields = CompletionLogprobs.model_fields
            merged = CompletionLogprobs(
                **{name: [x for part in parts for x in getattr(part, name)] for name in fields}
            )
        finish_reason = FINISH_REASONS[response.finish_reason]
        return CompletionChoice(
            index=index, text="".join(text), logprobs=merged, finish_reason=finish_reason
        ), response

    collected = await asyncio.gather(*(collect(index) for index in range(generation.choices)))
    return Completion(
        id=identity.id,
        created=identity.created,
        model=identity.model,
        choices=[choice for choice, _ in collected],
        usage=usage_of([final for _, final in collected], prompts=len(body.prompt)),
    )


async def stream_completion(
    generation: Generation,
    firsts: list[verifier_pb2.GenerateResponse],
    identity: CompletionIdentity,
    body: CompletionRequest,
) -> AsyncIterator[str]:
    """Server-sent text_completion chunks for a stream whose choices' first responses have
    already arrived; each choice's echoed prompt, if asked, comes first, then the choices'
    chunks interleave as they come. Errors after the headers went out can only be reported
    in-band."""

    def chunk(choices: list[CompletionChoice], usage=None) -> str:
        completion = Completion(
            id=identity.id, created=identity.created, model=identity.model, choices=choices, usage=usage
        )
        return sse(completion.model_dump_json())

    logprobs = [LegacyLogprobs() if body.logprobs is not None else None for _ in firsts]
    if body.echo:
        for index, first in enumerate(firsts):
            prompt_part = logprobs[index].of(first.prompt_logprobs) if logprobs[index] is not None else None
            yield chunk(
                [CompletionChoice(index=index, text=echoed(body, index, first), logprobs=prompt_part)]
            )
    finals = list(firsts)
    try:
        async for index, response in generation.responses(firsts):
            choice_logprobs = logprobs[index]
            if response.text or (choice_logprobs is not None and response.logprobs):
                part = choice_logprobs.of(response.logprobs) if choice_logprobs is not None else None
                yield chunk([CompletionChoice(index=index, text=response.text, logprobs=part)])
            if finished(response):
                finals[index] = response
                finish_reason = FINISH_REASONS[response.finish_reason]
                yield chunk([CompletionChoice(index=index, text="", finish_reason=finish_reason)])
        if body.include_usage:
            yield chunk([], usage=usage_of(finals, prompts=len(body.prompt)))
    except APIError as err:
        log.warning("%s failed mid-stream: %s", identity.id, err.message)
        yield sse(json.dumps(err.body()))
    yield sse("[DONE]")
