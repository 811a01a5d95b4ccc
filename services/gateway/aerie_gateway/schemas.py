"""OpenAI chat completion request and response bodies, plus Aerie's extensions.

Requests accept what OpenAI clients commonly send and ignore fields Aerie does not use
(``user``, ``metadata``, ...). A few unions of the OpenAI schema (``content`` as a
string or parts, ``stop`` as a string or list, ``memory`` as false or options) are
normalised by before-validators instead of pydantic unions, so validation errors point at
the field itself rather than at a union branch.

Types are strict, as in OpenAI's API: ``"0.5"`` is not a temperature and ``1`` is not
``true``. Numbers are bounded to what the verifier's protobuf fields hold, so anything
out of range is a 400 here rather than a failure further in.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from aerie_common.sampling_limits import (
    MAX_LOGIT_BIAS,
    MAX_LOGIT_BIAS_TOKENS,
    MAX_PENALTY,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    MAX_TOP_LOGPROBS,
)
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
FLOAT32_MAX = 3.4028234663852886e38
# Choices per request: each is a request of its own to the verifier, which queues 64 at most.
MAX_CHOICES = 16
# A legacy completion's prompts times its n: each is a verifier call, and the verifier queues
# 64 requests (AERIE_MAX_WAITING_REQUESTS) by default.
MAX_BATCH_CHOICES = 64
# What OpenAI and vLLM report for a token the model gives no chance at all (JSON has no -inf).
LEAST_LOGPROB = -9999.0


def _text_as_parts(content: Any) -> Any:
    return [{"type": "text", "text": content}] if isinstance(content, str) else content


def _str_as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


def _false_as_none(value: Any) -> Any:
    if value is False:
        return None
    if value is True:
        raise ValueError('memory must be false or an object like {"namespace": "..."}')
    return value


def _unencodable_text_path(data: Any) -> str | None:
    """Where in a decoded JSON body a string is not valid Unicode, or None. JSON's \\u escapes
    can spell lone surrogates, which no UTF-8 (so no protobuf string, no JSON response)
    can carry. Iterative, so deeply nested bodies cannot exhaust the stack."""
    pending: list[tuple[str, Any]] = [("", data)]
    while pending:
        path, value = pending.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return path or "request body"
        elif isinstance(value, dict):
            for key, item in value.items():
                pending.append((path, key))
                pending.append((f"{path}.{key}" if path else str(key), item))
        elif isinstance(value, list):
            pending.extend((f"{path}[{index}]", item) for index, item in enumerate(value))
    return None


def _scalar(value: Any) -> Any:
    if not isinstance(value, str | int | float):  # bool is an int
        raise ValueError("Input should be a string, a number or a boolean")
    return value


# One error for a wrong value, not one per type of the union that each refused it.
Scalar = Annotated[str | int | float | bool, BeforeValidator(_scalar)]


class StrictModel(BaseModel):
    model_config = ConfigDict(strict=True)


class RequestBody(StrictModel):
    """A JSON request body: strict types, and every string valid Unicode."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        path = _unencodable_text_path(data)
        if path is not None:
            raise ValueError(f"{path} holds an unpaired UTF-16 surrogate, which is not valid Unicode")
        return data


class TextContentPart(StrictModel):
    type: Literal["text"]
    text: str


ContentParts = Annotated[list[TextContentPart], Field(min_length=1)]
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
StopStrings = Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)]


FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's
MAX_TOOLS = 128  # OpenAI's


class FunctionCall(StrictModel):
    name: str = Field(pattern=FUNCTION_NAME)
    arguments: str  # a JSON object, as text


class ToolCall(StrictModel):
    model_config = ConfigDict(extra="ignore")

    id: str = Field(min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


# json_schema_input_type: the OpenAPI schema shows what clients may send, before the
# validator normalises it.
Content = Annotated[ContentParts, BeforeValidator(_text_as_parts, json_schema_input_type=str | ContentParts)]


class _Message(StrictModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: Content | None

    @property
    def text(self) -> str:
        return "\n".join(part.text for part in self.content or ())

    @property
    def verifier_role(self) -> str:
        return "system" if self.role == "developer" else self.role


class SystemMessage(_Message):
    role: Literal["system", "developer"]  # "developer" is OpenAI's newer name for "system"
    content: Content


class UserMessage(_Message):
    role: Literal["user"]
    content: Content


class AssistantTurn(_Message):
    """An assistant message of the chat so far: text, tool calls, or both."""

    role: Literal["assistant"]
    content: Content | None = None
    tool_calls: list[ToolCall] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _content_or_calls(self) -> AssistantTurn:
        if self.content is None and not self.tool_calls:
            raise ValueError("an assistant message needs content, tool_calls or both")
        return self


class ToolMessage(_Message):
    """A tool call's result."""

    role: Literal["tool"]
    content: Content
    tool_call_id: str = Field(min_length=1, max_length=256)


ChatMessage = Annotated[
    SystemMessage | UserMessage | AssistantTurn | ToolMessage, Field(discriminator="role")
]


class StreamOptions(StrictModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class JSONSchemaFormat(StrictModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    # "schema" would shadow a BaseModel attribute; absent, any JSON value matches.
    json_schema: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None  # the schema is always enforced


class ResponseFormat(StrictModel):
    """OpenAI's response_format: free text, any JSON object, or JSON matching a schema."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_for_json_schema(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError('json_schema is needed with type "json_schema", and only then')
        return self


class StructuredOutputs(StrictModel):
    """vLLM's structured_outputs: exactly one of a JSON schema, a regular expression, a
    choice of strings or an EBNF grammar (GBNF's dialect, rule root first)."""

    model_config = ConfigDict(extra="forbid")

    json_schema: dict[str, Any] | str | None = Field(default=None, alias="json")  # a schema, or its JSON text
    regex: str | None = Field(default=None, min_length=1)
    choice: list[Annotated[str, Field(min_length=1)]] | None = Field(default=None, min_length=1)
    grammar: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputs:
        given = [
            name for name in ("json_schema", "regex", "choice", "grammar") if getattr(self, name) is not None
        ]
        if len(given) != 1:
            raise ValueError("give exactly one of json, regex, choice and grammar")
        return self


class MemoryOptions(StrictModel):
    model_config = ConfigDict(extra="forbid")

    namespace: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    # "three_stage": MEMO's grounding / entity / answer protocol; "single_pass": one question
    # to the memory, for latency.
    mode: Literal["three_stage", "single_pass"] = "three_stage"
    max_turns: int | None = Field(default=None, ge=1, le=12)


def _optional_fields_nullable(schema: dict[str, Any]) -> None:
    """The OpenAPI schema says what ``_null_means_default`` does: null is accepted for every
    optional field."""
    required = set(schema.get("required", ()))
    for name, field_schema in schema["properties"].items():
        variants = field_schema.get("anyOf", [field_schema])
        if name not in required and {"type": "null"} not in variants:
            schema["properties"][name] = {
                "anyOf": [field_schema, {"type": "null"}],
                "default": field_schema.get("default"),
            }


class ChatTemplateFields(BaseModel):
    """vLLM's fields for how messages go through the model's chat template: an assistant turn
    opened after them (as OpenAI's API always does), or the last message, an assistant's,
    left open for the model to go on with (a reply begun for it: the output continues it);
    and more variables for the template (``{"enable_thinking": false}`` for Qwen3's, say)."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _open_one_turn(self):
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError(
                "continue_final_message leaves the last message open: set add_generation_prompt to false"
            )
        messages = getattr(self, "messages", None)
        if self.continue_final_message and messages and not isinstance(messages[-1], AssistantTurn):
            raise ValueError(
                "continue_final_message goes on with the last message, which must be the assistant's"
            )
        return self


class GenerationRequest(RequestBody):
    """What chat completions and (legacy) completions share: the model, sampling, and how
    the reply comes back."""

    model_config = ConfigDict(extra="ignore", json_schema_extra=_optional_fields_nullable)

    model: str
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, le=INT32_MAX)  # vLLM's; 0 disables top-k filtering
    # vLLM's: tokens less likely than min_p times the most likely one are dropped; 0 disables
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    stop: Annotated[
        StopStrings, BeforeValidator(_str_as_list, json_schema_input_type=StopString | StopStrings)
    ] = Field(default_factory=list)
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    frequency_penalty: float = Field(default=0.0, ge=-MAX_PENALTY, le=MAX_PENALTY)
    presence_penalty: float = Field(default=0.0, ge=-MAX_PENALTY, le=MAX_PENALTY)
    # Aerie extension (vLLM's and Hugging Face's): over the prompt and the output, a
    # positive logit is divided by it, a negative one multiplied; 1 disables.
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=FLOAT32_MAX)
    # OpenAI's: token id (a JSON object's key, so a string) -> bias added to its logit.
    logit_bias: dict[str, Annotated[float, Field(ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS)]] = Field(
        default_factory=dict, max_length=MAX_LOGIT_BIAS_TOKENS
    )
    structured_outputs: StructuredOutputs | None = None  # vLLM's
    # vLLM's: decode past EOS (benchmarks of a fixed output length); no EOS, stop token id or
    # stop string ending within the first min_tokens tokens.
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0, le=INT32_MAX)
    # vLLM's: token ids that end the output as EOS does (the model's, as Tokenize gives them).
    stop_token_ids: list[Annotated[int, Field(ge=0, le=INT32_MAX)]] = Field(
        default_factory=list, max_length=MAX_STOP_TOKEN_IDS
    )
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)  # choices, each decoded on its own
    speculative: bool = True  # Aerie extension

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        # OpenAI accepts null for any optional parameter and clients do send it.
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None}
        return data

    @field_validator("logit_bias")
    @classmethod
    def _token_ids_as_keys(cls, logit_bias: dict[str, float]) -> dict[str, float]:
        for key in logit_bias:
            if not (key.isascii() and key.isdigit() and int(key) <= INT32_MAX):
                raise ValueError(f"logit_bias keys are token ids, got {key!r}")
        return logit_bias

    @property
    def token_logit_bias(self) -> dict[int, float]:
        return {int(key): bias for key, bias in self.logit_bias.items()}

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def choices(self) -> int:
        """The choices of the reply (each a verifier call)."""
        return self.n


class FunctionDefinition(StrictModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments
    strict: bool | None = None  # the arguments always match ``parameters`` here, when it is forced


class Tool(StrictModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(StrictModel):
    name: str


class NamedToolChoice(StrictModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(GenerationRequest, ChatTemplateFields):
    messages: list[ChatMessage] = Field(min_length=1)
    # OpenAI's function calling (aerie_gateway.tools): "auto" lets the model choose, "required"
    # and a named function hold decoding to the functions' argument schemas.
    tools: list[Tool] | None = Field(default=None, min_length=1, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    max_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    response_format: ResponseFormat | None = None
    logprobs: bool = False
    top_logprobs: int = Field(default=0, ge=0, le=MAX_TOP_LOGPROBS)
    # MEMO memory (Aerie extension): the memory service is questioned and its findings
    # composed into the prompt (see aerie_gateway.memory_compose); the response says what it
    # contributed.
    memory: Annotated[
        MemoryOptions | None,
        BeforeValidator(_false_as_none, json_schema_input_type=Literal[False] | MemoryOptions | None),
    ] = None

    @field_validator("response_format")
    @classmethod
    def _one_constraint(
        cls, response_format: ResponseFormat | None, info: ValidationInfo
    ) -> ResponseFormat | None:
        if (
            response_format is not None
            and response_format.type != "text"
            and info.data.get("structured_outputs")
        ):
            raise ValueError("give either structured_outputs or a JSON response_format, not both")
        return response_format

    @model_validator(mode="after")
    def _tool_choice_among_tools(self) -> ChatCompletionRequest:
        names = [tool.function.name for tool in self.tools or ()]
        if len(set(names)) < len(names):
            raise ValueError("tools must have different names")
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"tool_choice names {choice.function.name!r}, which is not among the tools")
        if choice == "required" and not names:
            raise ValueError('tool_choice "required" needs tools')
        forced = choice == "required" or isinstance(choice, NamedToolChoice)
        if forced and (
            self.structured_outputs or (self.response_format and self.response_format.type != "text")
        ):
            raise ValueError(
                "a forced tool_choice holds the output to the tools' arguments: drop the other constraint"
            )
        return self

    @model_validator(mode="after")
    def _memory_asks_a_users_question(self) -> ChatCompletionRequest:
        if self.memory is not None and self.continue_final_message:
            raise ValueError(
                "the memory is asked the last message, a user's question: continue_final_message leaves "
                "an assistant's last"
            )
        return self

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_needs_logprobs(cls, top_logprobs: int, info: ValidationInfo) -> int:
        if top_logprobs and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs set to true")
        return top_logprobs

    @property
    def completion_token_limit(self) -> int:
        """The verifier's max_tokens: 0 means up to the context length."""
        return self.max_completion_tokens or self.max_tokens or 0


def _batch_of_prompts(prompt: Any) -> Any:
    """A text, token ids, or a batch (a list) of texts or token id lists: as a list of
    prompts. One error per prompt, whichever form was meant, not one per form."""
    batched = (
        isinstance(prompt, list) and bool(prompt) and all(isinstance(item, str | list) for item in prompt)
    )
    batch = prompt if batched else [prompt]
    for position, one in enumerate(batch):
        text = isinstance(one, str) and one
        ids = isinstance(one, list) and one and all(type(t) is int and 0 <= t <= INT32_MAX for t in one)
        if not (text or ids):
            which = f"prompt {position} of the batch" if batched else "the prompt"
            raise ValueError(
                f"{which} must be a non-empty text or a non-empty list of token ids (integers >= 0)"
            )
    return batch


PromptInput = str | Annotated[list[int], Field(min_length=1)] | list[str] | list[list[int]]


class CompletionRequest(GenerationRequest):
    """OpenAI's legacy completions (what vLLM's and SGLang's serving benchmarks send)."""

    # A batch of prompts (vLLM's and OpenAI's) gets n choices each: prompt i's choice j is
    # choice i * n + j of the reply.
    prompt: Annotated[
        list[str | list[int]], BeforeValidator(_batch_of_prompts, json_schema_input_type=PromptInput)
    ]
    max_tokens: int = Field(default=16, ge=1, le=INT32_MAX)  # OpenAI's default here
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)  # alternatives per token
    echo: bool = False
    suffix: str | None = Field(default=None, description="not supported: must be empty")
    best_of: int | None = Field(default=None, ge=1, description="only 1 is supported")

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, suffix: str | None) -> str | None:
        if suffix:
            raise ValueError("suffix (fill-in-the-middle) is not supported")
        return suffix

    @field_validator("best_of")
    @classmethod
    def _best_of_one(cls, best_of: int | None) -> int | None:
        if best_of is not None and best_of > 1:
            raise ValueError("best_of above 1 is not supported; n asks for several completions")
        return best_of

    @model_validator(mode="after")
    def _batch_within_bounds(self) -> CompletionRequest:
        if self.choices > MAX_BATCH_CHOICES:
            raise ValueError(
                f"{len(self.prompt)} prompts with n = {self.n} make {self.choices} choices; "
                f"at most {MAX_BATCH_CHOICES} per request"
            )
        return self

    @property
    def choices(self) -> int:
        return len(self.prompt) * self.n

    def scores_prompt(self, prompt: str | list[int]) -> bool:
        """Whether the verifier must score ``prompt``: to echo it with logprobs (lm-eval's
        loglikelihood requests), or to spell out a prompt of token ids."""
        return self.echo and (self.logprobs is not None or not isinstance(prompt, str))


class TokenizeRequest(RequestBody, ChatTemplateFields):
    """vLLM's /tokenize: a prompt as /v1/completions reads it, or messages as
    /v1/chat/completions renders them with the chat template."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    tools: list[Tool] | None = Field(default=None, min_length=1, max_length=MAX_TOOLS)  # with messages
    add_special_tokens: bool = True  # for a prompt (a BOS, for models that have one)
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either a prompt or messages")
        if self.tools and self.messages is None:
            raise ValueError("tools go with messages")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(RequestBody):
    """vLLM's /detokenize: token ids back to text (special tokens included)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0, le=INT32_MAX)]]


class DetokenizeResponse(BaseModel):
    prompt: str


FinishReason = Literal["stop", "length", "tool_calls"]


class SpeculativeUsage(BaseModel):
    drafts: int
    draft_tokens: int
    accepted_tokens: int
    mean_acceptance_length: float


class PromptTokensDetails(BaseModel):
    cached_tokens: int  # the prompt's first tokens the verifier's prefix cache held


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    # Aerie extension, present only when speculative decoding ran.
    speculative: SpeculativeUsage | None = Field(default=None, exclude_if=lambda value: value is None)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    # vLLM's, with AERIE_REASONING_PARSER: the model's thinking, apart from its answer
    reasoning_content: str | None = Field(default=None, exclude_if=lambda value: value is None)
    tool_calls: list[ToolCall] | None = Field(default=None, exclude_if=lambda value: value is None)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]  # the token's UTF-8 bytes: a token may hold part of a character


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    """Log probabilities of the completion's tokens, one entry per token, under the model's
    own distribution (before penalties, temperature and filtering)."""

    content: list[TokenLogprob]
    refusal: None = None


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class DeltaToolCall(ToolCall):
    index: int  # the call's place among the choice's calls


class Delta(BaseModel):
    role: Literal["assistant"] | None = Field(default=None, exclude_if=lambda value: value is None)
    content: str | None = Field(default=None, exclude_if=lambda value: value is None)
    reasoning_content: str | None = Field(default=None, exclude_if=lambda value: value is None)
    tool_calls: list[DeltaToolCall] | None = Field(default=None, exclude_if=lambda value: value is None)


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    # Only the extra last chunk of a stream with include_usage carries usage.
    usage: Usage | None = Field(default=None, exclude_if=lambda value: value is None)


class CompletionLogprobs(BaseModel):
    """The legacy API's logprobs: per token, its text, log probability, the most likely
    alternatives (and itself) by text, and where its text starts in the choice's text."""

    tokens: list[str]
    # None for an echoed prompt's first token: nothing comes before it
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class Completion(BaseModel):
    """A legacy completion, or one chunk of a streamed one (usage only on the last)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = Field(default=None, exclude_if=lambda value: value is None)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "aerie"
    # vLLM's: the model the verifier loaded (its name or path), and its context length
    root: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
