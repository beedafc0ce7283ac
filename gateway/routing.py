"""The prefill and decode instances a gateway routes to: addresses, what they serve, readiness,
and the per-request pick (least in-flight requests at this gateway, round-robin tie-break).
Start-up helpers: wait for every instance's GetInstanceInfo, check they agree, fetch the
tokenizer files (GetTokenizer).

Single event loop: no locking. Channels are opened lazily, inside the loop that uses them.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine.tokenizer import Tokenizer
from gateway.convert import ModelSpec
from gateway.errors import ApiError
from protos.tandem.v1 import decode_pb2_grpc, instance_pb2, instance_pb2_grpc

logger = logging.getLogger("tandem.gateway")

PROGRESS_PERIOD_S = 5.0
INFO_TIMEOUT_S = 2.0
TOKENIZER_TIMEOUT_S = 60.0

ROLE_NAMES = {instance_pb2.ROLE_PREFILL: "prefill", instance_pb2.ROLE_DECODE: "decode"}
HEALTH_TIMEOUT_S = 1.0
# Tokenizer files stream in chunks; allow large messages on the way in.
_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]


@dataclass(slots=True, eq=False)
class Instance:
    """One prefill or decode instance. `num_inflight` counts this gateway's requests on it;
    `ready` is the last health check (optimistic until the first one)."""

    address: str
    role: int
    info: instance_pb2.InstanceInfo | None = None
    num_inflight: int = 0
    ready: bool = True
    _channel: grpc.aio.Channel | None = field(default=None, repr=False)

    @property
    def channel(self) -> grpc.aio.Channel:
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(self.address, options=_CHANNEL_OPTIONS)
        return self._channel

    def instance_stub(self) -> instance_pb2_grpc.InstanceStub:
        return instance_pb2_grpc.InstanceStub(self.channel)

    def decode_stub(self) -> decode_pb2_grpc.DecodeStub:
        return decode_pb2_grpc.DecodeStub(self.channel)

    async def fetch_info(self, timeout_s: float) -> instance_pb2.InstanceInfo:
        """GetInstanceInfo; stores and returns it. Raises grpc.RpcError."""
        self.info = await self.instance_stub().GetInstanceInfo(
            instance_pb2.GetInstanceInfoRequest(), timeout=timeout_s)
        return self.info

    async def check_health(self, timeout_s: float = HEALTH_TIMEOUT_S) -> bool:
        """grpc.health.v1 Check of the whole server (service ""); sets and returns `ready`."""
        stub = health_pb2_grpc.HealthStub(self.channel)
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
            self.ready = reply.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError as e:
            logger.debug("health check of %s failed: %s", self.address, e)
            self.ready = False
        return self.ready

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None


class InstanceRegistry:
    """Every instance of both tiers, and the pick of one per tier for each request."""

    def __init__(self, prefill_addresses: Sequence[str], decode_addresses: Sequence[str]) -> None:
        if not prefill_addresses or not decode_addresses:
            raise ValueError("the gateway needs at least one prefill and one decode address")
        self.prefill = [Instance(a, instance_pb2.ROLE_PREFILL) for a in prefill_addresses]
        self.decode = [Instance(a, instance_pb2.ROLE_DECODE) for a in decode_addresses]
        self._turns = {instance_pb2.ROLE_PREFILL: itertools.count(),
                       instance_pb2.ROLE_DECODE: itertools.count()}

    @property
    def instances(self) -> list[Instance]:
        return self.prefill + self.decode

    def pick(self, role: int) -> Instance:
        """The ready instance of `role` with the fewest in-flight requests; ties take turns.
        Raises ApiError(UNAVAILABLE) when none is ready."""
        pool = self.prefill if role == instance_pb2.ROLE_PREFILL else self.decode
        ready = [i for i in pool if i.ready]
        if not ready:
            raise ApiError(grpc.StatusCode.UNAVAILABLE,
                           f"no ready {ROLE_NAMES[role]} instance (of {len(pool)})",
                           code="unavailable")
        least = min(i.num_inflight for i in ready)
        ties = [i for i in ready if i.num_inflight == least]
        return ties[next(self._turns[role]) % len(ties)]

    def fallbacks(self, chosen: Instance) -> list[Instance]:
        """The other ready instances of `chosen`'s role, fewest in-flight requests first: where
        a tier may retry a request that `chosen` failed (the decode tier's prefill leg)."""
        pool = self.prefill if chosen.role == instance_pb2.ROLE_PREFILL else self.decode
        return sorted((i for i in pool if i.ready and i is not chosen),
                      key=lambda i: i.num_inflight)

    @staticmethod
    def acquire(*instances: Instance) -> None:
        """Counts one more in-flight request on each of `instances`; pair with `release`."""
        for instance in instances:
            instance.num_inflight += 1

    @staticmethod
    def release(*instances: Instance) -> None:
        for instance in instances:
            instance.num_inflight -= 1

    async def check_health(self, timeout_s: float = HEALTH_TIMEOUT_S) -> dict[str, bool]:
        """Checks every instance at once; address -> SERVING."""
        results = await asyncio.gather(*(i.check_health(timeout_s) for i in self.instances))
        return {i.address: ok for i, ok in zip(self.instances, results, strict=True)}

    async def close(self) -> None:
        await asyncio.gather(*(i.close() for i in self.instances))


# start-up: what the instances serve, and the tokenizer
async def _try_info(instance: Instance) -> bool:
    try:
        await instance.fetch_info(INFO_TIMEOUT_S)
        return True
    except grpc.RpcError:
        return False


async def wait_for_instances(registry: InstanceRegistry, timeout_s: float | None = None) -> None:
    """Polls GetInstanceInfo until every instance answers; raises TimeoutError after timeout_s."""
    start = last_log = time.monotonic()
    pending = registry.instances
    while pending:
        answered = await asyncio.gather(*(_try_info(i) for i in pending))
        pending = [i for i, ok in zip(pending, answered, strict=True) if not ok]
        now = time.monotonic()
        if pending and timeout_s is not None and now - start > timeout_s:
            raise TimeoutError(f"instances not answering after {timeout_s:.0f}s: "
                               f"{', '.join(i.address for i in pending)}")
        if pending and now - last_log >= PROGRESS_PERIOD_S:
            last_log = now
            logger.info("waiting for instances (%.0fs): %d/%d ready, waiting for %s", now - start,
                        len(registry.instances) - len(pending), len(registry.instances),
                        ", ".join(f"{ROLE_NAMES[i.role]} {i.address}" for i in pending))
        if pending:
            await asyncio.sleep(0.5)


def check_consistent(registry: InstanceRegistry, served_model_name: str | None) -> ModelSpec:
    """The model every instance serves; ValueError naming the first disagreement."""
    first = registry.instances[0]
    for instance in registry.instances:
        info = instance.info
        if info.role != instance.role:
            raise ValueError(f"{instance.address} was given as a {ROLE_NAMES[instance.role]} "
                             f"instance but reports role {instance_pb2.Role.Name(info.role)}")
        for name in ("model_name", "max_model_len", "vocab_size", "kv_layout"):
            if getattr(info, name) != getattr(first.info, name):
                raise ValueError(f"instances disagree on {name}: {first.address} has "
                                 f"{getattr(first.info, name)!r}, {instance.address} has "
                                 f"{getattr(info, name)!r}")
    return ModelSpec.from_pb(first.info, served_model_name)


def _safe_name(file_name: str) -> str:
    name = Path(file_name).name
    if not name or name in (".", "..") or name != file_name:
        raise ValueError(f"refusing tokenizer file name {file_name!r}")
    return name


async def _download_tokenizer(instance: Instance, out_dir: Path) -> Tokenizer:
    """Streams GetTokenizer into out_dir (files arrive one after another) and loads it."""
    handle, current = None, None
    try:
        call = instance.instance_stub().GetTokenizer(instance_pb2.GetTokenizerRequest(),
                                                     timeout=TOKENIZER_TIMEOUT_S)
        async for chunk in call:
            if chunk.file_name != current:
                if handle:
                    handle.close()
                current = chunk.file_name
                handle = open(out_dir / _safe_name(current), "wb")
            handle.write(chunk.data)
    finally:
        if handle:
            handle.close()
    return Tokenizer.from_dir(out_dir)


async def fetch_tokenizer(registry: InstanceRegistry, out_dir: Path) -> Tokenizer:
    """The tokenizer from the first instance (decode first) that serves it."""
    errors = []
    for instance in registry.decode + registry.prefill:
        try:
            return await _download_tokenizer(instance, out_dir)
        except (grpc.RpcError, ValueError, OSError) as e:
            errors.append(f"{instance.address}: {e}")
            logger.warning("no tokenizer from %s: %s", instance.address, e)
    raise RuntimeError("could not fetch the tokenizer from any instance: " + "; ".join(errors))
