"""Cancellation in every phase, every way, through a real `tandem serve` (gateway, prefill and
decode processes): a client that disconnects (HTTP stream closed), a public `Abort`, or a gRPC
deadline that expires, while the request is queued at the decode tier, prefilling, transferring
its KV, or decoding. Within 5 seconds every tier holds no KV block and runs no request.

The tiers are slowed by tests/e2e/slow_tiers/sitecustomize.py (a prefill step takes 1 s, a KV
message 1 s more, a decode step 0.05 s) so that each phase lasts long enough to be observed with
GetInstanceInfo and cancelled there. A deadline cannot wait for an observation: it is set to
expire in the middle of its phase, and the phase the request was in just before it expired is
checked from a timeline polled meanwhile."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import grpc
import pytest

from gateway.grpc_api import tier_timeout
from protos.tandem.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from tests.e2e.conftest import Served, start_serve, stop_serve, wait_for

SLOW = {"prefill_step": 1.0, "kv_send": 1.0, "decode_step": 0.05}
RELEASE_S = 5.0  # the bound: cancelled to nothing held
HANG_GUARD_S = 60.0
MAX_TOKENS = 300  # 15 s of decoding at 0.05 s a step: never ends on its own within a case
# A deadline expires this long after the call starts: mid-phase (prefill 0-1 s, transfer 1-2 s,
# decode from 2 s; a queued request waits behind a blocker for as long as the test likes)
DEADLINE_S = {"prefilling": 0.5, "transferring": 1.5, "decoding": 3.0, "queued": 1.0}


@pytest.fixture(scope="module")
def served(tiny_models):
    env = {"PYTHONPATH": str(Path(__file__).parent / "slow_tiers"),
           "TANDEM_TEST_SLOW": ",".join(f"{k}={v}" for k, v in SLOW.items())}
    # one sequence at a time on each tier: a second request queues at the decode tier
    served = start_serve(tiny_models["llama"], "--num-kv-blocks", "256", "--max-num-seqs", "1",
                         env=env)
    yield served
    assert stop_serve(served) == 0, "".join(served.output[-40:])


def phase_of(served: Served) -> str:
    """Where the system's (one) request is, from the instances' own counters."""
    prefill, decode = served.instance_infos()
    if decode.num_waiting_requests:
        return "queued"
    if prefill.num_running_requests:
        return "prefilling"
    if prefill.num_free_kv_blocks < prefill.num_kv_blocks:
        return "transferring"  # computed; its blocks are held until the push ends
    if decode.num_running_requests:
        return "decoding"
    return "idle"


def held(served: Served) -> dict[str, tuple[int, int, int]]:
    """instance id -> (blocks held, requests running, requests waiting)."""
    return {i.instance_id: (i.num_kv_blocks - i.num_free_kv_blocks, i.num_running_requests,
                            i.num_waiting_requests) for i in served.instance_infos()}


class Timeline(threading.Thread):
    """Polls phase_of every 20 ms until stopped; `at(t)` is the phase last seen before t."""

    def __init__(self, served: Served):
        super().__init__(daemon=True)
        self.served, self.samples, self.stopped = served, [], threading.Event()

    def run(self):
        while not self.stopped.is_set():
            self.samples.append((time.monotonic(), phase_of(self.served)))
            time.sleep(0.02)

    def at(self, t: float) -> str:
        return [phase for when, phase in self.samples if when <= t][-1]


class Request:
    """One request through the public API, consumed on a thread: `outcome` is "done" (it ended
    by itself), "closed" (we closed its HTTP connection) or "error CODE" (gRPC)."""

    def __init__(self, served: Served, way: str, phase: str, prompt: str):
        self.served, self.way, self.phase, self.prompt = served, way, phase, prompt
        self.request_id = f"cancel-{way}-{time.monotonic_ns()}"
        self.outcome: str | None = None
        self.started = self.ended = None
        self._socket: socket.socket | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "Request":
        self.started = time.monotonic()
        self._thread.start()
        return self

    def _run(self):
        try:
            if self.way == "disconnect":
                self._run_http()
            else:
                self._run_grpc()
        finally:
            self.ended = time.monotonic()

    def _run_http(self):
        """A streaming completion over a plain socket, read until the server ends it or we
        close the socket (an HTTP client library would hide when its connection closes)."""
        body = json.dumps({"model": self.served.model_dir.name, "prompt": self.prompt,
                           "stream": True, "max_tokens": MAX_TOKENS, "ignore_eos": True,
                           "temperature": 0.0}).encode()
        sock = socket.create_connection(("127.0.0.1", self.served.http_port), HANG_GUARD_S)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: tandem\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(body), body))
        self._socket = sock
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
            self.outcome = "done" if b"data: [DONE]" in received else "closed"
        except OSError:
            self.outcome = "closed"

    def _run_grpc(self):
        stub = generation_pb2_grpc.GenerationStub(
            grpc.insecure_channel(f"127.0.0.1:{self.served.grpc_port}"))
        request = generation_pb2.GenerateRequest(
            request_id=self.request_id, text=self.prompt, sampling=common_pb2.SamplingParams(
                max_tokens=MAX_TOKENS, ignore_eos=True, temperature=0.0))
        timeout = DEADLINE_S[self.phase] if self.way == "deadline" else HANG_GUARD_S
        try:
            for _ in stub.Generate(request, timeout=timeout):
                pass
            self.outcome = "done"
        except grpc.RpcError as exc:
            self.outcome = f"error {exc.code().name}"

    def cancel(self) -> None:
        if self.way == "disconnect":
            wait_for(lambda: self._socket is not None, "the HTTP request to be sent")
            self._socket.shutdown(socket.SHUT_RDWR)  # the client goes away
            self._socket.close()
        elif self.way == "abort":
            stub = generation_pb2_grpc.GenerationStub(
                grpc.insecure_channel(f"127.0.0.1:{self.served.grpc_port}"))
            reply = stub.Abort(generation_pb2.AbortRequest(request_id=self.request_id),
                               timeout=HANG_GUARD_S)
            assert reply.aborted

    def join(self) -> None:
        self._thread.join(HANG_GUARD_S)
        assert not self._thread.is_alive(), "the request did not end"


def start_in_phase(served: Served, way: str, phase: str, prompt: str) -> Request:
    return Request(served, way, phase, prompt).start()


@pytest.mark.parametrize("way", ["disconnect", "abort", "deadline"])
@pytest.mark.parametrize("phase", ["prefilling", "transferring", "decoding", "queued"])
def test_a_cancelled_request_leaves_nothing_held_within_5_s(served, phase, way):
    wait_for(lambda: phase_of(served) == "idle", "an idle system before the case")
    blocker = None
    if phase == "queued":  # the decode tier's one sequence slot is taken
        blocker = start_in_phase(served, "abort", "decoding", f"the blocker of {way}")
        wait_for(lambda: phase_of(served) == "decoding", "the blocker to decode")
    timeline = Timeline(served)
    timeline.start()
    request = start_in_phase(served, way, phase, f"a request cancelled while {phase} by {way}")
    try:
        if way == "deadline":
            request.join()
            # the tiers get the caller's deadline less the gateway's margin
            cancelled_at = request.started + tier_timeout(DEADLINE_S[phase])
            assert request.outcome == "error DEADLINE_EXCEEDED", request.outcome
            assert timeline.at(cancelled_at - 0.1) == phase, timeline.samples
        else:
            wait_for(lambda: phase_of(served) == phase, f"the request to be {phase}")
            cancelled_at = time.monotonic()
            request.cancel()
            request.join()
            assert request.outcome == ("closed" if way == "disconnect" else "error CANCELLED")
        if blocker is not None:  # the queued request is gone; the blocker still decodes
            wait_for(lambda: phase_of(served) == "decoding", "the queue to empty")
            assert time.monotonic() - cancelled_at < RELEASE_S
            blocker.cancel()
            blocker.join()
            cancelled_at = time.monotonic()
        wait_for(lambda: not any(any(v) for v in held(served).values()),
                 "every tier to hold nothing", timeout=RELEASE_S + 5)
        released_s = time.monotonic() - cancelled_at
        assert released_s < RELEASE_S, (released_s, held(served))
    finally:
        timeline.stopped.set()
        timeline.join()
