"""`tandem serve` under SIGTERM and under a crashed child, as real processes.

SIGTERM drains: /health turns 503 at once, new requests get 503, in-flight streams finish within
--shutdown-grace-s (past it they end with an error event, then [DONE]), and every process exits.
A child killed with SIGKILL is restarted on its address and serves again.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from protos.tandem.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from tests.e2e.conftest import Served, start_serve, wait_for

HANG_GUARD_S = 60.0
PROMPT = "Once upon a time"


@dataclass
class Stream:
    """One streaming completion read on a thread: `started` is set at its first token."""

    max_tokens: int
    started: threading.Event = field(default_factory=threading.Event)
    finish_reason: str | None = None
    completion_tokens: int | None = None
    error: dict | None = None
    done_frame: bool = False
    thread: threading.Thread | None = None

    def read(self, served: Served) -> None:
        body = {"model": served.model_dir.name, "prompt": PROMPT, "max_tokens": self.max_tokens,
                "temperature": 0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        with httpx.stream("POST", f"{served.base_url}/completions", json=body,
                          timeout=HANG_GUARD_S) as response:
            assert response.status_code == 200, response.read()
            for line in response.iter_lines():
                self._frame(line.removeprefix("data: ") if line.startswith("data: ") else None)

    def _frame(self, data: str | None) -> None:
        if data is None:
            return
        if data == "[DONE]":
            self.done_frame = True
            return
        chunk = json.loads(data)
        if "error" in chunk:
            self.error = chunk["error"]
            return
        self.started.set()
        for choice in chunk.get("choices", ()):
            self.finish_reason = choice.get("finish_reason") or self.finish_reason
        if chunk.get("usage"):
            self.completion_tokens = chunk["usage"]["completion_tokens"]


def start_streams(served: Served, count: int, max_tokens: int) -> list[Stream]:
    """`count` streams, returned once each has its first token."""
    streams = [Stream(max_tokens) for _ in range(count)]
    for stream in streams:
        stream.thread = threading.Thread(target=stream.read, args=(served,), daemon=True)
        stream.thread.start()
    for stream in streams:
        wait_for(lambda: stream.started.is_set() or not stream.thread.is_alive(),
                 "a stream's first token")
        assert stream.started.is_set(), "a stream ended before its first token"
    return streams


def children(pid: int) -> list[int]:
    """The child process ids of `pid` (Linux /proc)."""
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def gone(pid: int) -> bool:
    """True once `pid` has exited (a zombie counts: its parent has not reaped it yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def health_status(served: Served) -> int | None:
    """/health's status code; None when nothing listens."""
    try:
        return httpx.get(f"http://127.0.0.1:{served.http_port}/health", timeout=5).status_code
    except httpx.TransportError:
        return None


def stop_and_check_exit(served: Served, streams: list[Stream]) -> None:
    """Waits for `tandem serve` to exit 0 with all its children, and for the streams' readers."""
    pids = children(served.proc.pid)
    assert served.proc.wait(timeout=HANG_GUARD_S) == 0, "".join(served.output[-40:])
    wait_for(lambda: all(gone(p) for p in pids), "every child process to exit")
    for stream in streams:
        stream.thread.join(HANG_GUARD_S)
        assert not stream.thread.is_alive()


def assert_grpc_refuses(served: Served) -> None:
    """The public gRPC API of a draining gateway: Health NOT_SERVING, Generate UNAVAILABLE."""
    with grpc.insecure_channel(f"127.0.0.1:{served.grpc_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                             timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
        request = generation_pb2.GenerateRequest(
            text=PROMPT, sampling=common_pb2.SamplingParams(max_tokens=4))
        with pytest.raises(grpc.RpcError) as info:
            list(generation_pb2_grpc.GenerationStub(channel).Generate(request, timeout=10))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()


@pytest.fixture
def serve(tiny_models):
    """serve(*flags, env=None, ports=None) -> Served on the tiny llama; killed (with its
    children) if a test fails."""
    started: list[Served] = []

    def start(*flags: str, env: dict | None = None,
              ports: tuple[int, int] | None = None) -> Served:
        started.append(start_serve(tiny_models["llama"], "--num-kv-blocks", "512", *flags,
                                   env=env, ports=ports))
        return started[-1]

    yield start
    for served in started:
        if served.proc.poll() is None:
            for pid in children(served.proc.pid):
                os.kill(pid, signal.SIGKILL)
            served.proc.kill()
            served.proc.wait()


def test_sigterm_drains_in_flight_streams_then_everything_exits(serve):
    served = serve("--shutdown-grace-s", "60")
    streams = start_streams(served, 4, max_tokens=900)
    served.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: health_status(served) == 503, "/health to turn 503")
    refused = httpx.post(f"{served.base_url}/completions", timeout=HANG_GUARD_S,
                         json={"model": served.model_dir.name, "prompt": PROMPT, "max_tokens": 4})
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "shutting_down"
    assert_grpc_refuses(served)
    stop_and_check_exit(served, streams)
    for stream in streams:
        assert stream.error is None, stream.error
        assert (stream.finish_reason, stream.completion_tokens) == ("length", 900)
        assert stream.done_frame


def test_two_quick_sigterms_stop_everything_cleanly(serve):
    """A second signal while `tandem serve` stops (as `timeout` or a supervisor may send, or a
    second Ctrl-C) is passed on to the children: no traceback, exit code 0, nothing left."""
    served = serve()
    assert health_status(served) == 200
    served.proc.send_signal(signal.SIGTERM)
    served.proc.send_signal(signal.SIGTERM)
    stop_and_check_exit(served, [])
    assert "Traceback" not in "".join(served.output), "".join(served.output[-40:])


def test_sigterm_past_the_grace_period_aborts_the_streams(serve):
    served = serve("--shutdown-grace-s", "1")
    streams = start_streams(served, 2, max_tokens=1000)
    started = time.monotonic()
    served.proc.send_signal(signal.SIGTERM)
    stop_and_check_exit(served, streams)
    assert time.monotonic() - started < 1 + 15, "the drain outlived its grace period"
    for stream in streams:
        assert stream.error is None and stream.finish_reason == "abort", stream
        assert 0 < stream.completion_tokens < 1000  # the usage so far, not the request's
        assert stream.done_frame  # a final chunk, then [DONE]: never a cut stream


def kill_and_wait_for_restart(served: Served, role: str) -> list[str]:
    """SIGKILLs `tandem serve`'s `role` child; returns its replacement's command line."""
    old, = [p for p in children(served.proc.pid) if role in cmdline(p)]
    os.kill(old, signal.SIGKILL)
    new = wait_for(lambda: [p for p in children(served.proc.pid)
                            if p != old and role in cmdline(p)], f"a new {role} process")
    return cmdline(new[0])


def completes(served: Served) -> bool:
    try:
        response = httpx.post(f"{served.base_url}/completions", timeout=HANG_GUARD_S,
                              json={"model": served.model_dir.name, "prompt": PROMPT,
                                    "max_tokens": 4})
    except httpx.TransportError:
        return False
    return response.status_code == 200


def test_killed_decode_and_gateway_processes_are_restarted_on_their_addresses(serve):
    served = serve()
    command = kill_and_wait_for_restart(served, "decode")
    assert command[command.index("--port") + 1] == served.decode[0].rsplit(":", 1)[1]
    wait_for(lambda: completes(served), "a request to succeed after the restart", period=0.5)
    kill_and_wait_for_restart(served, "gateway")
    wait_for(lambda: completes(served), "a request to succeed after the restart", period=0.5)
    served.proc.send_signal(signal.SIGTERM)
    stop_and_check_exit(served, [])
    assert sum("restarting it" in line for line in served.output) == 2


def test_port_0_binds_free_ports_that_a_restarted_gateway_keeps(serve):
    """--port 0 --grpc-port 0 (as vLLM users pass in tests): the banner names the ports bound;
    a restarted gateway binds the same ones; SIGTERM stops it all with status 0."""
    served = serve(ports=(0, 0))
    assert served.http_port and served.grpc_port and served.http_port != served.grpc_port
    assert completes(served)
    with grpc.insecure_channel(f"127.0.0.1:{served.grpc_port}") as channel:
        request = generation_pb2.GenerateRequest(
            text=PROMPT, sampling=common_pb2.SamplingParams(max_tokens=4, ignore_eos=True))
        responses = list(generation_pb2_grpc.GenerationStub(channel).Generate(request,
                                                                               timeout=30))
    assert responses[-1].usage.completion_tokens == 4
    command = kill_and_wait_for_restart(served, "gateway")
    assert command[command.index("--port") + 1] == str(served.http_port)
    assert command[command.index("--grpc-port") + 1] == str(served.grpc_port)
    wait_for(lambda: completes(served), "a request to succeed after the restart", period=0.5)
    served.proc.send_signal(signal.SIGTERM)
    stop_and_check_exit(served, [])


def completion_route(served: Served, max_tokens: int = 4) -> str:
    """A non-streaming completion that must succeed; returns the decode address it ran on
    (from the gateway's log line for it)."""
    response = httpx.post(f"{served.base_url}/completions", timeout=HANG_GUARD_S,
                          json={"model": served.model_dir.name, "prompt": PROMPT,
                                "max_tokens": max_tokens, "ignore_eos": True})
    assert response.status_code == 200, response.text
    request_id = response.json()["id"]
    line = wait_for(lambda: [line for line in served.output
                             if f"request {request_id}:" in line and "decode=" in line],
                    "the gateway's log line for the request")[0]
    return line.split("decode=")[1].split()[0]


def test_a_killed_decode_instance_fails_its_streams_and_the_traffic_moves(serve):
    """Two decode instances, 16 streams on them; one is killed (SIGKILL): its streams end with
    an error event then [DONE], the others finish; new requests succeed at once, on the survivor;
    `tandem serve` restarts the dead one on its address, and the gateway routes to it again once
    its health returns (no other process restarts)."""
    slow = {"PYTHONPATH": str(Path(__file__).parent / "slow_tiers"),
            "TANDEM_TEST_SLOW": "decode_step=0.05"}  # streams stay in flight (10 s)
    served = serve("--decode-workers", "2", env=slow)
    victim_address, survivor_address = served.decode
    streams = start_streams(served, 16, max_tokens=200)
    victim = served.pid_of(victim_address)
    others = [p for p in children(served.proc.pid) if p != victim]
    os.kill(victim, signal.SIGKILL)
    for _ in range(4):  # at once: never routed to the dead instance (or moved off it)
        assert completion_route(served) == survivor_address
    for stream in streams:
        stream.thread.join(HANG_GUARD_S)
    failed = [s for s in streams if s.error is not None]
    finished = [s for s in streams if s.error is None]
    assert len(failed) == 8 and len(finished) == 8, streams  # eight on each instance
    for stream in failed:
        assert stream.done_frame and stream.finish_reason is None
        assert stream.error["code"] == "unavailable", stream.error
    for stream in finished:
        assert (stream.finish_reason, stream.completion_tokens) == ("length", 200)
    wait_for(lambda: completion_route(served) == victim_address,
             "a request on the restarted decode instance", period=0.5)
    assert all(p in children(served.proc.pid) for p in others)  # nothing else restarted
    # the restarted instance serves /metrics on a new port; the gateway finds it again
    text = httpx.get(f"http://127.0.0.1:{served.http_port}/metrics", timeout=30).text
    up = {s.labels["instance"]: s.value for family in text_string_to_metric_families(text)
          if family.name == "tandem:instance_up" for s in family.samples}
    assert up == {address: 1.0 for address in served.prefill + served.decode}, up
    served.proc.send_signal(signal.SIGTERM)
    stop_and_check_exit(served, [])
