"""The gateway's connections: gRPC channels to the verifier, drafter and memory services,
and Redis. The gateway only generates through the verifier; the others are probed for
readiness so one /ready answers for the whole stack."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
import redis.asyncio as aioredis
from aerie_common.grpc_utils import insecure_channel
from aerie_common.redis_client import connect
from aerie_proto.v1 import memory_pb2_grpc, verifier_pb2, verifier_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .settings import GatewaySettings

log = logging.getLogger(__name__)

GRPC_BACKENDS = ("verifier", "drafter", "memory")
# How long what the verifier said of its model is trusted before it is asked again: a verifier
# restarted on another model, or with other sampling defaults, is heard within this.
MODEL_INFO_TTL_S = 30.0


class Backends:
    def __init__(self, settings: GatewaySettings):
        self._settings = settings
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._health: dict[str, health_pb2_grpc.HealthStub] = {}
        self._redis: aioredis.Redis | None = None
        self._verifier: verifier_pb2_grpc.VerifierStub | None = None
        self._memory: memory_pb2_grpc.MemoryStub | None = None
        self._model_info: verifier_pb2.ModelInfo | None = None
        self._model_info_at = 0.0  # time.monotonic() when it was heard

    @property
    def verifier(self) -> verifier_pb2_grpc.VerifierStub:
        if self._verifier is None:
            raise RuntimeError("backends are not open")
        return self._verifier

    @property
    def memory(self) -> memory_pb2_grpc.MemoryStub:
        if self._memory is None:
            raise RuntimeError("backends are not open")
        return self._memory

    def open(self) -> None:
        """Create the channels and the Redis client. Neither connects until first used,
        so the gateway starts whether or not its backends are up yet."""
        settings = self._settings
        addrs = {
            "verifier": settings.verifier_addr,
            "drafter": settings.drafter_addr,
            "memory": settings.memory_addr,
        }
        for name, addr in addrs.items():
            self._channels[name] = insecure_channel(addr)
            self._health[name] = health_pb2_grpc.HealthStub(self._channels[name])
        self._verifier = verifier_pb2_grpc.VerifierStub(self._channels["verifier"])
        self._memory = memory_pb2_grpc.MemoryStub(self._channels["memory"])
        self._redis = connect(
            settings.redis_url,
            socket_connect_timeout=settings.health_timeout_s,
            socket_timeout=settings.health_timeout_s,
        )

    async def close(self) -> None:
        await asyncio.gather(*(channel.close() for channel in self._channels.values()))
        self._channels.clear()
        self._health.clear()
        self._verifier = None
        self._memory = None
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    async def model_info(self) -> verifier_pb2.ModelInfo:
        """The verifier's model, remembered for ``MODEL_INFO_TTL_S`` and then asked again.
        While the verifier does not answer, what it said last stands (its requests fail at
        the verifier anyway); raises only when it has never answered."""
        heard = self._model_info
        if heard is not None and time.monotonic() - self._model_info_at < MODEL_INFO_TTL_S:
            return heard
        try:
            info = await self.verifier.GetModelInfo(
                verifier_pb2.ModelInfoRequest(), timeout=self._settings.health_timeout_s
            )
        except grpc.aio.AioRpcError as err:
            if heard is None:
                raise
            log.warning(
                "the verifier did not say its model (%s); keeping %s", err.code().name, heard.model_id
            )
            return heard
        if heard is not None and info != heard:
            log.info("the verifier's model changed: %s, was %s", _described(info), _described(heard))
        self._model_info, self._model_info_at = info, time.monotonic()
        return info

    async def readiness(self) -> dict[str, bool]:
        """Whether each backend answers: gRPC health SERVING, and Redis PING."""
        names = [*GRPC_BACKENDS, "redis"]
        probes = [*(self._grpc_serving(name) for name in GRPC_BACKENDS), self._redis_answers()]
        return dict(zip(names, await asyncio.gather(*probes), strict=True))

    async def _grpc_serving(self, name: str) -> bool:
        try:
            reply = await self._health[name].Check(
                health_pb2.HealthCheckRequest(service=""), timeout=self._settings.health_timeout_s
            )
        except grpc.aio.AioRpcError as err:
            log.debug("%s health check failed: %s", name, err.code().name)
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def _redis_answers(self) -> bool:
        try:
            return bool(await asyncio.wait_for(self._redis.ping(), self._settings.health_timeout_s))
        except (aioredis.RedisError, OSError, TimeoutError) as err:
            log.debug("redis ping failed: %r", err)
            return False


def _described(info: verifier_pb2.ModelInfo) -> str:
    defaults = {field.name: value for field, value in info.sampling_defaults.ListFields()}
    return f"{info.model_id} ({info.context_length} tokens, sampling defaults {defaults})"
