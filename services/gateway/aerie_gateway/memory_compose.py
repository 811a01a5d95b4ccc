"""Memory in chat: runs the query protocol (memory_protocol) against the memory service
and the verifier (the executive), and composes the findings into the chat request.

The response's ``memory`` extension field says what memory contributed:

    {"namespace", "mode", "question", "used": bool, "skipped": reason | null, "model_version",
     "findings": [{"stage", "question", "answer", "sources"}], "sources": [...],
     "turns", "pruned", "fallbacks", "entity", "stopped", "stage_seconds", "seconds"}

``question`` is the user's last turn as the memory was asked it (a follow-up's pronouns
written out as the conversation's topic); ``stage_seconds`` gives each stage's wall time
({"grounding", "entity", "answer"}, or {"single_pass"}), and
``aerie:memory_stage_seconds{stage}`` counts them.

If the memory service is down, slow (past AERIE_MEMORY_CHAT_BUDGET_S) or has learned
nothing for the namespace, chat answers without memory and ``skipped`` says why.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
from aerie_common.memory_limits import MAX_QUESTION_CHARS
from aerie_proto.v1 import memory_pb2, memory_pb2_grpc, verifier_pb2, verifier_pb2_grpc

from .memory_protocol import (
    MemoryAnswer,
    ProtocolResult,
    compose_messages,
    fit_question,
    is_facts_question,
    single_pass,
    standalone_question,
    three_stage,
)
from .metrics import GatewayMetrics
from .schemas import ChatCompletionRequest, TextContentPart
from .settings import GatewaySettings

log = logging.getLogger(__name__)


async def executive_text(
    verifier: verifier_pb2_grpc.VerifierStub,
    messages: list[dict[str, str]],
    max_tokens: int,
    timeout_s: float,
    speculative: bool = True,
) -> str:
    """One greedy, non-streamed generation by the target: the executive's turn (speculative
    as the chat request asks)."""
    request = verifier_pb2.GenerateRequest(
        request_id=f"memory-exec-{uuid.uuid4().hex[:12]}",
        messages=[verifier_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages],
        sampling=verifier_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens),
        speculative=speculative,
    )
    parts = [r.text async for r in verifier.Generate(request, timeout=timeout_s)]
    return "".join(parts)


class MemoryComposer:
    def __init__(
        self,
        memory: memory_pb2_grpc.MemoryStub,
        verifier: verifier_pb2_grpc.VerifierStub,
        settings: GatewaySettings,
        metrics: GatewayMetrics,
    ):
        self.memory = memory
        self.verifier = verifier
        self.settings = settings
        self.metrics = metrics

    async def _ask_memory(self, namespace: str, question: str) -> MemoryAnswer:
        question = fit_question(question, MAX_QUESTION_CHARS)  # a turn pasting a long text
        max_tokens = self.settings.memory_passage_max_tokens if is_facts_question(question) else 0
        reply = await self.memory.Query(
            memory_pb2.QueryRequest(namespace=namespace, question=question, max_tokens=max_tokens),
            timeout=self.settings.memory_timeout_s,
        )
        self.metrics.memory_questions.labels(cached=str(reply.cached).lower()).inc()
        return MemoryAnswer(reply.answer, list(reply.sources), reply.knows)

    async def run(self, body: ChatCompletionRequest) -> tuple[ChatCompletionRequest, dict[str, Any]]:
        """The request to generate from (memory findings composed in) and the extension field."""
        options = body.memory
        started = time.monotonic()
        # a follow-up ("What did she study?") is asked as the conversation means it
        question = standalone_question(body.messages[-1].text, [(m.role, m.text) for m in body.messages[:-1]])
        info: dict[str, Any] = {
            "namespace": options.namespace,
            "mode": options.mode,
            "question": question,
            "used": False,
            "skipped": None,
            "model_version": "",
            "findings": [],
            "sources": [],
        }
        try:
            # The budget covers every memory call, the namespace lookup included.
            async with asyncio.timeout(self.settings.memory_chat_budget_s):
                stats = await self.memory.GetNamespace(
                    memory_pb2.GetNamespaceRequest(namespace=options.namespace),
                    timeout=self.settings.health_timeout_s,
                )
                if not stats.current_version:
                    info["skipped"] = f"namespace {options.namespace!r} has no learned memory yet"
                    return body, self._done(info, started)
                info["model_version"] = stats.current_version

                async def ask_memory(q: str) -> MemoryAnswer:
                    return await self._ask_memory(options.namespace, q)

                async def ask_executive(messages: list[dict[str, str]], max_tokens: int) -> str:
                    return await executive_text(
                        self.verifier, messages, max_tokens, self.settings.memory_timeout_s, body.speculative
                    )

                if options.mode == "single_pass":
                    work = single_pass(question, ask_memory)
                else:
                    work = three_stage(
                        question,
                        ask_memory,
                        ask_executive,
                        max_turns=options.max_turns or self.settings.memory_max_turns,
                    )
                result: ProtocolResult = await work
        except TimeoutError:
            info["skipped"] = (
                f"memory took longer than {self.settings.memory_chat_budget_s:g}s; answered without it"
            )
            return body, self._done(info, started)
        except grpc.aio.AioRpcError as err:
            log.warning("memory skipped: %s %r", err.code().name, err.details())
            info["skipped"] = f"memory unavailable ({err.code().name}: {err.details()}); answered without it"
            return body, self._done(info, started)

        info.update(
            used=bool(result.findings),
            findings=[f.__dict__ for f in result.findings],
            sources=result.sources,
            turns=result.turns,
            pruned=result.pruned,
            fallbacks=result.fallbacks,
            entity=result.entity,
            stopped=result.stopped,
            stage_seconds=result.stage_seconds,
        )
        for stage, seconds in result.stage_seconds.items():
            self.metrics.memory_stage_seconds.labels(stage=stage).observe(seconds)
        if not result.findings:
            info["skipped"] = "the memory did not know anything about the question"
            return body, self._done(info, started)
        messages = compose_messages(
            [{"role": m.verifier_role, "content": m.text} for m in body.messages], result
        )
        # only the last message changes: the others keep their tool calls
        last = body.messages[-1].model_copy(
            update={"content": [TextContentPart(type="text", text=messages[-1]["content"])]}
        )
        composed = body.model_copy(update={"messages": [*body.messages[:-1], last]})
        return composed, self._done(info, started)

    @staticmethod
    def _done(info: dict[str, Any], started: float) -> dict[str, Any]:
        info["seconds"] = round(time.monotonic() - started, 3)
        return info


async def with_memory_in_first_chunk(events: AsyncIterator[str], info: dict[str, Any]) -> AsyncIterator[str]:
    """Server-sent chunks with the ``memory`` extension field added to the first one."""
    first = True
    async for event in events:
        if first and event.startswith("data: {"):
            payload = json.loads(event[len("data: ") :])
            payload["memory"] = info
            event = f"data: {json.dumps(payload)}\n\n"
            first = False
        yield event
