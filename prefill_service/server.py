"""`tandem prefill`: one prefill instance as a gRPC server (Prefill, Instance, Health, reflection),
and its Prometheus metrics over HTTP when given a metrics port."""

from __future__ import annotations

import asyncio
import logging

from engine.grpc_server import GrpcServer, stop_serving_when
from engine.instance import (InstanceConfig, InstanceServicer, build_engine_parts, grammar_cache,
                             instance_info)
from engine.tokenizer import Tokenizer
from kvtransfer.sender import GrpcKvTransport
from prefill_service.engine import PrefillEngine
from prefill_service.servicer import PrefillServicer
from protos.tandem.v1 import instance_pb2, instance_pb2_grpc, prefill_pb2_grpc

logger = logging.getLogger("prefill")

PREFILL_METHOD = "/tandem.v1.Prefill/Prefill"  # refused and waited for by drain()


class PrefillServer:
    """Owns the engine and the gRPC server of one prefill instance."""

    def __init__(self, config: InstanceConfig, host: str, port: int,
                 metrics_port: int | None = None):
        self.config = config
        self.host = host
        self.port = port
        self.metrics_port = metrics_port  # None: no /metrics; 0: any free port
        self.engine: PrefillEngine | None = None
        self.grpc: GrpcServer | None = None
        self._watch: asyncio.Task | None = None

    async def start(self) -> int:
        """Loads the model (in a thread), starts serving; returns the bound port."""
        parts = await asyncio.to_thread(build_engine_parts, self.config, False)
        info = instance_info(instance_pb2.ROLE_PREFILL, self.config, parts)
        transport = GrpcKvTransport(parts.runner.kv_cache, parts.layout, info.instance_id)
        tokenizer = await asyncio.to_thread(Tokenizer.from_dir, self.config.tokenizer_path)
        self.engine = PrefillEngine(parts, transport, asyncio.get_running_loop(),
                                    grammar_cache(parts, tokenizer))
        self.engine.start()
        if self.metrics_port is not None:
            info.metrics_port = self.engine.metrics.serve(self.host, self.metrics_port)
            logger.info("metrics on http://%s:%d/metrics", self.host, info.metrics_port)
        self.grpc = GrpcServer(self.host, self.port, [PREFILL_METHOD])
        self.grpc.add(prefill_pb2_grpc.add_PrefillServicer_to_server, PrefillServicer(self.engine),
                      ["tandem.v1.Prefill"])
        self.grpc.add(instance_pb2_grpc.add_InstanceServicer_to_server,
                      InstanceServicer(info, self.config, parts.scheduler), ["tandem.v1.Instance"])
        await self.grpc.start()
        await self.grpc.set_serving(True)
        self._watch = asyncio.create_task(stop_serving_when(self.engine.failed, (self.grpc,)))
        logger.info("prefill instance %s serving %s on %s:%d", info.instance_id,
                    self.config.served_model_name, self.host, self.grpc.port)
        return self.grpc.port

    async def drain(self, grace_s: float) -> None:
        """Health NOT_SERVING at once, new Prefill calls refused with UNAVAILABLE; waits up to
        grace_s for the calls in flight to end (`stop` aborts the rest and frees their blocks)."""
        if self.grpc is not None:
            await self.grpc.drain(grace_s)

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        if self.grpc is not None:
            await self.grpc.stop()
        if self.engine is not None:
            await asyncio.to_thread(self.engine.metrics.close)  # waits for its serving thread
            await self.engine.transport.close()
            self.engine.stop()

