"""The thread marks of the tier engines: a method marked @engine_thread raises WrongThreadError
anywhere but its engine thread, one marked @event_loop anywhere but its tier's loop (real
checks, not asserts: they hold under `python -O`), and every synchronous method of DecodeEngine
and PrefillEngine is marked or on a short, justified list.

The wrong-thread calls go to the real decorated methods of both tiers with a stand-in `self`
holding a real EngineCore and loop: the check runs before the method's body, so the body never
sees the stand-in."""

from __future__ import annotations

import asyncio
import inspect
import threading
from types import SimpleNamespace

import pytest

from decode_service.engine import DecodeEngine
from engine.block_pool import BlockPool
from engine.engine_core import EngineCore, WrongThreadError, engine_thread, event_loop
from engine.scheduler import Scheduler, SchedulerConfig
from prefill_service.engine import PrefillEngine

TIERS = (DecodeEngine, PrefillEngine)
HANG_GUARD_S = 10.0

# Synchronous methods that carry no mark, and why each may run on any thread.
UNMARKED = {
    "__init__": "builds the object before the engine thread starts",
    "start": "lifecycle, called by the server that owns the engine, before serving",
    "stop": "lifecycle, called by that server after serving (joins the engine thread)",
    "validate": "checks a prompt against configuration fixed at start-up; no shared state",
    "_attempt_budget": "arithmetic on the stream's deadline (fixed at arrival) and the clock",
    "_retryable": "a predicate on an error, the stream's deadline and the clock",
}


def sync_methods(cls) -> dict:
    return {name: member for name, member in vars(cls).items() if inspect.isfunction(member)
            and not inspect.iscoroutinefunction(member) and not inspect.isasyncgenfunction(member)}


def marked(runs_on: str) -> list:
    return [pytest.param(cls, name, id=f"{cls.__name__}.{name}") for cls in TIERS
            for name, member in sync_methods(cls).items()
            if getattr(member, "runs_on", None) == runs_on]


@pytest.fixture
def core():
    """A real, running EngineCore over an empty scheduler (it never steps, so no model)."""
    config = SchedulerConfig(max_num_batched_tokens=8, max_num_seqs=2, block_size=4,
                             max_model_len=16, kv_from_remote=False)
    core = EngineCore("test", Scheduler(config, BlockPool(8), frozenset()), None, None)
    core.start()
    yield core
    core.stop()


def on_engine_thread(core: EngineCore, fn):
    """Runs fn on core's engine thread; returns what it raised (None if nothing)."""
    done, raised = threading.Event(), []

    def run():
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - handed back to the test
            raised.append(exc)
        finally:
            done.set()

    core.call(run)
    assert done.wait(HANG_GUARD_S)
    return raised[0] if raised else None


def on_a_loop(fn):
    """Runs fn on a fresh event loop (as a servicer coroutine would); returns what it raised."""
    async def run():
        try:
            fn()
        except Exception as exc:  # noqa: BLE001
            return exc
        return None

    return asyncio.run(run())


def test_both_marks_are_used_on_both_tiers():
    for cls in TIERS:
        kinds = {getattr(m, "runs_on", None) for m in sync_methods(cls).values()}
        assert {"engine thread", "event loop"} <= kinds, cls.__name__


@pytest.mark.parametrize("cls,name", marked("engine thread"))
def test_an_engine_thread_method_raises_off_the_engine_thread(core, cls, name):
    method = getattr(cls, name)
    tier = SimpleNamespace(core=core, loop=None)
    with pytest.raises(WrongThreadError, match=f"{cls.__name__}.{name} must run on the engine "
                                               "thread, not on thread 'MainThread'"):
        method(tier)  # the test thread
    raised = on_a_loop(lambda: method(tier))  # an event loop (a servicer's)
    assert isinstance(raised, WrongThreadError) and name in str(raised)


@pytest.mark.parametrize("cls,name", marked("event loop"))
def test_an_event_loop_method_raises_off_its_loop(core, cls, name):
    method = getattr(cls, name)
    tier = SimpleNamespace(core=core, loop=asyncio.new_event_loop())  # the tier's, not running
    try:
        with pytest.raises(WrongThreadError, match=f"{cls.__name__}.{name} must run on its "
                                                   "tier's event loop"):
            method(tier)  # the test thread, no loop running
        raised = on_engine_thread(core, lambda: method(tier))
        assert isinstance(raised, WrongThreadError) and "'test-engine'" in str(raised)
        raised = on_a_loop(lambda: method(tier))  # a loop, but another one
        assert isinstance(raised, WrongThreadError) and name in str(raised)
    finally:
        tier.loop.close()


class Tier:
    """The smallest tier: one method of each mark, saying where it ran."""

    def __init__(self, core: EngineCore, loop: asyncio.AbstractEventLoop | None):
        self.core, self.loop = core, loop

    @engine_thread
    def on_engine(self) -> str:
        return threading.current_thread().name

    @event_loop
    def on_loop(self) -> str:
        return threading.current_thread().name


def test_marked_methods_run_where_they_are_marked_for(core):
    tier = Tier(core, None)
    ran = []
    assert on_engine_thread(core, lambda: ran.append(tier.on_engine())) is None
    assert ran == ["test-engine"]

    async def on_its_loop():
        tier.loop = asyncio.get_running_loop()
        return tier.on_loop()

    assert asyncio.run(on_its_loop()) == "MainThread"


def test_every_synchronous_tier_method_is_marked_or_listed():
    unmarked = {name for cls in TIERS for name, member in sync_methods(cls).items()
                if getattr(member, "runs_on", None) is None}
    assert unmarked == set(UNMARKED), (
        "mark each new method @engine_thread or @event_loop (engine/engine_core.py), or list it "
        "in UNMARKED with the reason it may run on any thread")
