"""Process lifetime of a Tandem server (tier or gateway): logging set-up, and running a server
coroutine until SIGINT / SIGTERM (the first one drains, a second one stops at once), and the
--shutdown-grace-s flag every server command shares.

Torch-free and free of any tier or CLI import, so every server module (the gateway included)
can use it without importing `engine.cli`, which sits above them all.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from typing import Callable, Coroutine


def configure_logging(name: str) -> None:
    """Logs to stderr at $TANDEM_LOG_LEVEL (default INFO), each line tagged with `name` and the
    process id. A no-op when the root logger is already configured."""
    fmt = f"%(asctime)s {name}[%(process)d] %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=os.environ.get("TANDEM_LOG_LEVEL", "INFO"), format=fmt,
                        stream=sys.stderr)


# How long a server lets in-flight requests finish after SIGTERM before aborting them: 30 s is
# Kubernetes' default terminationGracePeriodSeconds, after which the kubelet sends SIGKILL anyway.
DEFAULT_SHUTDOWN_GRACE_S = 30.0


def add_shutdown_grace_arg(parser: argparse.ArgumentParser) -> None:
    """--shutdown-grace-s (every `tandem` server command, and `tandem serve`)."""
    parser.add_argument("--shutdown-grace-s", type=float, default=DEFAULT_SHUTDOWN_GRACE_S,
                        metavar="S", help="on SIGTERM / SIGINT: refuse new requests at once and "
                        "let in-flight ones finish for up to S seconds, then abort them (default "
                        f"{DEFAULT_SHUTDOWN_GRACE_S:.0f}: Kubernetes' default "
                        "terminationGracePeriodSeconds); a second signal stops at once")


Server = Callable[[asyncio.Event], Coroutine]


async def _until_signalled(server: Server, name: str) -> int:
    """Runs server(stop): the first SIGINT / SIGTERM sets `stop` (the server drains: refuses
    new requests, lets in-flight ones finish within its grace period, then returns); a second
    one cancels it, so only its cleanup (finally blocks) runs. Returns the server's exit code
    (None counts as 0), or 0 when a signal cancelled it; any other exception propagates."""
    stop = asyncio.Event()
    task = asyncio.ensure_future(server(stop))
    log = logging.getLogger(name)

    def on_signal(sig: signal.Signals) -> None:
        if not stop.is_set():
            log.info("%s: draining (a second signal stops at once)", sig.name)
            stop.set()
        else:
            log.warning("%s again: stopping without draining", sig.name)
            task.cancel()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        code = await task or 0
    except asyncio.CancelledError:
        code = 0
    log.info("%s stopped", name)
    return code


def run_until_signalled(server: Server, name: str) -> int:
    """Runs `server(stop)` (a coroutine function taking the event the first SIGINT / SIGTERM
    sets) on uvloop (asyncio where uvloop is missing) until it returns or a second signal
    cancels it; returns the process exit code. Blocks; call it from the main thread."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(_until_signalled(server, name))
    return uvloop.run(_until_signalled(server, name))
