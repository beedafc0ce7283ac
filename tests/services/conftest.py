"""Real prefill and decode gRPC servers, in this process, on port 0, driven by a background
event loop; tests talk to them with ordinary gRPC clients."""

from __future__ import annotations

import asyncio
import socket
import threading
from dataclasses import dataclass, field

import grpc
import pytest

from decode_service.server import DecodeServer
from engine.instance import InstanceConfig
from prefill_service.server import PrefillServer
from protos.tandem.v1 import common_pb2, decode_pb2, decode_pb2_grpc


class LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 120.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


@dataclass
class Tiers:
    loop: LoopThread
    prefill: PrefillServer
    decode: DecodeServer
    extra_prefills: list[PrefillServer] = field(default_factory=list)  # see start_tiers

    @property
    def prefill_address(self) -> str:
        return f"127.0.0.1:{self.prefill.grpc.port}"

    @property
    def decode_address(self) -> str:
        return f"127.0.0.1:{self.decode.grpc.port}"

    @staticmethod
    def address_of(prefill: PrefillServer) -> str:
        return f"127.0.0.1:{prefill.grpc.port}"

    def stub(self) -> decode_pb2_grpc.DecodeStub:
        return decode_pb2_grpc.DecodeStub(grpc.insecure_channel(self.decode_address))

    def generate(self, prompt_ids: list[int], max_tokens: int, **sampling) -> list:
        request = decode_pb2.DecodeRequest(
            request_id="t", prompt_token_ids=prompt_ids,
            sampling=common_pb2.SamplingParams(max_tokens=max_tokens, **sampling),
            prefill_addresses=[self.prefill_address])
        return list(self.stub().Generate(request, timeout=120))

    def pools(self):
        return [s.engine.parts.scheduler.pool
                for s in (self.prefill, *self.extra_prefills, self.decode)]

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Blocks until both pools are entirely free (engine threads release asynchronously)."""
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(p.num_free_blocks == p.num_blocks for p in self.pools()):
                return
            time.sleep(0.02)
        raise AssertionError(f"KV blocks still held: "
                             f"{[(p.num_blocks - p.num_free_blocks) for p in self.pools()]}")


def config_for(model_dir, **overrides) -> InstanceConfig:
    values = dict(model_dir=model_dir, served_model_name=model_dir.name, dtype="float32",
                  num_kv_blocks=256, max_num_batched_tokens=2048)
    values.update(overrides)
    return InstanceConfig(**values)


@pytest.fixture
def start_tiers(device):
    """start_tiers(model_dir, prefill={...}, decode={...}, metrics_port=None) -> Tiers; all
    stopped after the test, which also asserts every block of every pool is free. metrics_port:
    both tiers serve /metrics (0: each on a free port). extra_prefills=[{...}, ...]: more prefill
    instances (config overrides each), in `Tiers.extra_prefills`. max_queue_len: the decode
    instance's (None: its default). speculative: the decode instance's SpeculativeConfig."""
    loop = LoopThread()
    started: list[Tiers] = []

    def start(model_dir, prefill: dict | None = None, decode: dict | None = None,
              kv_timeout_s: float = 30.0, metrics_port: int | None = None,
              extra_prefills: list[dict] = (), max_queue_len: int | None = None,
              speculative=None) -> Tiers:
        p = PrefillServer(config_for(model_dir, device=device, **(prefill or {})), "127.0.0.1", 0,
                          metrics_port=metrics_port)
        d = DecodeServer(config_for(model_dir, device=device, **(decode or {})), "127.0.0.1", 0,
                         kv_timeout_s=kv_timeout_s, metrics_port=metrics_port,
                         max_queue_len=max_queue_len, speculative=speculative)
        extra = [PrefillServer(config_for(model_dir, device=device, **overrides), "127.0.0.1", 0)
                 for overrides in extra_prefills]
        for server in (p, *extra, d):
            loop.run(server.start())
        started.append(Tiers(loop, p, d, extra))
        return started[-1]

    yield start
    try:
        for tiers in started:
            tiers.wait_idle()
    finally:
        for tiers in started:
            loop.run(tiers.decode.stop())
            for prefill in (tiers.prefill, *tiers.extra_prefills):
                loop.run(prefill.stop())
        loop.close()
        started.clear()
        if device == "cuda":
            # destroy this test's CUDA graphs now: destroyed by a later garbage collection, on
            # the main thread, while the next test's tier captures its graphs in a worker
            # thread, one invalidates that capture ("operation not permitted when stream is
            # capturing"; seen once in a full GPU run)
            import gc

            gc.collect()


@pytest.fixture
def silent_peer():
    """host:port of a TCP listener that accepts connections and never says anything (a stalled
    prefill instance)."""
    server = socket.create_server(("127.0.0.1", 0))
    conns = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conns.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in conns:
        conn.close()
    server.close()
