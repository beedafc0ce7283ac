"""The whole system as real processes: `tandem serve` (gateway, prefill, decode)."""

from __future__ import annotations

import ast
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from protos.tandem.v1 import instance_pb2, instance_pb2_grpc

# `tandem serve`'s start-up line: the ports it bound (the real ones, also for --port 0) and the
# tier addresses.
BANNER = re.compile(r"http://\S+:(?P<http_port>\d+)/v1, gRPC \S+:(?P<grpc_port>\d+); "
                    r"prefill (?P<prefill>\[.*?\]), decode (?P<decode>\[.*?\])")
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Served:
    proc: subprocess.Popen
    model_dir: Path
    http_port: int
    grpc_port: int
    prefill: list[str]
    decode: list[str]
    output: list[str]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/v1"

    def instance_infos(self) -> list[instance_pb2.InstanceInfo]:
        return [instance_info(address) for address in self.prefill + self.decode]

    @staticmethod
    def pid_of(address: str) -> int:
        """The process id of the tier instance at `address` (instance ids are role-pid-random)."""
        return int(instance_info(address).instance_id.split("-")[1])

    def assert_all_blocks_free(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            held = {i.instance_id: i.num_kv_blocks - i.num_free_kv_blocks for i in self.instance_infos()}
            if not any(held.values()):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"KV blocks still held: {held}")
            time.sleep(0.05)


def instance_info(address: str) -> instance_pb2.InstanceInfo:
    with grpc.insecure_channel(address) as channel:
        stub = instance_pb2_grpc.InstanceStub(channel)
        return stub.GetInstanceInfo(instance_pb2.GetInstanceInfoRequest(), timeout=10)


def wait_for(predicate, what: str, timeout: float = 60.0, period: float = 0.05):
    """predicate()'s first truthy value, polled until `timeout`; AssertionError past it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(period)
    raise AssertionError(f"timed out waiting for {what}")


def start_serve(model_dir: Path | None, *extra: str, env: dict | None = None,
                ports: tuple[int, int] | None = None) -> Served:
    """`tandem serve` on (HTTP, gRPC) `ports` (default: two free ones), once its banner is out;
    Served holds the ports the banner names."""
    http_port, grpc_port = ports or (free_port(), free_port())
    cmd = [sys.executable, "-m", "engine.cli", "serve", "--port", str(http_port),
           "--grpc-port", str(grpc_port), *extra]
    if model_dir is not None:
        cmd += ["--model", str(model_dir)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, **(env or {})})
    output: list[str] = []
    deadline = time.monotonic() + 300
    for line in proc.stdout:
        output.append(line)
        match = BANNER.search(line)
        if match:
            threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True).start()
            return Served(proc, model_dir, int(match["http_port"]), int(match["grpc_port"]),
                          ast.literal_eval(match["prefill"]), ast.literal_eval(match["decode"]),
                          output)
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise RuntimeError("tandem serve did not start:\n" + "".join(output[-60:]))


def stop_serve(served: Served) -> int:
    served.proc.send_signal(signal.SIGTERM)
    try:
        return served.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        served.proc.kill()
        raise


@pytest.fixture(scope="module")
def serve_model():
    """serve_model(model_dir, *flags) -> Served; stopped (and checked) at module end."""
    started: list[Served] = []

    def start(model_dir: Path | None, *extra: str) -> Served:
        started.append(start_serve(model_dir, "--num-kv-blocks", "512", *extra))
        return started[-1]

    yield start
    for served in started:
        assert stop_serve(served) == 0, "".join(served.output[-40:])


@pytest.fixture
def client(served):
    """The official openai client on the module's `served`; every block free afterwards."""
    import openai

    yield openai.OpenAI(base_url=served.base_url, api_key="unused", max_retries=0, timeout=60)
    served.assert_all_blocks_free()


@pytest.fixture
def stub(served):
    """A tandem.v1.Generation stub on the module's `served`; every block free afterwards."""
    from protos.tandem.v1 import generation_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{served.grpc_port}") as channel:
        yield generation_pb2_grpc.GenerationStub(channel)
    served.assert_all_blocks_free()
