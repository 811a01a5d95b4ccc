"""Malformed gRPC sent straight to the verifier (tiny random-weight model) and the memory
service (real Redis), over real loopback gRPC servers: empty and out-of-range messages,
huge strings, invalid ids, and bytes that are no message at all. Each gets a status that
names the caller's fault (INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION) with a message
saying what was wrong, never UNKNOWN or INTERNAL or a hang; the servers stay SERVING and
still answer good calls. (The drafter's stream gets the same in test_drafter_service.py.)"""

from __future__ import annotations

import asyncio
import math
import random

import grpc
import pytest
import redis
import redis.asyncio as aioredis
from aerie_common.grpc_utils import CHANNEL_OPTIONS
from aerie_memory.__main__ import SERVICE_NAME as MEMORY_SERVICE
from aerie_memory.__main__ import MemoryServicer
from aerie_memory.store import MemoryStore, Version
from aerie_memory.store import P as KEY_PREFIX
from aerie_proto.v1 import memory_pb2, memory_pb2_grpc, verifier_pb2, verifier_pb2_grpc
from aerie_verifier.engine import Engine
from aerie_verifier.server import SERVICE_NAME as VERIFIER_SERVICE
from aerie_verifier.server import VerifierServicer
from google.protobuf.message import DecodeError, Message

from tests.conftest import build_tiny_tokenizer
from tests.unit.test_drafter_service import ServerThread, is_serving
from tests.unit.test_memory_store import memory_redis_url, settings_for  # noqa: F401  (fixture)

DEADLINE_S = 20.0  # generous for a loaded machine; a hang is what this catches
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
TINY_VOCAB = len(build_tiny_tokenizer())  # the tiny_model's
HUGE = "x" * (4 << 20)  # 4 MiB: gRPC's default limit, under Aerie's; far over every field's own


def garbage(message_type: type[Message]) -> list[bytes]:
    """Bytes that do not parse as ``message_type``: a bad tag, a length past the end, a
    string field that is not UTF-8 (where field 1 is a string), and random bytes. Random
    bytes often do parse, as unknown fields, so only those that do not are kept."""
    rng = random.Random(0)
    candidates = [
        b"\xff\xff\xff",
        b"\x0a\x7f" + b"x" * 3,
        b"\x0a\x02\xff\xfe",
        *(rng.randbytes(64) for _ in range(200)),
    ]
    undecodable = [data for data in candidates if not _parses(message_type, data)][:8]
    assert len(undecodable) >= 5
    return undecodable


def _parses(message_type: type[Message], data: bytes) -> bool:
    try:
        message_type.FromString(data)
    except DecodeError:
        return False
    return True


def assert_refused(
    call, *args, fault: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT, says: str = "", **kwargs
) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        call(*args, **kwargs)
    error = raised.value
    assert error.code() == fault, (error.code(), error.details())
    assert error.details() and says in error.details(), error.details()


def raw_method(channel: grpc.Channel, service: str, method: str, streaming: bool):
    """A method that sends and returns bytes as they are, however the real one is typed."""
    identity = {"request_serializer": lambda b: b, "response_deserializer": lambda b: b}
    path = f"/{service}/{method}"
    if streaming:
        stream = channel.unary_stream(path, **identity)
        return lambda data: list(stream(data, timeout=DEADLINE_S))
    unary = channel.unary_unary(path, **identity)
    return lambda data: unary(data, timeout=DEADLINE_S)


@pytest.fixture(scope="module")
def verifier(tiny_model, tiny_tokenizer):
    engine = Engine(tiny_model, tiny_tokenizer, max_running=2)
    engine.start()
    servicer = VerifierServicer(engine, "tiny", "cpu", "float32")
    server = ServerThread(
        lambda s: verifier_pb2_grpc.add_VerifierServicer_to_server(servicer, s), VERIFIER_SERVICE
    ).start()
    channel = grpc.insecure_channel(server.addr, options=CHANNEL_OPTIONS)
    yield server, channel
    channel.close()
    server.stop()
    engine.stop()


@pytest.fixture(scope="module")
def memory(memory_redis_url, tmp_path_factory):  # noqa: F811
    settings = settings_for(tmp_path_factory.mktemp("memory"), memory_redis_url)

    def register(server):
        # Made on the server's event loop, which the Redis client's connections belong to.
        store = MemoryStore(aioredis.from_url(memory_redis_url))
        memory_pb2_grpc.add_MemoryServicer_to_server(MemoryServicer(settings, store), server)

    server = ServerThread(register, MEMORY_SERVICE).start()
    channel = grpc.insecure_channel(server.addr, options=CHANNEL_OPTIONS)
    yield server, channel, settings
    channel.close()
    server.stop()


def generate(**fields) -> verifier_pb2.GenerateRequest:
    fields.setdefault("prompt_token_ids", [5, 6, 7])
    # A few tokens: a bad request wrongly accepted finishes soon and fails its test.
    sampling = {"max_tokens": 4, **fields.pop("sampling", {})}
    return verifier_pb2.GenerateRequest(sampling=verifier_pb2.SamplingParams(**sampling), **fields)


HI = verifier_pb2.ChatMessage(role="user", content="hi")
BAD_GENERATE = {
    "empty request": (verifier_pb2.GenerateRequest(), "empty"),
    "empty messages and ids": (generate(prompt_token_ids=[]), "empty"),
    "token id = vocab size": (generate(prompt_token_ids=[5, TINY_VOCAB]), "token ids"),
    "token id int32 min": (generate(prompt_token_ids=[INT32_MIN]), "token ids"),
    "NaN temperature": (generate(sampling={"temperature": math.nan}), "temperature"),
    "infinite temperature": (generate(sampling={"temperature": math.inf}), "temperature"),
    "NaN top_p": (generate(sampling={"top_p": math.nan}), "top_p"),
    "negative top_p": (generate(sampling={"top_p": -0.5}), "top_p"),
    "negative top_k": (generate(sampling={"top_k": -1}), "top_k"),
    "negative max_tokens": (generate(sampling={"max_tokens": -1}), "max_tokens"),
    "max_tokens int32 max": (generate(sampling={"max_tokens": INT32_MAX}), "too many"),
    "too many stop strings": (generate(sampling={"stop": [f"s{i}" for i in range(1000)]}), "stop"),
    "NaN frequency_penalty": (generate(sampling={"frequency_penalty": math.nan}), "frequency_penalty"),
    "presence_penalty 3": (generate(sampling={"presence_penalty": 3}), "presence_penalty"),
    "repetition_penalty 0": (generate(sampling={"repetition_penalty": 0}), "repetition_penalty"),
    "top_logprobs 1000": (generate(sampling={"logprobs": True, "top_logprobs": 1000}), "top_logprobs"),
    "top_logprobs without logprobs": (generate(sampling={"top_logprobs": 1}), "top_logprobs"),
    "logit_bias past the vocabulary": (generate(sampling={"logit_bias": {TINY_VOCAB: 1.0}}), "logit_bias"),
    "logit_bias 1000": (generate(sampling={"logit_bias": {5: 1000.0}}), "logit_bias"),
    "regex that does not compile": (
        generate(sampling={"structured": {"regex": "(a"}}),
        "regex does not compile",
    ),
    "schema that does not compile": (
        generate(sampling={"structured": {"json_schema": '{"type": 5}'}}),
        "json schema does not compile",
    ),
    "choice of nothing": (generate(sampling={"structured": {"choice": {}}}), "at least one option"),
    "huge stop string": (generate(sampling={"stop": [HUGE]}), "stop"),
    # Refused by its length in characters, before seconds of tokenising.
    "huge message": (
        generate(prompt_token_ids=[], messages=[verifier_pb2.ChatMessage(role="user", content=HUGE)]),
        "characters",
    ),
    "huge role": (
        generate(prompt_token_ids=[], messages=[verifier_pb2.ChatMessage(role=HUGE, content="hi")]),
        "characters",
    ),
    "a million prompt token ids": (generate(prompt_token_ids=[5] * 1_000_000), "too many"),
    "template variables not JSON": (
        generate(prompt_token_ids=[], messages=[HI], chat_template={"kwargs_json": "{"}),
        "not JSON",
    ),
    "template variables not an object": (
        generate(prompt_token_ids=[], messages=[HI], chat_template={"kwargs_json": "[1]"}),
        "JSON object",
    ),
    "template variable overriding a parameter": (
        generate(prompt_token_ids=[], messages=[HI], chat_template={"kwargs_json": '{"tokenize": false}'}),
        "may not set tokenize",
    ),
    "a generation prompt after a continued message": (
        generate(prompt_token_ids=[], messages=[HI], chat_template={"continue_final_message": True}),
        "add_generation_prompt",
    ),
}


@pytest.mark.parametrize("request_, says", BAD_GENERATE.values(), ids=BAD_GENERATE.keys())
def test_bad_generate_requests_are_invalid_argument(verifier, request_, says):
    server, channel = verifier
    stub = verifier_pb2_grpc.VerifierStub(channel)
    assert_refused(lambda: list(stub.Generate(request_, timeout=DEADLINE_S)), says=says)
    assert is_serving(server.addr)


@pytest.mark.parametrize(
    "request_",
    [
        verifier_pb2.TokenizeRequest(text=HUGE),
        verifier_pb2.TokenizeRequest(messages=[verifier_pb2.ChatMessage(role="user", content=HUGE)]),
    ],
    ids=["text", "messages"],
)
def test_tokenizing_a_huge_text_is_refused_by_its_length(verifier, request_):
    server, channel = verifier
    stub = verifier_pb2_grpc.VerifierStub(channel)
    assert_refused(lambda: stub.Tokenize(request_, timeout=DEADLINE_S), says="characters")
    assert is_serving(server.addr)


@pytest.mark.parametrize(
    ("method", "request_type", "streaming"),
    [
        ("Generate", verifier_pb2.GenerateRequest, True),
        ("Tokenize", verifier_pb2.TokenizeRequest, False),
        ("Detokenize", verifier_pb2.DetokenizeRequest, False),
        ("GetModelInfo", verifier_pb2.ModelInfoRequest, False),
        ("GetLoad", verifier_pb2.LoadRequest, False),
    ],
)
def test_undecodable_bytes_to_the_verifier_are_invalid_argument(verifier, method, request_type, streaming):
    server, channel = verifier
    call = raw_method(channel, "aerie.v1.Verifier", method, streaming)
    for data in garbage(request_type):
        assert_refused(call, data, says="does not parse")
    assert is_serving(server.addr)


def test_the_verifier_still_generates_after_bad_input(verifier):
    server, channel = verifier
    stub = verifier_pb2_grpc.VerifierStub(channel)
    for request_, _ in BAD_GENERATE.values():
        with pytest.raises(grpc.RpcError):
            list(stub.Generate(request_, timeout=DEADLINE_S))
    replies = list(stub.Generate(generate(sampling={"max_tokens": 3}), timeout=DEADLINE_S))
    assert sum(len(r.token_ids) for r in replies) == 3
    assert replies[-1].finish_reason == verifier_pb2.FINISH_REASON_LENGTH
    assert not any(r.logprobs for r in replies)
    asked = generate(
        sampling={"max_tokens": 3, "logprobs": True, "top_logprobs": 2, "repetition_penalty": 1.5}
    )
    replies = list(stub.Generate(asked, timeout=DEADLINE_S))
    entries = [entry for r in replies for entry in r.logprobs]
    assert [entry.token_id for entry in entries] == [t for r in replies for t in r.token_ids]
    assert all(len(entry.top) == 2 and entry.logprob <= 0 and entry.token_bytes for entry in entries)
    structured = generate(sampling={"max_tokens": 20, "structured": {"regex": "(yes|no)!"}})
    replies = list(stub.Generate(structured, timeout=DEADLINE_S))
    assert "".join(r.text for r in replies) in ("yes!", "no!")
    tokens = stub.Tokenize(verifier_pb2.TokenizeRequest(text="hi there"), timeout=DEADLINE_S)
    assert list(tokens.token_ids) and len(tokens.token_strs) == len(tokens.token_ids)
    text = stub.Detokenize(verifier_pb2.DetokenizeRequest(token_ids=tokens.token_ids), timeout=DEADLINE_S)
    assert text.text == "hi there"
    for out_of_range in ([-1], [10**9]):
        assert_refused(
            stub.Detokenize,
            verifier_pb2.DetokenizeRequest(token_ids=out_of_range),
            timeout=DEADLINE_S,
            says="token ids must be in",
        )
    assert is_serving(server.addr)


def doc(doc_id: str = "a", text: str = "Some text.", metadata_json: str = "") -> memory_pb2.Document:
    return memory_pb2.Document(id=doc_id, text=text, metadata_json=metadata_json)


BAD_NAMESPACES = ["", "../x", "a b", "名前", "x" * 65, "ns\n", "ns\x00", HUGE]


def bad_memory_calls(settings) -> dict[str, tuple[str, object, grpc.StatusCode, str]]:
    """name -> (method, request, status, a piece of the message)."""
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    calls = {
        "Ingest empty request": ("Ingest", memory_pb2.IngestRequest(), invalid, "namespace"),
        "Ingest no documents": ("Ingest", memory_pb2.IngestRequest(namespace="ns"), invalid, "documents"),
        "Ingest empty document": (
            "Ingest",
            memory_pb2.IngestRequest(namespace="ns", documents=[memory_pb2.Document()]),
            invalid,
            "text is empty",  # a document without an id is named by its text: it has none
        ),
        "Ingest blank text": (
            "Ingest",
            memory_pb2.IngestRequest(namespace="ns", documents=[doc(text=" \n ")]),
            invalid,
            "empty",
        ),
        "Ingest huge text": (
            "Ingest",
            memory_pb2.IngestRequest(namespace="ns", documents=[doc(text=HUGE)]),
            invalid,
            "limit",
        ),
        "Ingest huge id": (
            "Ingest",
            memory_pb2.IngestRequest(namespace="ns", documents=[doc(doc_id=HUGE)]),
            invalid,
            "id",
        ),
        **{
            f"Ingest metadata {name}": (
                "Ingest",
                memory_pb2.IngestRequest(
                    namespace="ns", documents=[doc(), doc("b", "B.", metadata_json=raw)]
                ),
                invalid,
                says,
            )
            for name, raw, says in (
                ("not JSON", "{", "documents[1].metadata is not JSON"),
                ("a list", "[1]", "must be a JSON object"),
                ("nested", '{"k": {"x": 1}}', "documents[1].metadata.k must be"),
                ("null", '{"k": null}', "documents[1].metadata.k must be"),
                ("NaN", '{"k": NaN}', "finite number"),
            )
        },
        "Ingest id with a space": (
            "Ingest",
            memory_pb2.IngestRequest(namespace="ns", documents=[doc(doc_id="a b")]),
            invalid,
            "id",
        ),
        "Ingest duplicate ids": (
            "Ingest",
            memory_pb2.IngestRequest(namespace="ns", documents=[doc(), doc(text="Other text.")]),
            invalid,
            "twice",
        ),
        "Ingest too many documents": (
            "Ingest",
            memory_pb2.IngestRequest(
                namespace="ns", documents=[doc(str(i)) for i in range(settings.memory_max_documents + 1)]
            ),
            invalid,
            "limit",
        ),
        "ListDocuments negative limit": (
            "ListDocuments",
            memory_pb2.ListDocumentsRequest(namespace="ns", limit=-1),
            invalid,
            "limit",
        ),
        "ListDocuments huge limit": (
            "ListDocuments",
            memory_pb2.ListDocumentsRequest(namespace="ns", limit=INT32_MAX),
            invalid,
            "limit",
        ),
        "ListDocuments unknown namespace": (
            "ListDocuments",
            memory_pb2.ListDocumentsRequest(namespace="never-used"),
            grpc.StatusCode.NOT_FOUND,
            "no namespace",
        ),
        "GetDocument huge id": (
            "GetDocument",
            memory_pb2.GetDocumentRequest(namespace="ns", document_id=HUGE),
            grpc.StatusCode.NOT_FOUND,
            "characters)",
        ),
        "GetJob empty id": ("GetJob", memory_pb2.GetJobRequest(), grpc.StatusCode.NOT_FOUND, "no job"),
        "GetJob unknown id": (
            "GetJob",
            memory_pb2.GetJobRequest(job_id="job-0000000000000000"),
            grpc.StatusCode.NOT_FOUND,
            "no job",
        ),
        "GetJob huge id": (
            "GetJob",
            memory_pb2.GetJobRequest(job_id=HUGE),
            grpc.StatusCode.NOT_FOUND,
            "no job",
        ),
        "Query empty question": ("Query", memory_pb2.QueryRequest(namespace="ns"), invalid, "question"),
        "Query blank question": (
            "Query",
            memory_pb2.QueryRequest(namespace="ns", question="  \t"),
            invalid,
            "question",
        ),
        "Query huge question": (
            "Query",
            memory_pb2.QueryRequest(namespace="ns", question=HUGE),
            invalid,
            "question",
        ),
        "Query negative max_tokens": (
            "Query",
            memory_pb2.QueryRequest(namespace="ns", question="q?", max_tokens=-1),
            invalid,
            "max_tokens",
        ),
        "Query huge max_tokens": (
            "Query",
            memory_pb2.QueryRequest(namespace="ns", question="q?", max_tokens=INT32_MAX),
            invalid,
            "max_tokens",
        ),
        "Rollback without versions": (
            "Rollback",
            memory_pb2.RollbackRequest(namespace="ns"),
            grpc.StatusCode.FAILED_PRECONDITION,
            "no model versions",
        ),
        "Rollback huge version": (
            "Rollback",
            memory_pb2.RollbackRequest(namespace="ns", version=HUGE),
            grpc.StatusCode.FAILED_PRECONDITION,
            "no model versions",
        ),
    }
    for ns in BAD_NAMESPACES:
        for method, request_ in (
            ("Ingest", memory_pb2.IngestRequest(namespace=ns, documents=[doc()])),
            ("GetNamespace", memory_pb2.GetNamespaceRequest(namespace=ns)),
            ("DeleteDocument", memory_pb2.DeleteDocumentRequest(namespace=ns, document_id="a")),
            ("Rollback", memory_pb2.RollbackRequest(namespace=ns)),
            ("ListDocuments", memory_pb2.ListDocumentsRequest(namespace=ns)),
            ("DeleteNamespace", memory_pb2.DeleteNamespaceRequest(namespace=ns)),
            ("GetDocument", memory_pb2.GetDocumentRequest(namespace=ns, document_id="a")),
            ("Query", memory_pb2.QueryRequest(namespace=ns, question="q?")),
        ):
            calls[f"{method} namespace {ns[:12]!r}"] = (method, request_, invalid, "namespace")
    return calls


def test_bad_memory_requests_get_the_callers_fault(memory):
    server, channel, settings = memory
    stub = memory_pb2_grpc.MemoryStub(channel)
    for name, (method, request_, status, says) in bad_memory_calls(settings).items():
        with pytest.raises(grpc.RpcError) as raised:
            getattr(stub, method)(request_, timeout=DEADLINE_S)
        error = raised.value
        assert (error.code(), says in (error.details() or "")) == (status, True), (
            name,
            error.code(),
            error.details(),
        )
    assert is_serving(server.addr)


def test_job_ids_naming_other_keys_are_not_found(memory, memory_redis_url):  # noqa: F811
    """A job's Redis hash sits next to its other keys (``job:<id>:reflections``): an id that
    names one of those is an unknown job, not a Redis type error."""
    server, channel, _ = memory
    stub = memory_pb2_grpc.MemoryStub(channel)
    job_id = stub.Ingest(
        memory_pb2.IngestRequest(namespace="jobs", documents=[doc()]), timeout=DEADLINE_S
    ).job_id
    assert stub.GetJob(memory_pb2.GetJobRequest(job_id=job_id), timeout=DEADLINE_S).namespace == "jobs"
    with redis.Redis.from_url(memory_redis_url) as client:
        client.set(f"{KEY_PREFIX}job:{job_id}:reflections", "[]")  # as the worker leaves it
    for other in (f"{job_id}:reflections", f"{job_id}:x", "*", "job-*", f"{job_id}\n"):
        assert_refused(
            stub.GetJob,
            memory_pb2.GetJobRequest(job_id=other),
            timeout=DEADLINE_S,
            fault=grpc.StatusCode.NOT_FOUND,
            says="no job",
        )
    assert is_serving(server.addr)


def test_unknown_version_is_a_precondition_failure_however_long(memory, memory_redis_url):  # noqa: F811
    """The message quotes the version asked for, shortened: gRPC clients refuse error
    details past 16 KiB and would report RESOURCE_EXHAUSTED instead."""
    server, channel, _ = memory

    async def one_version():
        client = aioredis.from_url(memory_redis_url)
        version = Version("v0001", 0.0, [], 0.3, "test")
        assert await MemoryStore(client).swap_version("versioned", version, expected_current="")
        await client.aclose()

    asyncio.run(one_version())
    stub = memory_pb2_grpc.MemoryStub(channel)
    assert_refused(
        stub.Rollback,
        memory_pb2.RollbackRequest(namespace="versioned", version=HUGE),
        timeout=DEADLINE_S,
        fault=grpc.StatusCode.FAILED_PRECONDITION,
        says="characters)",
    )
    assert is_serving(server.addr)


def test_unknown_document_is_not_deleted(memory):
    _, channel, _ = memory
    stub = memory_pb2_grpc.MemoryStub(channel)
    for document_id in ("", "nope", HUGE):
        reply = stub.DeleteDocument(
            memory_pb2.DeleteDocumentRequest(namespace="ns", document_id=document_id), timeout=DEADLINE_S
        )
        assert not reply.deleted and "no document" in reply.detail


@pytest.mark.parametrize(
    ("method", "request_type"),
    [
        ("Ingest", memory_pb2.IngestRequest),
        ("GetJob", memory_pb2.GetJobRequest),
        ("Query", memory_pb2.QueryRequest),
        ("GetNamespace", memory_pb2.GetNamespaceRequest),
        ("DeleteDocument", memory_pb2.DeleteDocumentRequest),
        ("Rollback", memory_pb2.RollbackRequest),
        ("ListDocuments", memory_pb2.ListDocumentsRequest),
        ("GetDocument", memory_pb2.GetDocumentRequest),
        ("DeleteNamespace", memory_pb2.DeleteNamespaceRequest),
    ],
)
def test_undecodable_bytes_to_the_memory_are_invalid_argument(memory, method, request_type):
    server, channel, _ = memory
    call = raw_method(channel, "aerie.v1.Memory", method, streaming=False)
    for data in garbage(request_type):
        assert_refused(call, data, says="does not parse")
    assert is_serving(server.addr)


def test_the_memory_still_answers_after_bad_input(memory):
    server, channel, settings = memory
    stub = memory_pb2_grpc.MemoryStub(channel)
    for method, request_, _, _ in bad_memory_calls(settings).values():
        with pytest.raises(grpc.RpcError):
            getattr(stub, method)(request_, timeout=DEADLINE_S)
    reply = stub.Ingest(memory_pb2.IngestRequest(namespace="after", documents=[doc()]), timeout=DEADLINE_S)
    assert [d.status for d in reply.documents] == ["accepted"]
    stats = stub.GetNamespace(memory_pb2.GetNamespaceRequest(namespace="after"), timeout=DEADLINE_S)
    assert stats.exists and stats.documents == 1
    answer = stub.Query(memory_pb2.QueryRequest(namespace="after", question="What?"), timeout=DEADLINE_S)
    assert not answer.knows  # nothing learned yet
    assert is_serving(server.addr)
