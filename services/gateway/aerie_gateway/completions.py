"""Legacy completions (``/v1/completions``) over the verifier's Generate stream: a raw
prompt (text, or token ids) continued as it is, no chat template. vLLM's and SGLang's
serving benchmarks, and lm-eval's generation tasks, speak this API. The call's lifetime is
chat's (aerie_gateway.chat.Generation); only the shapes differ."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

from aerie_proto.v1 import verifier_pb2

from .chat import CompletionIdentity, Generation, finite_logprob, sampling_of, sse, token_text, usage_of
from .errors import APIError
from .metrics import FINISH_REASONS
from .schemas import Completion, CompletionChoice, CompletionLogprobs, CompletionRequest

log = logging.getLogger(__name__)


def to_generate_request(body: CompletionRequest, request_id: str) -> verifier_pb2.GenerateRequest:
    text_prompt = isinstance(body.prompt, str)
    logprobs = body.logprobs is not None
    return verifier_pb2.GenerateRequest(
        request_id=request_id,
        prompt=body.prompt if text_prompt else "",
        prompt_token_ids=[] if text_prompt else body.prompt,
        sampling=sampling_of(body, body.max_tokens, logprobs, body.logprobs or 0),
        speculative=body.speculative,
    )


class LegacyLogprobs:
    """Builds the legacy logprobs of a choice's tokens, keeping each token's offset in the
    choice's text across the chunks of a stream."""

    def __init__(self, start_offset: int):
        self.offset = start_offset

    def of(self, response: verifier_pb2.GenerateResponse) -> CompletionLogprobs:
        tokens, chosen, tops, offsets = [], [], [], []
        for entry in response.logprobs:
            text = token_text(entry)
            tokens.append(text)
            chosen.append(finite_logprob(entry))
            # the alternatives, and the chosen token itself as OpenAI's do
            top = {token_text(alternative): finite_logprob(alternative) for alternative in entry.top}
            tops.append(top | {text: finite_logprob(entry)})
            offsets.append(self.offset)
            self.offset += len(text)
        return CompletionLogprobs(
            tokens=tokens, token_logprobs=chosen, top_logprobs=tops, text_offset=offsets
        )


def _echoed(body: CompletionRequest) -> str:
    return body.prompt if body.echo else ""


async def collect_completion(
    generation: Generation, identity: CompletionIdentity, body: CompletionRequest
) -> Completion:
    text = [_echoed(body)]
    logprobs = LegacyLogprobs(len(text[0])) if body.logprobs is not None else None
    merged = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    response = await generation.next()
    while True:
        text.append(response.text)
        if logprobs is not None:
            part = logprobs.of(response)
            for name in CompletionLogprobs.model_fields:
                getattr(merged, name).extend(getattr(part, name))
        finish_reason = FINISH_REASONS.get(response.finish_reason)
        if finish_reason is not None:
            break
        response = await generation.next()
    choice = CompletionChoice(
        text="".join(text), logprobs=merged if logprobs is not None else None, finish_reason=finish_reason
    )
    return Completion(
        id=identity.id,
        created=identity.created,
        model=identity.model,
        choices=[choice],
        usage=usage_of(response),
    )


async def stream_completion(
    generation: Generation,
    first: verifier_pb2.GenerateResponse,
    identity: CompletionIdentity,
    body: CompletionRequest,
) -> AsyncIterator[str]:
    """Server-sent text_completion chunks for a stream whose first response has already
    arrived; the echoed prompt, if asked, comes first. Errors after the headers went out can
    only be reported in-band."""

    def chunk(choices: list[CompletionChoice], usage=None) -> str:
        completion = Completion(
            id=identity.id, created=identity.created, model=identity.model, choices=choices, usage=usage
        )
        return sse(completion.model_dump_json())

    echoed = _echoed(body)
    logprobs = LegacyLogprobs(len(echoed)) if body.logprobs is not None else None
    if echoed:
        yield chunk([CompletionChoice(text=echoed)])
    response = first
    try:
        while True:
            if response.text or (logprobs is not None and response.logprobs):
                part = logprobs.of(response) if logprobs is not None else None
                yield chunk([CompletionChoice(text=response.text, logprobs=part)])
            finish_reason = FINISH_REASONS.get(response.finish_reason)
            if finish_reason is not None:
                break
            response = await generation.next()
        yield chunk([CompletionChoice(text="", finish_reason=finish_reason)])
        if body.include_usage:
            yield chunk([], usage=usage_of(response))
    except APIError as err:
        log.warning("%s failed mid-stream: %s", identity.id, err.message)
        yield sse(json.dumps(err.body()))
    yield sse("[DONE]")
