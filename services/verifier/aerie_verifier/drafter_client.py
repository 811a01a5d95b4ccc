"""Drafter sessions as the engine sees them: in-process (the EAGLE proposer inside the
verifier) or over gRPC (one DraftSession stream per request)."""

from __future__ import annotations

import logging
import queue
import threading
import time

import grpc
import torch
from aerie_common.draft_tree import DraftTree
from aerie_common.grpc_utils import CHANNEL_OPTIONS
from aerie_common.tensors import to_chunks
from aerie_drafter.loading import UNTRAINED  # DrafterInfo.head_path of a random head
from aerie_drafter.proposer import ContextBranchCounts, DraftSession
from aerie_proto.v1 import drafter_pb2, drafter_pb2_grpc

from aerie_verifier.speculative import SpeculationDeclined

log = logging.getLogger(__name__)


class InProcessDrafter:
    """A proposer session (aerie_drafter.proposer.DraftSession, or anything with its
    start/extend/propose/close) called directly, without the gRPC hop."""

    hop_seconds = 0.0  # no hop: every second of a call is drafting
    in_process = True

    def __init__(self, session, shape):
        self.session = session
        self.shape = shape

    def start(self, token_ids: list[int], hidden: torch.Tensor) -> DraftTree:
        self.session.start(token_ids, hidden)
        return self.session.propose(self.shape)

    def extend(self, token_ids: list[int], hidden: torch.Tensor) -> DraftTree:
        self.session.extend(token_ids, hidden)
        return self.session.propose(self.shape)

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None


class InProcessDrafterFactory:
    def __init__(self, head, shape, slots=None):
        self.head = head
        self.shape = shape
        self.slots = slots  # aerie_drafter.proposer.DraftSlots, on a GPU
        self.context_counts = ContextBranchCounts()  # every session's, for the metrics

    def capture_layer_ids(self) -> tuple[int, ...]:
        return tuple(self.head.config.capture_layer_ids)

    def open(self, request_id: str) -> InProcessDrafter:
        return InProcessDrafter(DraftSession(self.head, self.slots, self.context_counts), self.shape)

    def forget(self) -> None:
        pass


class GrpcDrafter:
    """One DraftSession stream. Requests go out through a queue; a reader thread turns
    responses into a queue the engine waits on with a per-step deadline."""

    in_process = False

    def __init__(self, stub, request_id: str, shape, step_timeout_s: float, session_timeout_s: float):
        self.request_id = request_id
        self.shape = shape
        self.step_timeout_s = step_timeout_s
        self.hop_seconds = 0.0
        self._requests: queue.Queue = queue.Queue()
        self._responses: queue.Queue = queue.Queue()
        self._call = stub.DraftSession(iter(self._requests.get, None), timeout=session_timeout_s)
        threading.Thread(target=self._read, name=f"draft-{request_id}", daemon=True).start()

    def _read(self) -> None:
        try:
            for response in self._call:
                self._responses.put(response)
        except grpc.RpcError as exc:
            self._responses.put(exc)
        self._responses.put(EOFError("draft stream ended"))

    def _send(self, first: drafter_pb2.DraftRequest, hidden: torch.Tensor, field: str) -> DraftTree:
        sent_at = time.perf_counter()
        chunks = to_chunks(hidden)
        getattr(first, field).hidden_states.CopyFrom(chunks[0])
        self._requests.put(first)
        for part in chunks[1:]:
            self._requests.put(drafter_pb2.DraftRequest(hidden_states_part=part))
        try:
            response = self._responses.get(timeout=self.step_timeout_s)
        except queue.Empty:
            raise TimeoutError(f"drafter gave no tree within {self.step_timeout_s}s") from None
        if isinstance(response, Exception):
            raise response
        # What the drafter did not spend drafting went to the hop.
        self.hop_seconds += max(0.0, time.perf_counter() - sent_at - response.draft_seconds)
        tree = response.tree
        return DraftTree(list(tree.token_ids), list(tree.parents), list(tree.scores))

    def start(self, token_ids: list[int], hidden: torch.Tensor) -> DraftTree:
        shape = drafter_pb2.TreeShape(
            depth=self.shape.depth,
            top_k=self.shape.top_k,
            total_tokens=self.shape.total_tokens,
            context_ngram=self.shape.context_ngram,
        )
        start = drafter_pb2.DraftStart(request_id=self.request_id, token_ids=token_ids, tree=shape)
        return self._send(drafter_pb2.DraftRequest(start=start), hidden, "start")

    def extend(self, token_ids: list[int], hidden: torch.Tensor) -> DraftTree:
        extend = drafter_pb2.DraftExtend(accepted_token_ids=token_ids)
        return self._send(drafter_pb2.DraftRequest(extend=extend), hidden, "extend")

    def close(self) -> None:
        self._requests.put(None)  # ends the request stream; the drafter frees the session
        self._call.cancel()


class GrpcDrafterFactory:
    """Draft sessions with the drafter service at ``addr``. A drafter serving an untrained
    head is declined unless ``accept_untrained``: its drafts are never accepted, so
    speculating would only slow every request down."""

    def __init__(
        self,
        addr: str,
        shape,
        step_timeout_s: float = 2.0,
        session_timeout_s: float = 3600.0,
        accept_untrained: bool = True,
    ):
        self.channel = grpc.insecure_channel(addr, options=CHANNEL_OPTIONS)
        self.stub = drafter_pb2_grpc.DrafterStub(self.channel)
        self.shape = shape
        self.step_timeout_s = step_timeout_s
        self.session_timeout_s = session_timeout_s
        self.accept_untrained = accept_untrained
        self._info: drafter_pb2.DrafterInfo | None = None
        self._said_declined = False

    def capture_layer_ids(self) -> tuple[int, ...]:
        info = self.info()
        if info.head_path == UNTRAINED and not self.accept_untrained:
            if not self._said_declined:
                self._said_declined = True
                log.warning(
                    "the drafter serves an untrained EAGLE head: decoding without speculation. Give it a "
                    "trained head (AERIE_DRAFTER_HEAD), or set AERIE_DRAFTER_HEAD=untrained to speculate anyway."
                )
            raise SpeculationDeclined("the drafter's head is untrained")
        self._said_declined = False
        return tuple(info.capture_layer_ids)

    def info(self, timeout_s: float = 2.0) -> drafter_pb2.DrafterInfo:
        """The drafter's description, fetched once; forgotten on failure so a restarted
        drafter (perhaps with another head) is asked again."""
        if self._info is None:
            self._info = self.stub.GetInfo(drafter_pb2.DrafterInfoRequest(), timeout=timeout_s)
        return self._info

    def forget(self) -> None:
        self._info = None

    def open(self, request_id: str) -> GrpcDrafter:
        return GrpcDrafter(self.stub, request_id, self.shape, self.step_timeout_s, self.session_timeout_s)
