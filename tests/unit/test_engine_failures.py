"""Failures inside the engine stay with the requests they concern: a request whose sampling
fails, a hook or an engine command that raises; what cannot be confined ends the engine thread
loudly (`on_fatal`), never silently. Real scheduler, model runner and tiny model."""

from __future__ import annotations

import threading

import pytest
import torch

from engine.engine_core import EngineCore
from engine.instance import build_engine_parts
from engine.request import Request, RequestStatus
from engine.sampler import SamplingError, sample
from engine.sampling_params import SamplingParams
from engine.scheduler import SchedulerOutput
from tests.services.conftest import config_for

WAIT_S = 30.0  # hang guard only


class Hooks:
    """A tier's hooks, recording what the engine reports; `raise_for` makes on_step raise
    while a request with that id is in the step."""

    def __init__(self, raise_for: str | None = None) -> None:
        self.raise_for = raise_for
        self.ended: dict[str, Request] = {}
        self.fatal: BaseException | None = None
        self.changed = threading.Condition()

    def on_admitted_for_kv(self, requests):
        raise AssertionError("not a decode tier")

    def on_step(self, output, sampled, finished, logprobs):
        if self.raise_for in {r.request_id for r, _ in output.chunks} and sampled:
            raise RuntimeError("hook failed")
        with self.changed:
            for request, _ in output.chunks:
                if request.status.finished:
                    self.ended[request.request_id] = request
            self.changed.notify_all()

    def on_fatal(self, error):
        with self.changed:
            self.fatal = error
            self.changed.notify_all()

    def wait(self, predicate) -> None:
        with self.changed:
            assert self.changed.wait_for(predicate, WAIT_S), "the engine never reported"


@pytest.fixture
def engine(tiny_models):
    """start(hooks) -> a running EngineCore over the tiny llama (prefill-style: own KV)."""
    cores = []

    def start(hooks: Hooks) -> EngineCore:
        parts = build_engine_parts(config_for(tiny_models["llama"]), False)
        cores.append(EngineCore("test", parts.scheduler, parts.runner, hooks))
        cores[-1].start()
        return cores[-1]

    yield start
    for core in cores:
        core.stop()


def request(request_id: str, **sampling) -> Request:
    params = SamplingParams(**{"max_tokens": 3, "temperature": 0.0, **sampling})
    return Request(request_id, [5, 6, 7, 8, 9], params)


def test_tiny_temperatures_are_greedy():
    assert SamplingParams(max_tokens=1, temperature=1e-40).validate().greedy
    assert SamplingParams(max_tokens=1, temperature=0.0).greedy
    assert not SamplingParams(max_tokens=1, temperature=1e-3).greedy
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    assert sample(logits, [request("a", temperature=1e-40)]) == [1]


def test_a_row_that_cannot_be_sampled_fails_alone():
    logits = torch.tensor([[1.0, 3.0, 2.0], [float("nan")] * 3, [0.0, 0.0, 9.0]])
    rows = [request("a", temperature=1.0, seed=1), request("b", temperature=1.0, seed=1),
            request("c", temperature=1.0, seed=1)]
    tokens = sample(logits, rows)
    assert isinstance(tokens[1], SamplingError)
    assert tokens[0] in (0, 1, 2) and tokens[2] in (0, 1, 2)


def test_one_requests_sampling_failure_does_not_fail_its_batch(engine):
    hooks = Hooks()
    core = engine(hooks)
    bad = request("bad", temperature=float("nan"))  # unvalidated: its sampling fails
    good = request("good")
    core.call(lambda: (core.scheduler.add(bad), core.scheduler.add(good)))
    hooks.wait(lambda: {"bad", "good"} <= hooks.ended.keys())
    assert bad.status is RequestStatus.FINISHED_ERROR and "sampling failed" in bad.error
    assert good.status is RequestStatus.FINISHED_LENGTH and good.num_output_tokens == 3


def test_a_raising_hook_fails_its_requests_and_the_engine_goes_on(engine):
    hooks = Hooks(raise_for="a")
    core = engine(hooks)
    first = request("a")
    core.call(lambda: core.scheduler.add(first))
    hooks.wait(lambda: "a" in hooks.ended)
    assert first.status is RequestStatus.FINISHED_ERROR and "hook failed" in first.error
    later = request("b")
    core.call(lambda: core.scheduler.add(later))
    hooks.wait(lambda: "b" in hooks.ended)
    assert later.status is RequestStatus.FINISHED_LENGTH and hooks.fatal is None


def test_a_failing_command_fails_the_request_it_names(engine):
    hooks = Hooks()
    core = engine(hooks)
    victim = request("a")
    core.call(lambda: core.scheduler.add(victim))
    hooks.wait(lambda: "a" in hooks.ended)  # ran to the end
    other = request("b", max_tokens=50)
    core.call(lambda: core.scheduler.add(other))

    def broken() -> None:
        raise RuntimeError("command failed")

    core.call(broken, other)
    hooks.wait(lambda: "b" in hooks.ended)
    assert other.status is RequestStatus.FINISHED_ERROR and "command failed" in other.error
    assert hooks.fatal is None and core.error is None


def test_a_scheduler_failure_is_fatal_and_reported(engine, monkeypatch):
    hooks = Hooks()
    core = engine(hooks)

    def broken_schedule():
        raise RuntimeError("scheduler state is corrupt")

    monkeypatch.setattr(core.scheduler, "schedule", broken_schedule)
    core.call(lambda: None)  # wake the thread
    hooks.wait(lambda: hooks.fatal is not None)
    assert "corrupt" in str(hooks.fatal) and core.error is hooks.fatal
    core._thread.join(WAIT_S)
    assert not core._thread.is_alive()


def test_commands_queued_before_stop_still_run():
    """stop() right after a command (a request's release, say) must not lose it: the thread used
    to exit at its next loop check with the command still queued (a flaky leak in teardowns)."""
    class Scheduler:
        def __init__(self):
            self.running, self.waiting, self.waiting_for_kv = [], [], {}
            self.in_schedule, self.release = threading.Event(), threading.Event()

        def schedule(self):
            self.in_schedule.set()
            self.release.wait(10)  # hold the thread past its drain, as a busy machine can
            return SchedulerOutput([], [])

    scheduler, ran = Scheduler(), []
    core = EngineCore("test", scheduler, runner=None, hooks=None)
    core.start()
    assert scheduler.in_schedule.wait(10)
    core.call(lambda: ran.append("freed"))
    core._stopped = True  # stop() as it lands while the thread is inside schedule()
    scheduler.release.set()
    core.stop()
    assert ran == ["freed"]
