"""The engine thread: schedule -> run -> update, forever.

Model work never runs on an event loop. The tiers talk to the engine thread in two ways:
  - `call(fn)` queues a function to run on the engine thread between steps (add a request,
    abort one, mark KV arrived, free blocks). Only the engine thread touches the scheduler and
    the block pool, so none of them needs a lock.
  - `EngineHooks` methods are called on the engine thread after each step; a tier's hooks hand
    results to its event loop with `loop.call_soon_threadsafe`.

Failures: a model step, a request's sampling, the update after a step or a hook that raises
fails the requests it concerns (FINISHED_ERROR, delivered through `on_step`), and the engine
goes on. A failure it cannot confine (the scheduler itself, or failing those requests) is fatal:
`on_fatal` runs once, the thread ends, and the tier stops serving (health NOT_SERVING, process
exits non-zero). The thread never dies silently.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import queue
import threading
import time
from typing import Callable, Mapping, Protocol

from engine.model_runner import ModelRunner
from engine.request import Request, RequestStatus
from engine.sampling_params import TokenLogprobs
from engine.scheduler import ScheduledChunk, Scheduler, SchedulerOutput

logger = logging.getLogger("engine")

STATS_INTERVAL_S = 10.0


class EngineHooks(Protocol):
    def on_admitted_for_kv(self, requests: list[Request]) -> None:
        """Decode tier: these requests hold blocks now; start their KV transfers."""

    def on_step(self, output: SchedulerOutput, sampled: dict[str, int], finished: list[Request],
                logprobs: Mapping[str, TokenLogprobs]) -> None:
        """After a step. Requests of output.chunks with status FINISHED_ERROR failed (their
        `error` says why); the tier delivers the error and frees their blocks. `logprobs`: of
        the sampled tokens of the requests that asked for them."""

    def on_fatal(self, error: BaseException) -> None:
        """The engine thread is ending on an error it could not confine: fail every request,
        stop serving. Called once, on the engine thread, as its last act."""


class WrongThreadError(RuntimeError):
    """A tier method was called off the thread it is marked for: a bug in its caller."""


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:  # no loop runs on this thread
        return None


def engine_thread(method: Callable) -> Callable:
    """Marks a tier method that runs on the engine thread only (`self.core`'s); called on any
    other thread it raises WrongThreadError (a real check: it stays under `python -O`)."""
    @functools.wraps(method)
    def checked(self, *args, **kwargs):
        if not self.core.on_thread:
            raise WrongThreadError(f"{method.__qualname__} must run on the engine thread, not on "
                                   f"thread {threading.current_thread().name!r}")
        return method(self, *args, **kwargs)
    checked.runs_on = "engine thread"
    return checked


def event_loop(method: Callable) -> Callable:
    """Marks a tier method that runs on its event loop only (`self.loop`); called anywhere
    else (another thread, another loop) it raises WrongThreadError."""
    @functools.wraps(method)
    def checked(self, *args, **kwargs):
        if _running_loop() is not self.loop:
            raise WrongThreadError(f"{method.__qualname__} must run on its tier's event loop, not "
                                   f"on thread {threading.current_thread().name!r}")
        return method(self, *args, **kwargs)
    checked.runs_on = "event loop"
    return checked


def _rss_mib() -> float:
    """Resident memory of this process (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return 0.0


class EngineStats:
    """Counters for the periodic log line. Engine thread only."""

    def __init__(self) -> None:
        self.last_log = time.monotonic()
        self.num_prompt_tokens = 0
        self.num_generated_tokens = 0
        self.num_steps = 0

    def record(self, output: SchedulerOutput, sampled: dict[str, int]) -> None:
        """Call before update_from_output (it reads how far each request had got)."""
        self.num_steps += 1
        self.num_generated_tokens += len(sampled)
        self.num_prompt_tokens += sum(
            min(n, r.num_prompt_tokens - r.num_computed_tokens) for r, n in output.chunks
            if r.num_computed_tokens < r.num_prompt_tokens)

    def maybe_log(self, name: str, scheduler: Scheduler) -> None:
        now = time.monotonic()
        elapsed = now - self.last_log
        if elapsed < STATS_INTERVAL_S or self.num_steps == 0:
            return
        pool = scheduler.pool
        logger.info(
            "%s: prompt %.1f tok/s, generation %.1f tok/s, %.1f steps/s, running %d, "
            "waiting %d, waiting for KV %d, KV usage %.1f%% (%d/%d blocks), "
            "preemptions %d since start, prefix hit rate %.1f%%, RSS %.0f MiB",
            name, self.num_prompt_tokens / elapsed, self.num_generated_tokens / elapsed,
            self.num_steps / elapsed, len(scheduler.running), len(scheduler.waiting),
            len(scheduler.waiting_for_kv), 100 * pool.usage,
            pool.num_blocks - pool.num_free_blocks, pool.num_blocks,
            scheduler.num_preemptions,
            100 * pool.num_prefix_hits / max(pool.num_prefix_queries, 1), _rss_mib())
        self.__init__()


class EngineCore:
    """Owns the engine thread. `start()` once; `stop()` joins it."""

    def __init__(self, name: str, scheduler: Scheduler, runner: ModelRunner, hooks: EngineHooks):
        self.name = name
        self.scheduler = scheduler
        self.runner = runner
        self.hooks = hooks
        self.stats = EngineStats()
        self._commands: queue.SimpleQueue[tuple[Callable[[], None], Request | None] | None] = (
            queue.SimpleQueue())
        self._thread = threading.Thread(target=self._run, name=f"{name}-engine", daemon=True)
        self._stopped = False
        self.error: BaseException | None = None  # set when the thread ended on a fatal error

    @property
    def on_thread(self) -> bool:
        """Whether the caller runs on the engine thread."""
        return threading.current_thread() is self._thread

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Ends the thread after the step in progress; commands queued before this call still
        run (a request's blocks freed just before a stop are freed)."""
        self._stopped = True
        self._commands.put(None)
        self._thread.join(timeout=30)

    def call(self, fn: Callable[[], None], request: Request | None = None) -> None:
        """Runs fn on the engine thread before the next step. Thread-safe, never blocks.

        If fn raises, `request` (the one it concerns) fails like a failed step; with no request
        named, the failure is fatal."""
        self._commands.put((fn, request))

    def _drain(self, block: bool) -> None:
        timeout = 1.0 if block else None
        while True:
            try:
                fn = self._commands.get(block=block, timeout=timeout)
            except queue.Empty:
                return
            block = False
            if fn is not None:
                self._run_command(*fn)

    def _run_command(self, fn: Callable[[], None], request: Request | None) -> None:
        try:
            fn()
        except Exception as exc:
            if request is None:
                raise
            self._fail_step(SchedulerOutput([ScheduledChunk(request, 0)], []),
                            f"engine command failed: {exc}")

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - reported, never silent
            logger.critical("%s: engine thread failed; this instance stops serving", self.name,
                            exc_info=exc)
            self.error = exc
            try:
                self.hooks.on_fatal(exc)
            except BaseException:  # noqa: BLE001
                logger.critical("%s: failing the requests failed too", self.name, exc_info=True)

    def _loop(self) -> None:
        idle = True
        while not self._stopped:
            self._drain(block=idle)
            output = self.scheduler.schedule()
            if output.admitted_for_kv:
                self.hooks.on_admitted_for_kv(output.admitted_for_kv)
            idle = not output.chunks and not output.preempted  # preempted: admit them now
            if not idle:
                self._step(output)
            self.stats.maybe_log(self.name, self.scheduler)
        self._drain(block=False)  # what was asked before stop() still runs (frees, aborts)

    def _step(self, output: SchedulerOutput) -> None:
        try:
            result = self.runner.execute(output.chunks)
        except Exception as exc:
            self._fail_step(output, f"model step failed: {exc}")
            return
        try:
            for request, _ in output.chunks:
                error = result.failed.get(request.request_id)
                if error is not None:
                    self.scheduler.finish(request, RequestStatus.FINISHED_ERROR, error)
                entries = result.prompt_logprobs.get(request.request_id)
                if entries is not None:  # before the update moves num_computed_tokens on
                    request.record_prompt_logprobs(request.num_computed_tokens, entries)
            self.stats.record(output, result.sampled)
            finished = self.scheduler.update_from_output(output, result.sampled)
            self.hooks.on_step(output, result.sampled, finished, result.logprobs)
        except Exception as exc:
            self._fail_step(output, f"step update failed: {exc}")

    def _fail_step(self, output: SchedulerOutput, reason: str) -> None:
        """Fails the step's unfinished requests and reports them (raises if that fails too)."""
        failed = [r for r, _ in output.chunks if not r.status.finished]
        logger.exception("%s: %s; failing its %d requests", self.name, reason, len(failed))
        for request in failed:
            self.scheduler.finish(request, RequestStatus.FINISHED_ERROR, reason)
        self.hooks.on_step(output, {}, failed, {})
