"""`tandem decode`: one decode instance. Two gRPC servers: the control endpoint (Decode,
Instance, Health, reflection) on --port, and the KV data path (KvTransfer, Health) on --kv-port,
which it advertises through Instance.GetInstanceInfo and in every Prefill call. The advertised host
is `engine.advertise.choose_advertise_host`'s: --advertise-host, else the bind host, else (for a
wildcard bind) this host's own routable address. With a metrics port, Prometheus metrics over
HTTP too."""

from __future__ import annotations

import asyncio
import logging

from decode_service.draft import build_draft_proposer
from decode_service.engine import DecodeEngine
from decode_service.prefill_client import PrefillClient
from decode_service.servicer import DecodeServicer
from decode_service.speculative import SpeculativeConfig
from engine.advertise import choose_advertise_host, host_port
from engine.grpc_server import GrpcServer, stop_serving_when
from engine.instance import (InstanceConfig, InstanceServicer, build_engine_parts, grammar_cache,
                             instance_info)
from engine.tokenizer import Tokenizer
from kvtransfer.lease import LeaseTable
from kvtransfer.receiver import SERVICE_NAME as KV_SERVICE, KvTransferServicer, add_kv_transfer_servicer
from protos.tandem.v1 import decode_pb2_grpc, instance_pb2, instance_pb2_grpc

logger = logging.getLogger("decode")

QUEUE_BATCHES = 4  # the default --max-queue-len, in units of max_num_seqs

GENERATE_METHOD = "/tandem.v1.Decode/Generate"  # refused and waited for by drain()


class DecodeServer:
    """Owns the engine and both gRPC servers of one decode instance."""

    def __init__(self, config: InstanceConfig, host: str, port: int, kv_port: int = 0,
                 advertise_host: str | None = None, kv_timeout_s: float = 60.0,
                 metrics_port: int | None = None, max_queue_len: int | None = None,
                 speculative: SpeculativeConfig | None = None):
        self.config = config
        self.host, self.port, self.kv_port = host, port, kv_port
        self.metrics_port = metrics_port  # None: no /metrics; 0: any free port
        self.advertise_host = choose_advertise_host(host, advertise_host)
        self.kv_timeout_s = kv_timeout_s
        # requests waiting for admission before more are refused (RESOURCE_EXHAUSTED); default:
        # four full batches, deep enough for bursts, shallow enough that a queued request does not
        # wait out its deadline behind the queue
        self.max_queue_len = (QUEUE_BATCHES * config.max_num_seqs if max_queue_len is None
                              else max_queue_len)
        self.speculative = speculative
        self.engine: DecodeEngine | None = None
        self.grpc: GrpcServer | None = None
        self.kv_grpc: GrpcServer | None = None
        self._watch: asyncio.Task | None = None

    async def start(self) -> int:
        # a speculating tier's verification steps take k + 1 tokens a sequence: graphs for them
        query_lens = (1,) if self.speculative is None else (1, self.speculative.num_tokens + 1)
        parts = await asyncio.to_thread(build_engine_parts, self.config, True, query_lens)
        tokenizer = await asyncio.to_thread(Tokenizer.from_dir, self.config.tokenizer_path)
        leases = LeaseTable(parts.layout, parts.runner.kv_cache)
        self.kv_grpc = GrpcServer(self.host, self.kv_port)
        self.kv_grpc.add(add_kv_transfer_servicer, KvTransferServicer(leases), [KV_SERVICE])
        kv_address = host_port(self.advertise_host, self.kv_grpc.port)
        proposer = None
        if self.speculative is not None and self.speculative.draft_model is not None:
            proposer = await asyncio.to_thread(
                build_draft_proposer, self.config, self.speculative.draft_model,
                parts.model_config.vocab_size, parts.scheduler.pool.num_blocks, parts.max_model_len,
                self.speculative.num_tokens)
        self.engine = DecodeEngine(parts, leases, tokenizer, PrefillClient(kv_address),
                                   asyncio.get_running_loop(), self.kv_timeout_s,
                                   self.max_queue_len, self.speculative, proposer,
                                   grammar_cache(parts, tokenizer))
        self.engine.start()
        info = instance_info(instance_pb2.ROLE_DECODE, self.config, parts, kv_address)
        if self.metrics_port is not None:
            info.metrics_port = self.engine.metrics.serve(self.host, self.metrics_port)
            logger.info("metrics on http://%s:%d/metrics", self.host, info.metrics_port)
        self.grpc = GrpcServer(self.host, self.port, [GENERATE_METHOD])
        self.grpc.add(decode_pb2_grpc.add_DecodeServicer_to_server, DecodeServicer(self.engine),
                      ["tandem.v1.Decode"])
        self.grpc.add(instance_pb2_grpc.add_InstanceServicer_to_server,
                      InstanceServicer(info, self.config, parts.scheduler), ["tandem.v1.Instance"])
        for server in (self.kv_grpc, self.grpc):
            await server.start()
            await server.set_serving(True)
        self._watch = asyncio.create_task(
            stop_serving_when(self.engine.failed, (self.grpc, self.kv_grpc)))
        logger.info("decode instance %s serving %s on %s:%d, KV transfer on %s", info.instance_id,
                    self.config.served_model_name, self.host, self.grpc.port, kv_address)
        return self.grpc.port

    async def drain(self, grace_s: float) -> None:
        """Health NOT_SERVING at once, new Generate calls refused with UNAVAILABLE; waits up to
        grace_s for the calls in flight to end (`stop` aborts the rest and frees their blocks)."""
        if self.grpc is not None:
            await self.grpc.drain(grace_s)

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        for server in (self.grpc, self.kv_grpc):
            if server is not None:
                await server.stop()
        if self.engine is not None:
            await asyncio.to_thread(self.engine.metrics.close)  # waits for its serving thread
            await self.engine.prefill.close()
            self.engine.stop()

