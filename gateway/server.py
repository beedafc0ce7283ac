"""Start-up and serving of the gateway: HTTP (uvicorn) and gRPC (grpc.aio) in one event loop.

    1. wait until every instance answers GetInstanceInfo (progress logged every few seconds)
    2. check they agree: roles, model name, max_model_len, vocab size, KV layout
    3. fetch the tokenizer files from one instance (GetTokenizer) into a temp dir
    4. serve until `stop` is set (SIGINT/SIGTERM) or cancelled; every 5 s re-check health (routing
       skips instances that are not SERVING; gRPC Health follows), every 10 s log throughput if
       there was traffic
    5. on `stop`, drain: health NOT_SERVING and new requests refused (HTTP 503, gRPC UNAVAILABLE)
       at once; in-flight requests run for up to the grace period, then the rest are aborted
       (an SSE stream ends with an error event then [DONE], a gRPC stream with CANCELLED)
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
from typing import Any, Callable, Coroutine, Iterator, Sequence, TypeVar

import uvicorn

from engine.serving import DEFAULT_SHUTDOWN_GRACE_S, run_until_signalled
from engine.grpc_server import GrpcServer
from engine.tokenizer import Tokenizer
from gateway.app import create_app
from gateway.backend import Backend
from gateway.convert import ModelSpec
from gateway.errors import ApiKey
from gateway.flags import DEFAULT_MAX_REQUEST_BYTES
from gateway.flags import api_key as api_key_from
from gateway.grpc_api import build_grpc_server
from gateway.routing import (InstanceRegistry, check_consistent, fetch_tokenizer,
                             wait_for_instances)

logger = logging.getLogger("tandem.gateway")

HEALTH_PERIOD_S = 5.0
THROUGHPUT_PERIOD_S = 10.0
DRAIN_LOG_PERIOD_S = 5.0
# After the grace period, how long aborted streams get to write their last frames.
ABORT_FLUSH_S = 5.0

T = TypeVar("T")


# serving
class _HTTPServer(uvicorn.Server):
    """uvicorn without its signal handling: the gateway drains when `stop` is set and stops when
    its task is cancelled (`main` maps SIGINT/SIGTERM to those), so every cleanup path runs."""

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


async def _wait_inflight(backend: Backend, grace_s: float) -> None:
    """Returns once no request is in flight or grace_s has passed, logging progress."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace_s
    next_log = loop.time() + DRAIN_LOG_PERIOD_S
    while backend.stats.num_inflight and loop.time() < deadline:
        if loop.time() >= next_log:
            logger.info("draining: %d requests in flight, %.0f s of grace left",
                        backend.stats.num_inflight, deadline - loop.time())
            next_log += DRAIN_LOG_PERIOD_S
        await asyncio.sleep(min(0.05, max(deadline - loop.time(), 0)))


async def _abort_remaining(backend: Backend, why: str) -> None:
    """Ends every request still in flight with finish_reason "abort" (a final chunk with the
    usage so far, then [DONE]; gRPC: a last message with FINISH_REASON_ABORT) and gives their
    streams up to ABORT_FLUSH_S to end."""
    if not backend.stats.num_inflight:
        return
    logger.warning("%s: aborting %d requests", why, backend.stats.num_inflight)
    backend.abort_all()
    await _wait_inflight(backend, ABORT_FLUSH_S)


async def _drain(backend: Backend, grpc_server: GrpcServer, draining: asyncio.Event,
                 grace_s: float) -> None:
    """Refuses new requests at once (HTTP 503 via `draining`; gRPC Health NOT_SERVING and
    Generate UNAVAILABLE), lets the ones in flight run for up to grace_s, then aborts the rest."""
    draining.set()
    await grpc_server.refuse_new()  # its calls are counted with HTTP's, in backend.stats
    logger.info("draining %d in-flight requests (grace %.0f s); new requests get 503",
                backend.stats.num_inflight, grace_s)
    await _wait_inflight(backend, grace_s)
    await _abort_remaining(backend, "grace period over")
    logger.info("drained; stopping the servers")


async def _serve(backend: Backend, host: str, http_port: int, grpc_port: int,
                 ready: asyncio.Event | None,
                 on_listening: Callable[[int, int], None] | None,
                 api_key: ApiKey | None, allowed_origins: Sequence[str],
                 stop: asyncio.Event, grace_s: float, max_request_bytes: int) -> None:
    sock = _bind_http(host, http_port)  # ourselves: uvicorn calls sys.exit when it cannot bind
    try:
        grpc_server = build_grpc_server(backend, host, grpc_port, api_key)
    except BaseException:
        sock.close()
        raise
    await grpc_server.start()
    draining = asyncio.Event()
    app = create_app(backend, api_key=api_key, allowed_origins=allowed_origins,
                     draining=draining, max_request_bytes=max_request_bytes)
    config = uvicorn.Config(app, host=host, port=http_port, loop="none",
                            lifespan="off", log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5)
    http = _HTTPServer(config)
    http_task = asyncio.create_task(http.serve(sockets=[sock]))
    bound_grpc = grpc_server.port
    health = asyncio.create_task(_health_loop(backend, grpc_server))
    loops = [health, asyncio.create_task(_throughput_loop(backend))]
    stopping = asyncio.ensure_future(stop.wait())
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
        # cancelling us (not http_task) lets uvicorn shut down gracefully below
        await asyncio.wait({http_task, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if stopping.done():
            health.cancel()  # it would report SERVING again
            await _drain(backend, grpc_server, draining, grace_s)
    finally:
        stopping.cancel()
        for task in loops:
            task.cancel()
        await _abort_remaining(backend, "stopping without draining")  # a second signal
        http.should_exit = True
        await asyncio.wait({http_task}, timeout=10)
        http_task.cancel()
        await grpc_server.stop(grace_s=5)


async def _unless_stopped(stop: asyncio.Event, coro: Coroutine[Any, Any, T]) -> T:
    """coro's result; raises CancelledError (cancelling coro) if `stop` is set first."""
    work, stopping = asyncio.ensure_future(coro), asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({work, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        if not work.done():
            work.cancel()
    return work.result()


async def _connect(registry: InstanceRegistry, served_model_name: str | None,
                   tokenizer_dir: Path, startup_timeout_s: float | None
                   ) -> tuple[ModelSpec, Tokenizer]:
    """Steps 1-3: waits for the instances, checks they agree, fetches the tokenizer."""
    await wait_for_instances(registry, startup_timeout_s)
    spec = check_consistent(registry, served_model_name)
    return spec, await fetch_tokenizer(registry, tokenizer_dir)


async def serve_gateway(prefill_addresses: Sequence[str], decode_addresses: Sequence[str],
                        host: str, http_port: int, grpc_port: int,
                        served_model_name: str | None = None, request_timeout_s: float = 600.0,
                        ready: asyncio.Event | None = None, *,
                        startup_timeout_s: float | None = None,
                        on_listening: Callable[[int, int], None] | None = None,
                        api_key: str | None = None,
                        allowed_origins: Sequence[str] = ("*",),
                        stop: asyncio.Event | None = None,
                        shutdown_grace_s: float = DEFAULT_SHUTDOWN_GRACE_S,
                        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> None:
    """Runs the gateway until cancelled, or until `stop` is set: then it drains (new requests
    refused, in-flight ones given up to shutdown_grace_s, then aborted) and returns; set during
    start-up, it returns at once. Port 0 binds a free port; `on_listening(http_port,
    grpc_port)` gets the bound ports, then `ready` is set. `api_key`: required on /v1/* and
    on tandem.v1.Generation when given; `allowed_origins`: CORS; `max_request_bytes`: the
    largest HTTP body (413 past it)."""
    stop = stop or asyncio.Event()
    key = ApiKey(api_key) if api_key else None
    registry = InstanceRegistry(prefill_addresses, decode_addresses)
    tokenizer_dir = Path(tempfile.mkdtemp(prefix="tandem-tokenizer-"))
    backend = None
    try:
        try:
            spec, tokenizer = await _unless_stopped(stop, _connect(
                registry, served_model_name, tokenizer_dir, startup_timeout_s))
        except asyncio.CancelledError:
            if not stop.is_set():
                raise
            logger.info("stopped during start-up")
            return
        logger.info("serving model %s (max_model_len %d, vocab %d) with %d prefill and %d "
                    "decode instances", spec.name, spec.max_model_len, spec.vocab_size,
                    len(registry.prefill), len(registry.decode))
        backend = Backend(spec, registry, tokenizer, request_timeout_s)
        if key is not None:
            logger.info("an API key is required on /v1/* and on tandem.v1.Generation")
        await _serve(backend, host, http_port, grpc_port, ready, on_listening, key,
                     allowed_origins, stop, shutdown_grace_s, max_request_bytes)
    finally:
        await (backend.close() if backend else registry.close())
        shutil.rmtree(tokenizer_dir, ignore_errors=True)


def _addresses(values: Sequence[str]) -> list[str]:
    """Flags accept "a:1 b:2" and "a:1,b:2"."""
    return [a for value in values for a in value.split(",") if a]


def main(args: argparse.Namespace,
         on_listening: Callable[[int, int], None] | None = None) -> None:
    """Runs `serve_gateway` from parsed `gateway.flags.add_arguments` flags, on uvloop when
    available: the first SIGINT / SIGTERM drains it, a second one stops it at once.
    `on_listening(http_port, grpc_port)` gets the ports bound (see `serve_gateway`)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_until_signalled(lambda stop: serve_gateway(
        _addresses(args.prefill), _addresses(args.decode), args.host, args.port, args.grpc_port,
        args.served_model_name, args.request_timeout,
        startup_timeout_s=getattr(args, "startup_timeout", None), on_listening=on_listening,
        api_key=api_key_from(args, os.environ), allowed_origins=args.allowed_origins,
        stop=stop, shutdown_grace_s=args.shutdown_grace_s,
        max_request_bytes=args.max_request_bytes), "gateway")
