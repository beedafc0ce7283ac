"""A client that leaves aborts its request on the tiers promptly, whenever it leaves: before
the first token of a stream (within the gateway's first-response wait), after it, or while
waiting for a non-streaming answer.

The real gateway app runs under uvicorn on a real socket, in front of a fake decode tier (a
real grpc.aio server) whose Generate never finishes and records when it is cancelled. The
gateway waits `KEEPALIVE_S` (far longer than the hang guard) for a first response, so only
watching the client can cancel the call in time.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import uvicorn

from engine.tokenizer import Tokenizer
from gateway.app import create_app
from gateway.backend import Backend
from gateway.convert import ModelSpec
from gateway.routing import InstanceRegistry
from protos.tandem.v1 import decode_pb2_grpc, generation_pb2
from tests.services.conftest import LoopThread

KEEPALIVE_S = 3600.0  # the first-response wait: never reached within a test
HANG_GUARD_S = 20.0  # only bounds a failing test; a passing one takes milliseconds
UNREACHABLE_PREFILL = "127.0.0.1:1"  # the fake decode tier never calls it


class HangingDecode(decode_pb2_grpc.DecodeServicer):
    """Generate yields `first` (if any), then waits until the call is cancelled."""

    def __init__(self, first: generation_pb2.GenerateResponse | None) -> None:
        self.first = first
        self.started = threading.Event()
        self.cancelled = threading.Event()

    async def Generate(self, request, context):
        self.started.set()
        try:
            if self.first is not None:
                yield self.first
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


@dataclass
class Gateway:
    """The gateway's HTTP port, loop and backend, and the fake decode tier behind it."""

    port: int
    loop: LoopThread
    backend: Backend
    decode: HangingDecode

    def wait_released(self) -> None:
        """Blocks until the backend has no request in flight; TimeoutError after the guard."""
        self.loop.run(_until(lambda: self.backend.stats.num_inflight == 0), HANG_GUARD_S)


async def _start_decode(servicer: HangingDecode) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    decode_pb2_grpc.add_DecodeServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


def _listening_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


@pytest.fixture
def start_gateway(tiny_tokenizer_dir: Path):
    """start_gateway(first) -> Gateway over a HangingDecode(first); all stopped after the test."""
    loop = LoopThread()
    stops = []

    def start(first: generation_pb2.GenerateResponse | None) -> Gateway:
        decode = HangingDecode(first)
        grpc_server, grpc_port = loop.run(_start_decode(decode))
        stops.append(lambda: loop.run(grpc_server.stop(None)))
        tokenizer = Tokenizer.from_dir(tiny_tokenizer_dir)
        spec = ModelSpec("tiny", 256, tokenizer.vocab_size, (2,), "LlamaForCausalLM")
        registry = InstanceRegistry([UNREACHABLE_PREFILL], [f"127.0.0.1:{grpc_port}"])
        backend = Backend(spec, registry, tokenizer)
        stops.append(lambda: loop.run(backend.close()))
        sock = _listening_socket()
        config = uvicorn.Config(create_app(backend, keepalive_s=KEEPALIVE_S), loop="none",
                                lifespan="off", log_level="warning",
                                timeout_graceful_shutdown=1)
        http = uvicorn.Server(config)
        http_task = asyncio.run_coroutine_threadsafe(http.serve(sockets=[sock]), loop.loop)
        stops.append(lambda: (setattr(http, "should_exit", True), http_task.result(30)))
        loop.run(_until(lambda: http.started))
        return Gateway(sock.getsockname()[1], loop, backend, decode)

    yield start
    try:
        for stop in reversed(stops):
            stop()
    finally:
        loop.close()


async def _until(predicate, period_s: float = 0.01) -> None:
    while not predicate():
        await asyncio.sleep(period_s)


def _post(port: int, stream: bool) -> socket.socket:
    """Sends a completion request on a fresh connection; does not wait for any answer."""
    body = json.dumps({"model": "tiny", "prompt": "hello", "max_tokens": 8,
                       "stream": stream}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    client = socket.create_connection(("127.0.0.1", port), timeout=HANG_GUARD_S)
    client.sendall(head.encode() + body)
    return client


def _read_until(client: socket.socket, marker: bytes) -> bytes:
    """What the gateway sent, up to and including `marker`; AssertionError if it never comes."""
    received = b""
    while marker not in received:
        chunk = client.recv(65536)
        assert chunk, f"the connection closed before {marker!r}: {received!r}"
        received += chunk
    return received


FIRST = generation_pb2.GenerateResponse(text="hi", token_ids=[5])


@pytest.mark.parametrize("stream, first, wait_for", [
    (True, None, None),             # a stream, before its first token
    (True, FIRST, b'"text":"hi"'),  # a stream, after its first token
    (False, FIRST, None),           # a non-streaming request
], ids=["stream-before-first-token", "stream-after-first-token", "non-streaming"])
def test_client_disconnect_cancels_the_decode_call(start_gateway, stream, first, wait_for):
    gateway = start_gateway(first)
    client = _post(gateway.port, stream)
    try:
        assert gateway.decode.started.wait(HANG_GUARD_S), "the gateway never called Generate"
        if wait_for is not None:
            _read_until(client, wait_for)
    finally:
        client.close()  # a real TCP close, before the gateway has answered (or finished)
    assert gateway.decode.cancelled.wait(HANG_GUARD_S), \
        "the decode call was not cancelled after the client disconnected"
    gateway.wait_released()
