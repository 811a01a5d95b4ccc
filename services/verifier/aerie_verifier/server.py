"""gRPC adapter: the Verifier service over the generation engine."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from typing import Any

import grpc
from aerie_proto.v1 import verifier_pb2, verifier_pb2_grpc

from aerie_verifier.chat_format import TemplateOptions
from aerie_verifier.detokenize import token_bytes_table
from aerie_verifier.engine import Engine, GenerationEvent, PromptTooLongError, QueueFullError
from aerie_verifier.sampling import SamplingParams, TokenLogprob
from aerie_verifier.speculative import SpeculativeStats
from aerie_verifier.structured_output import StructuredOutput

log = logging.getLogger(__name__)

_FINISH = {
    None: verifier_pb2.FINISH_REASON_UNSPECIFIED,
    "stop": verifier_pb2.FINISH_REASON_STOP,
    "length": verifier_pb2.FINISH_REASON_LENGTH,
}
SERVICE_NAME = verifier_pb2.DESCRIPTOR.services_by_name["Verifier"].full_name


def _structured_from_proto(p: verifier_pb2.StructuredOutput) -> StructuredOutput | None:
    kind = p.WhichOneof("constraint")
    if kind is None:
        return None
    if kind == "choice":
        return StructuredOutput.choice(list(p.choice.options))
    if kind == "json_object":
        return StructuredOutput("json_object") if p.json_object else None
    return StructuredOutput(kind, getattr(p, kind))


def sampling_from_proto(p: verifier_pb2.SamplingParams) -> SamplingParams:
    return SamplingParams(
        temperature=p.temperature,
        top_p=p.top_p if p.top_p != 0 else 1.0,  # unset; NaN and negatives are for the check
        top_k=p.top_k,
        min_p=p.min_p,
        seed=p.seed if p.HasField("seed") else None,
        stop=tuple(p.stop),
        max_tokens=p.max_tokens,
        frequency_penalty=p.frequency_penalty,
        presence_penalty=p.presence_penalty,
        repetition_penalty=p.repetition_penalty if p.HasField("repetition_penalty") else 1.0,
        logit_bias=tuple(sorted(p.logit_bias.items())),
        structured=_structured_from_proto(p.structured),
        ignore_eos=p.ignore_eos,
        min_tokens=p.min_tokens,
        stop_token_ids=frozenset(p.stop_token_ids),
        logprobs=p.logprobs,
        top_logprobs=p.top_logprobs,
        prompt_logprobs=p.prompt_logprobs,
    )


def _stats_to_proto(stats: SpeculativeStats | None) -> verifier_pb2.SpeculativeStats | None:
    if stats is None:
        return None
    return verifier_pb2.SpeculativeStats(
        drafts=stats.drafts,
        draft_tokens=stats.draft_tokens,
        accepted_tokens=stats.accepted_tokens,
        mean_acceptance_length=stats.mean_acceptance_length,
        accepted_per_position=stats.accepted_per_position,
    )


def _logprobs_to_proto(
    logprobs: list[TokenLogprob], token_bytes: list[bytes]
) -> list[verifier_pb2.TokenLogprob]:
    def spell(token_id: int) -> bytes:  # a model's vocabulary may have rows past its tokenizer's
        return token_bytes[token_id] if token_id < len(token_bytes) else b""

    return [
        verifier_pb2.TokenLogprob(
            token_id=entry.token_id,
            token_bytes=spell(entry.token_id),
            logprob=entry.logprob,
            top=[
                verifier_pb2.TokenLogprob(token_id=token_id, token_bytes=spell(token_id), logprob=logprob)
                for token_id, logprob in entry.top
            ],
        )
        for entry in logprobs
    ]


def _json(text: str, field: str) -> Any:
    """A request's JSON text field, parsed; ValueError naming the field where it is not JSON."""
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{field} is not JSON: {exc}") from None


def _json_list(text: str, field: str) -> list | None:
    """A JSON list sent as text (empty: none)."""
    if not text:
        return None
    value = _json(text, field)
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise ValueError(f"{field} must be a JSON list of objects")
    return value


def _template_options(options: verifier_pb2.ChatTemplateOptions) -> TemplateOptions:
    kwargs = _json(options.kwargs_json, "chat_template kwargs_json") if options.kwargs_json else {}
    if not isinstance(kwargs, dict):
        raise ValueError("chat_template kwargs_json must be a JSON object")
    return TemplateOptions(
        add_generation_prompt=(
            options.add_generation_prompt if options.HasField("add_generation_prompt") else True
        ),
        continue_final_message=options.continue_final_message,
        kwargs=kwargs,
    )


def _message_dict(message: verifier_pb2.ChatMessage) -> dict:
    """A chat message as chat_format.template_inputs takes it."""
    as_dict: dict = {"role": message.role, "content": message.content}
    if message.tool_calls_json:
        as_dict["tool_calls"] = _json_list(message.tool_calls_json, "tool_calls_json")
    if message.tool_call_id:
        as_dict["tool_call_id"] = message.tool_call_id
    return as_dict


class VerifierServicer(verifier_pb2_grpc.VerifierServicer):
    def __init__(
        self,
        engine: Engine,
        model_id: str,
        device: str,
        dtype: str,
        sampling_defaults: dict[str, float] | None = None,
    ):
        self.engine = engine
        self.model_id = model_id
        self.device = device
        self.dtype = dtype
        self.sampling_defaults = sampling_defaults or {}  # see aerie_verifier.sampling.sampling_defaults
        # No token stands for more characters than its own spelling has, so messages longer
        # than this cannot fit the context: refused without tokenising them, which takes
        # seconds a megabyte on this event loop.
        self.max_token_chars = max(map(len, engine.tokenizer.get_vocab()))
        self.max_prompt_chars = engine.context_length * self.max_token_chars

    def _check_prompt_chars(self, messages, tools_json: str) -> None:
        chars = sum(len(m.role) + len(m.content) + len(m.tool_calls_json) for m in messages) + len(tools_json)
        self._check_chars(chars, "the messages hold")

    def _check_chars(self, chars: int, what: str) -> None:
        if chars > self.max_prompt_chars:
            least_tokens = -(-chars // self.max_token_chars)
            raise PromptTooLongError(
                f"{what} {chars} characters, at least {least_tokens} tokens (a token is at most "
                f"{self.max_token_chars} characters), {least_tokens - self.engine.context_length + 1} too many "
                f"for this model's context length of {self.engine.context_length} tokens"
            )

    def _prompt_ids(
        self,
        messages,
        prompt_token_ids,
        prompt: str = "",
        tools_json: str = "",
        chat_template: verifier_pb2.ChatTemplateOptions | None = None,
    ) -> list[int]:
        if sum(map(bool, (messages, prompt_token_ids, prompt))) > 1:
            raise ValueError("give one of messages, prompt_token_ids and prompt")
        if messages:
            self._check_prompt_chars(messages, tools_json)
            return self.engine.encode_chat(
                [_message_dict(m) for m in messages],
                _json_list(tools_json, "tools_json"),
                _template_options(chat_template or verifier_pb2.ChatTemplateOptions()),
            )
        if prompt:
            self._check_chars(len(prompt), "the prompt holds")
            return self.engine.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        return list(prompt_token_ids)

    async def Generate(self, request, context):
        try:
            params = sampling_from_proto(request.sampling)
            # Tokenising (and the chat template) takes a while on long prompts: off the loop.
            prompt_ids = await asyncio.to_thread(
                self._prompt_ids,
                request.messages,
                request.prompt_token_ids,
                request.prompt,
                request.tools_json,
                request.chat_template,
            )
            # and so does compiling a structured output's grammar
            grammar = None
            if params.structured is not None:
                grammar = await asyncio.to_thread(self.engine.grammars.compile, params.structured)
        except (ValueError, TypeError) as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[GenerationEvent] = asyncio.Queue()

        def on_event(event: GenerationEvent) -> None:  # engine thread
            loop.call_soon_threadsafe(events.put_nowait, event)

        try:
            handle = self.engine.submit(
                request.request_id,
                prompt_ids,
                params,
                on_event,
                speculative=request.speculative,
                grammar=grammar,
            )
        except PromptTooLongError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except QueueFullError as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"verifier queue is full: {exc}")

        finished = False
        try:
            while not finished:
                event = await events.get()
                if event.error is not None:
                    await context.abort(grpc.StatusCode.INTERNAL, f"generation failed: {event.error}")
                finished = event.finish_reason is not None
                yield verifier_pb2.GenerateResponse(
                    token_ids=event.token_ids,
                    text=event.text,
                    finish_reason=_FINISH[event.finish_reason],
                    prompt_tokens=event.prompt_tokens,
                    cached_prompt_tokens=event.cached_prompt_tokens,
                    completion_tokens=event.completion_tokens,
                    speculative=_stats_to_proto(event.speculative),
                    logprobs=self._logprobs(event.logprobs),
                    prompt_logprobs=self._logprobs(event.prompt_logprobs),
                )
        finally:
            # Runs on normal completion too (harmless then); on a caller that went away
            # or passed its deadline it stops the engine working for nobody.
            if not finished:
                handle.cancel()

    @functools.cached_property
    def token_bytes(self) -> list[bytes]:
        """Each token id's bytes, for logprobs: built at the first request for them (0.1 s)."""
        return token_bytes_table(self.engine.tokenizer)

    def _logprobs(self, logprobs: list[TokenLogprob] | None) -> list[verifier_pb2.TokenLogprob]:
        return _logprobs_to_proto(logprobs, self.token_bytes) if logprobs else []

    async def GetModelInfo(self, request, context):
        config = self.engine.model.config
        return verifier_pb2.ModelInfo(
            model_id=self.model_id,
            context_length=self.engine.context_length,
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            num_layers=config.num_hidden_layers,
            device=self.device,
            dtype=self.dtype,
            sampling_defaults=verifier_pb2.SamplingDefaults(**self.sampling_defaults),
        )

    async def GetLoad(self, request, context):
        return verifier_pb2.Load(
            running=self.engine.num_running,
            waiting=self.engine.num_waiting,
            finished_total=self.engine.finished_total,
            cancelled_total=self.engine.cancelled_total,
        )

    async def Tokenize(self, request, context):
        try:
            ids = await asyncio.to_thread(self._tokenize, request)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return verifier_pb2.TokenizeResponse(
            token_ids=ids, token_strs=self.engine.tokenizer.convert_ids_to_tokens(ids)
        )

    def _tokenize(self, request) -> list[int]:
        if request.messages:
            return self._prompt_ids(
                request.messages, [], tools_json=request.tools_json, chat_template=request.chat_template
            )
        self._check_chars(len(request.text), "the text holds")
        return self.engine.tokenizer(request.text, add_special_tokens=request.add_special_tokens)["input_ids"]

    async def Detokenize(self, request, context):
        vocab_size = self.engine.vocab_size
        if any(not 0 <= token < vocab_size for token in request.token_ids):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"token ids must be in [0, {vocab_size})")
        text = await asyncio.to_thread(self.engine.tokenizer.decode, list(request.token_ids))
        return verifier_pb2.DetokenizeResponse(text=text)
