"""Slows the tier processes of a real `tandem serve`, for tests/e2e/test_cancellation.py.

Python imports `sitecustomize` at start-up from sys.path, so a test that puts this folder on
$PYTHONPATH reaches every child process `tandem serve` starts. In a `prefill` or `decode`
process, and only when $TANDEM_TEST_SLOW is set ("prefill_step=1.0,kv_send=1.0,decode_step=0.05",
seconds), it sleeps before each model step of that tier and, on the prefill tier, before each
KV message that carries blocks, so a request stays in each phase (prefilling, transferring,
decoding) long enough to be seen there and cancelled. Elsewhere it does nothing (the gateway
never imports torch).
"""

from __future__ import annotations

import os
import sys


def _install() -> None:
    spec = os.environ.get("TANDEM_TEST_SLOW")
    role = sys.argv[1] if len(sys.argv) > 1 else ""
    if not spec or role not in ("prefill", "decode"):
        return
    import asyncio
    import time
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # this repository
    from engine.model_runner import ModelRunner
    from kvtransfer.sender import OutgoingTransfer

    delays = {key: float(value) for key, value in (item.split("=") for item in spec.split(","))}
    step_s = delays.get(f"{role}_step", 0.0)
    execute = ModelRunner.execute

    def slow_execute(self, chunks):
        time.sleep(step_s)
        return execute(self, chunks)

    ModelRunner.execute = slow_execute
    send_s = delays.get("kv_send", 0.0)
    next_blocks = OutgoingTransfer.next_blocks

    async def slow_next_blocks(self, limit):
        blocks = await next_blocks(self, limit)
        if blocks:
            await asyncio.sleep(send_s)
        return blocks

    OutgoingTransfer.next_blocks = slow_next_blocks


_install()
