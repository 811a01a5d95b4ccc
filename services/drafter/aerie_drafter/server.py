"""gRPC adapter: the Drafter service over the EAGLE proposer.

Each DraftSession stream is one request's DraftSession (proposer.py). Messages are
checked before they touch the head: anything malformed ends the stream with
INVALID_ARGUMENT and leaves the service healthy. All torch work (reading the features,
drafting) runs on one compute thread, so the event loop keeps serving other streams and
health checks, and the process keeps a single OpenMP team (aerie_common.torch_threads).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch
from aerie_common.tensors import MalformedTensorError, from_chunks
from aerie_common.thread_governor import ThreadGovernor, governed_round
from aerie_common.torch_threads import compute_thread
from aerie_proto.v1 import drafter_pb2, drafter_pb2_grpc

from aerie_drafter.eagle import EagleHead
from aerie_drafter.proposer import ContextBranchCounts, DraftSession, TreeShape

log = logging.getLogger(__name__)
SERVICE_NAME = drafter_pb2.DESCRIPTOR.services_by_name["Drafter"].full_name

# How a DraftSession stream ends: its request stream ended (ended: the verifier closed its
# side, or hung up while the drafter waited for its next message), gRPC cancelled the
# handler mid-draft (cancelled: a hang-up, a passed deadline or the drafter stopping), the
# verifier broke the protocol (invalid), or the drafter failed (error). grpc.aio reports a
# hang-up to a waiting handler as the end of the request stream, so the first two both
# mean the verifier let go.
CLOSE_REASONS = ("ended", "cancelled", "invalid", "error")


class DraftProtocolError(ValueError):
    """The peer broke the DraftSession protocol (wrong order, bad sizes, bad ids)."""


async def assembled(requests: AsyncIterator) -> AsyncIterator[tuple[str, object, list]]:
    """Yield (kind, DraftStart | DraftExtend, tensor parts) with every hidden_states_part
    of a message gathered after it."""
    kind, message, parts = None, None, []
    async for request in requests:
        which = request.WhichOneof("kind")
        if which is None:
            raise DraftProtocolError("empty DraftRequest")
        if which == "hidden_states_part":
            if message is None:
                raise DraftProtocolError("hidden_states_part without a start or extend before it")
            parts.append(request.hidden_states_part)
        else:
            if message is not None:
                raise DraftProtocolError(f"{which} arrived before the previous tensor's last part")
            kind, message = which, getattr(request, which)
            parts = [message.hidden_states]
        if not parts[-1].more:
            yield kind, message, parts
            kind, message, parts = None, None, []
    if message is not None:
        raise DraftProtocolError("stream ended inside a tensor")


class DrafterServicer(drafter_pb2_grpc.DrafterServicer):
    def __init__(
        self,
        head: EagleHead,
        default_shape: TreeShape,
        max_sessions: int,
        head_origin: str,
        new_session: Callable[[ContextBranchCounts], DraftSession] | None = None,
        compute: ThreadPoolExecutor | None = None,
        thread_governor: ThreadGovernor | None = None,
    ):
        self.head = head
        self.thread_governor = thread_governor  # on a CPU: fewer threads beside a busy neighbour
        # The one thread that runs torch work; __main__ loads the head on it too.
        self.compute = compute or compute_thread("drafter-compute")
        # What proposes the trees, given the counts its context branch adds to: the EAGLE
        # proposer; benchmarks swap in an oracle.
        self.new_session = new_session or (lambda counts: DraftSession(head, context_counts=counts))
        self.default_shape = default_shape
        self.max_sessions = max_sessions
        self.head_origin = head_origin
        self.live_sessions = 0
        self.sessions_total = 0
        # Counts for GetInfo and /metrics (aerie_drafter.metrics); every key exists from
        # the start, so a scrape on another thread never sees the dict grow.
        self.sessions_closed = dict.fromkeys(CLOSE_REASONS, 0)
        self.sessions_rejected = 0
        self.trees_total = 0
        self.context_counts = ContextBranchCounts()  # every session's
        config = head.config
        self.feature_width = len(config.capture_layer_ids) * (config.target_hidden_size or config.hidden_size)
        self.vocab_size = config.vocab_size
        self.max_tokens = config.max_position_embeddings

    def _tree_shape(self, requested: drafter_pb2.TreeShape) -> TreeShape:
        d = self.default_shape
        return TreeShape(
            depth=requested.depth or d.depth,
            top_k=requested.top_k or d.top_k,
            total_tokens=requested.total_tokens or d.total_tokens,
            context_ngram=requested.context_ngram if requested.HasField("context_ngram") else d.context_ngram,
        )

    def _features(self, parts, rows: int, what: str) -> torch.Tensor:
        # Refuse payloads bigger than the message claims before allocating them.
        limit = max(rows, 1) * self.feature_width * 4
        tensor = from_chunks(parts, max_bytes=limit)
        if tuple(tensor.shape) != (rows, self.feature_width):
            raise DraftProtocolError(
                f"{what} hidden_states must be [{rows}, {self.feature_width}], got {list(tensor.shape)}"
            )
        if not torch.isfinite(tensor).all():
            raise DraftProtocolError(f"{what} hidden_states contain NaN or inf")
        return tensor

    def _token_ids(self, ids, what: str) -> list[int]:
        ids = list(ids)
        if any(not 0 <= t < self.vocab_size for t in ids):
            raise DraftProtocolError(f"{what} token ids must be in [0, {self.vocab_size})")
        return ids

    def _start(self, session: DraftSession, message, parts, shape: TreeShape):
        """On the compute thread: check a start, open the session and draft."""
        token_ids = self._token_ids(message.token_ids, "start")
        if not 2 <= len(token_ids) <= self.max_tokens:
            raise DraftProtocolError(f"start needs 2 to {self.max_tokens} token ids, got {len(token_ids)}")
        hidden = self._features(parts, len(token_ids) - 1, "start")
        return self._drafted(lambda: session.start(token_ids, hidden), session, shape)

    def _extend(self, session: DraftSession | None, message, parts, shape: TreeShape):
        """On the compute thread: check an extend, add it to the session and draft."""
        if session is None:
            raise DraftProtocolError("extend before start")
        token_ids = self._token_ids(message.accepted_token_ids, "extend")
        if not token_ids or len(session.tokens) + len(token_ids) > self.max_tokens:
            raise DraftProtocolError(f"extend needs 1 or more token ids and at most {self.max_tokens} in all")
        hidden = self._features(parts, len(token_ids), "extend")
        return self._drafted(lambda: session.extend(token_ids, hidden), session, shape)

    def _drafted(self, take_in: Callable[[], None], session: DraftSession, shape: TreeShape):
        """(tree, seconds) of taking the verifier's tokens in and proposing the next tree."""
        with governed_round(self.thread_governor):
            drafting_from = time.perf_counter()
            take_in()
            tree = session.propose(shape)
            seconds = time.perf_counter() - drafting_from
        return tree, seconds

    async def DraftSession(self, request_iterator, context):
        if self.live_sessions >= self.max_sessions:
            self.sessions_rejected += 1
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"drafter is at its limit of {self.max_sessions} sessions"
            )
        self.live_sessions += 1
        self.sessions_total += 1
        session: DraftSession | None = None
        shape = self.default_shape
        reason = "error"
        try:
            async for kind, message, parts in assembled(request_iterator):
                if kind == "start":
                    if session is not None:
                        raise DraftProtocolError("a session takes one start")
                    shape = self._tree_shape(message.tree)
                    session = self.new_session(self.context_counts)
                work = self._start if kind == "start" else self._extend
                tree, draft_seconds = await asyncio.get_running_loop().run_in_executor(
                    self.compute, work, session, message, parts, shape
                )
                self.trees_total += 1
                yield drafter_pb2.DraftResponse(
                    tree=drafter_pb2.DraftTree(
                        token_ids=tree.token_ids, parents=tree.parents, scores=tree.scores
                    ),
                    draft_seconds=draft_seconds,
                )
            reason = "ended"
        except (DraftProtocolError, MalformedTensorError, ValueError) as exc:
            reason = "invalid"
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except (asyncio.CancelledError, GeneratorExit):
            # Cancelled while awaiting (CancelledError) or while suspended at a yield (grpc
            # then closes the generator: GeneratorExit).
            reason = "cancelled"
            raise
        finally:
            # Also runs when the caller cancels or its deadline passes: the session's KV
            # cache goes with it (a slot back to its pool, on the compute thread, after
            # any work of the session still running there).
            if session is not None:
                with contextlib.suppress(RuntimeError):  # the executor is shut down: exiting
                    self.compute.submit(session.close)
            self.live_sessions -= 1
            self.sessions_closed[reason] += 1

    async def GetInfo(self, request, context):
        config = self.head.config
        d = self.default_shape
        return drafter_pb2.DrafterInfo(
            capture_layer_ids=config.capture_layer_ids,
            eagle_version=config.eagle_version,
            target_hidden_size=config.target_hidden_size or config.hidden_size,
            vocab_size=config.vocab_size,
            draft_vocab_size=config.draft_vocab_size,
            default_tree=drafter_pb2.TreeShape(
                depth=d.depth, top_k=d.top_k, total_tokens=d.total_tokens, context_ngram=d.context_ngram
            ),
            head_path=self.head_origin,
            live_sessions=self.live_sessions,
            max_sessions=self.max_sessions,
            sessions_total=self.sessions_total,
        )
