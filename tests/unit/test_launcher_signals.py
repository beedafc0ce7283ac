"""`tandem serve`'s own signal handling (engine/launcher.py): the first signal starts the
shutdown; a second one, arriving while the shutdown runs, is forwarded to the children and
never interrupts the shutdown itself."""

from __future__ import annotations

import signal
import sys

import pytest

from engine.launcher import _Child, _interrupt_once


@pytest.fixture
def restore_handlers():
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_a_second_signal_is_forwarded_not_raised(restore_handlers):
    child = _Child("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"])
    child.start()
    try:
        handler = _interrupt_once([child])
        with pytest.raises(KeyboardInterrupt):
            handler(signal.SIGTERM, None)
        second = signal.getsignal(signal.SIGTERM)
        assert second is not handler
        second(signal.SIGTERM, None)  # no KeyboardInterrupt: passed on to the child
        assert child.proc.wait(timeout=10) == -signal.SIGTERM
    finally:
        if child.proc.poll() is None:
            child.proc.kill()
            child.proc.wait()
