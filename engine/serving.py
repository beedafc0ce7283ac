"""Process lifetime of a Tandem server (tier or gateway): logging set-up, and running a server
coroutine until SIGINT / SIGTERM.

Torch-free and free of any tier or CLI import, so every server module (the gateway included)
can use it without importing `engine.cli`, which sits above them all.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from typing import Coroutine


def configure_logging(name: str) -> None:
    """Logs to stderr at $TANDEM_LOG_LEVEL (default INFO), each line tagged with `name` and the
    process id. A no-op when the root logger is already configured."""
    fmt = f"%(asctime)s {name}[%(process)d] %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=os.environ.get("TANDEM_LOG_LEVEL", "INFO"), format=fmt,
                        stream=sys.stderr)


async def _until_signalled(coro: Coroutine, name: str) -> int:
    """Runs coro; SIGINT / SIGTERM cancel it, so its cleanup (finally blocks) runs. Returns
    coro's exit code (None counts as 0), or 0 when a signal cancelled it; any other exception
    of coro propagates."""
    task = asyncio.ensure_future(coro)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        return await task or 0
    except asyncio.CancelledError:
        logging.getLogger(name).info("%s stopped", name)
        return 0


def run_until_signalled(coro: Coroutine, name: str) -> int:
    """Runs a server coroutine on uvloop (asyncio where uvloop is missing) until it returns or a
    signal stops it; returns the process exit code. Blocks; call it from the main thread."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(_until_signalled(coro, name))
    return uvloop.run(_until_signalled(coro, name))
