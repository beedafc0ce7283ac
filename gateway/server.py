"""Start-up and serving of the gateway: HTTP (uvicorn) and gRPC (grpc.aio) in one event loop.

    1. wait until every instance answers GetInstanceInfo (progress logged every few seconds)
    2. check they agree: roles, model name, max_model_len, vocab size, KV layout
    3. fetch the tokenizer files from one instance (GetTokenizer) into a temp dir
    4. serve until cancelled or signalled; every 5 s re-check health (routing skips instances
       that are not SERVING; gRPC Health follows), every 10 s log throughput if there was traffic
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import uvicorn

from engine.serving import run_until_signalled
from engine.grpc_server import GrpcServer
from gateway.app import create_app
from gateway.backend import Backend
from gateway.errors import ApiKey
from gateway.flags import api_key as api_key_from
from gateway.grpc_api import build_grpc_server
from gateway.routing import (InstanceRegistry, check_consistent, fetch_tokenizer,
                             wait_for_instances)

logger = logging.getLogger("tandem.gateway")

HEALTH_PERIOD_S = 5.0
THROUGHPUT_PERIOD_S = 10.0


# serving
class _HTTPServer(uvicorn.Server):
    """uvicorn without its signal handling: the gateway stops when its task is cancelled
    (`main` maps SIGINT/SIGTERM to that), so every cleanup path runs."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def _health_loop(backend: Backend, grpc_server: GrpcServer) -> None:
    serving = None
    while True:
        ok, results = await backend.check_health()
        if ok != serving:
            down = [a for a, up in results.items() if not up]
            logger.info("tiers %s%s", "SERVING" if ok else "NOT SERVING",
                        f" (not serving: {', '.join(down)})" if down else "")
            await grpc_server.set_serving(ok)
            serving = ok
        await asyncio.sleep(HEALTH_PERIOD_S)


async def _throughput_loop(backend: Backend) -> None:
    while True:
        await asyncio.sleep(THROUGHPUT_PERIOD_S)
        line = backend.stats.report(time.monotonic())
        if line:
            logger.info(line)


def _bind_http(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on host:port; OSError when it cannot bind."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


async def _serve(backend: Backend, host: str, http_port: int, grpc_port: int,
                 ready: asyncio.Event | None,
                 on_listening: Callable[[int, int], None] | None,
                 api_key: ApiKey | None, allowed_origins: Sequence[str]) -> None:
    sock = _bind_http(host, http_port)  # ourselves: uvicorn calls sys.exit when it cannot bind
    try:
        grpc_server = build_grpc_server(backend, host, grpc_port, api_key)
    except BaseException:
        sock.close()
        raise
    await grpc_server.start()
    app = create_app(backend, api_key=api_key, allowed_origins=allowed_origins)
    config = uvicorn.Config(app, host=host, port=http_port, loop="none",
                            lifespan="off", log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5)
    http = _HTTPServer(config)
    http_task = asyncio.create_task(http.serve(sockets=[sock]))
    bound_grpc = grpc_server.port
    loops = [asyncio.create_task(_health_loop(backend, grpc_server)),
             asyncio.create_task(_throughput_loop(backend))]
    try:
        while not http.started:
            if http_task.done():
                http_task.result()
                raise OSError(f"the HTTP server could not start on {host}:{http_port}")
            await asyncio.sleep(0.02)
        bound_http = sock.getsockname()[1]
        logger.info("gateway listening http://%s:%d grpc %s:%d", host, bound_http, host, bound_grpc)
        if on_listening:
            on_listening(bound_http, bound_grpc)
        if ready:
            ready.set()
        await asyncio.shield(http_task)  # cancelling us lets uvicorn shut down gracefully
    finally:
        for task in loops:
            task.cancel()
        http.should_exit = True
        await asyncio.wait({http_task}, timeout=10)
        http_task.cancel()
        await grpc_server.stop(grace_s=5)


async def serve_gateway(prefill_addresses: Sequence[str], decode_addresses: Sequence[str],
                        host: str, http_port: int, grpc_port: int,
                        served_model_name: str | None = None, request_timeout_s: float = 600.0,
                        ready: asyncio.Event | None = None, *,
                        startup_timeout_s: float | None = None,
                        on_listening: Callable[[int, int], None] | None = None,
                        api_key: str | None = None,
                        allowed_origins: Sequence[str] = ("*",)) -> None:
    """Runs the gateway until cancelled (or SIGINT/SIGTERM). Port 0 binds a free port;
    `on_listening(http_port, grpc_port)` gets the bound ports, then `ready` is set. `api_key`:
    required on /v1/* and on tandem.v1.Generation when given; `allowed_origins`: CORS."""
    key = ApiKey(api_key) if api_key else None
    registry = InstanceRegistry(prefill_addresses, decode_addresses)
    tokenizer_dir = Path(tempfile.mkdtemp(prefix="tandem-tokenizer-"))
    backend = None
    try:
        await wait_for_instances(registry, startup_timeout_s)
        spec = check_consistent(registry, served_model_name)
        tokenizer = await fetch_tokenizer(registry, tokenizer_dir)
        logger.info("serving model %s (max_model_len %d, vocab %d) with %d prefill and %d "
                    "decode instances", spec.name, spec.max_model_len, spec.vocab_size,
                    len(registry.prefill), len(registry.decode))
        backend = Backend(spec, registry, tokenizer, request_timeout_s)
        if key is not None:
            logger.info("an API key is required on /v1/* and on tandem.v1.Generation")
        await _serve(backend, host, http_port, grpc_port, ready, on_listening, key,
                     allowed_origins)
    finally:
        await (backend.close() if backend else registry.close())
        shutil.rmtree(tokenizer_dir, ignore_errors=True)


def _addresses(values: Sequence[str]) -> list[str]:
    """Flags accept "a:1 b:2" and "a:1,b:2"."""
    return [a for value in values for a in value.split(",") if a]


def main(args: argparse.Namespace) -> None:
    """Runs `serve_gateway` from parsed `gateway.flags.add_arguments` flags, on uvloop when available, until
    SIGINT / SIGTERM."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_until_signalled(serve_gateway(
        _addresses(args.prefill), _addresses(args.decode), args.host, args.port, args.grpc_port,
        args.served_model_name, args.request_timeout,
        startup_timeout_s=getattr(args, "startup_timeout", None),
        api_key=api_key_from(args, os.environ), allowed_origins=args.allowed_origins), "gateway")
