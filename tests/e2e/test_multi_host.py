"""The tiers on different "hosts", as real processes started the README's way (issue 9 item 4).

1. Distinct loopback addresses (127.0.0.2 decode, 127.0.0.3 prefill, 127.0.0.4 gateway), each
   bound explicitly: every address the gateway is given and decode advertises is the one the
   tier bound, and a request completes.
2. Two network namespaces joined by a veth pair: decode in one with the default --host 0.0.0.0,
   prefill in the other, where 127.0.0.1 is *not* the decode. Decode must advertise its own
   routable address, or prefill pushes the KV to itself and the request fails. Skipped where
   network namespaces are unavailable (needs root / CAP_NET_ADMIN and iproute2).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest

from protos.tandem.v1 import instance_pb2, instance_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 180.0
TIER_FLAGS = ("--port", "0", "--num-kv-blocks", "64", "--torch-threads", "1")

# Runs inside the decode's namespace (the test process cannot reach it): asks decode for its KV
# endpoint, then generates 4 tokens through the given prefill address; prints one JSON line.
NETNS_CLIENT = """
import json, sys
import grpc
from protos.tandem.v1 import (common_pb2, decode_pb2, decode_pb2_grpc, instance_pb2,
                               instance_pb2_grpc)

decode_address, prefill_address = sys.argv[1:3]
with grpc.insecure_channel(decode_address) as channel:
    info = instance_pb2_grpc.InstanceStub(channel).GetInstanceInfo(
        instance_pb2.GetInstanceInfoRequest(), timeout=30)
    request = decode_pb2.DecodeRequest(
        request_id="netns", prompt_token_ids=[30, 31, 32, 33], prefill_addresses=[prefill_address],
        sampling=common_pb2.SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    tokens, error = [], None
    try:
        for response in decode_pb2_grpc.DecodeStub(channel).Generate(request, timeout=60):
            tokens += response.token_ids
    except grpc.RpcError as exc:
        error = f"{exc.code().name}: {exc.details()}"
print(json.dumps({"kv_transfer_address": info.kv_transfer_address, "tokens": tokens,
                  "error": error}))
"""


@dataclass
class Process:
    popen: subprocess.Popen
    log: Path

    def tail(self, lines: int = 40) -> str:
        return "".join(self.log.read_text(errors="replace").splitlines(True)[-lines:])

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            raise AssertionError(f"{self.popen.args} exited with code {self.popen.returncode}:\n"
                                 f"{self.tail()}")


@pytest.fixture
def spawn(tmp_path):
    """spawn(name, *argv) -> Process, output in tmp_path/name.log; every process is SIGTERMed
    (killed after 30 s) at teardown."""
    started: list[Process] = []

    def start(name: str, *argv: str) -> Process:
        log = tmp_path / f"{name}.log"
        with log.open("w") as out:
            popen = subprocess.Popen(list(argv), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                     env={**os.environ, "TANDEM_LOG_LEVEL": "INFO"})
        started.append(Process(popen, log))
        return started[-1]

    yield start
    for process in started:
        if process.popen.poll() is None:
            process.popen.send_signal(signal.SIGTERM)
    for process in started:
        try:
            process.popen.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.popen.kill()
            process.popen.wait()


def tier_argv(role: str, model_dir: Path, ready: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "engine.cli", role, "--model", str(model_dir),
            "--ready-file", str(ready), *TIER_FLAGS, *flags]


def wait_port(process: Process, ready: Path) -> int:
    """The port a tier wrote to its --ready-file; fails if it exits or is not ready in time."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not ready.exists():
        process.check_alive()
        if time.monotonic() > deadline:
            raise AssertionError(f"not ready after {STARTUP_TIMEOUT_S:.0f} s:\n{process.tail()}")
        time.sleep(0.05)
    return json.loads(ready.read_text())["port"]


def wait_healthy(process: Process, url: str) -> None:
    """Returns once GET url answers 200; fails if the process exits or it takes too long."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        process.check_alive()
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} not healthy after {STARTUP_TIMEOUT_S:.0f} s:\n"
                                 f"{process.tail()}")
        time.sleep(0.1)


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def kv_transfer_address(address: str) -> str:
    with grpc.insecure_channel(address) as channel:
        info = instance_pb2_grpc.InstanceStub(channel).GetInstanceInfo(
            instance_pb2.GetInstanceInfoRequest(), timeout=30)
    return info.kv_transfer_address


@pytest.mark.timeout(300)
def test_tiers_on_distinct_loopback_addresses(tiny_models, spawn, tmp_path):
    model_dir = tiny_models["llama"]
    decode = spawn("decode", *tier_argv("decode", model_dir, tmp_path / "decode.json",
                                        "--host", "127.0.0.2"))
    prefill = spawn("prefill", *tier_argv("prefill", model_dir, tmp_path / "prefill.json",
                                          "--host", "127.0.0.3"))
    decode_address = f"127.0.0.2:{wait_port(decode, tmp_path / 'decode.json')}"
    prefill_address = f"127.0.0.3:{wait_port(prefill, tmp_path / 'prefill.json')}"
    kv_address = kv_transfer_address(decode_address)
    assert kv_address.rpartition(":")[0] == "127.0.0.2"
    assert f"KV transfer on {kv_address}" in decode.tail(200)

    http_port = free_port("127.0.0.4")
    gateway = spawn("gateway", sys.executable, "-m", "engine.cli", "gateway",
                    "--prefill", prefill_address, "--decode", decode_address,
                    "--host", "127.0.0.4", "--port", str(http_port),
                    "--grpc-port", str(free_port("127.0.0.4")), "--startup-timeout", "120")
    base = f"http://127.0.0.4:{http_port}"
    wait_healthy(gateway, f"{base}/health")
    response = httpx.post(f"{base}/v1/completions", timeout=120, json={
        "model": model_dir.name, "prompt": [30, 31, 32, 33], "max_tokens": 5, "temperature": 0,
        "ignore_eos": True})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 5


@dataclass
class TwoHosts:
    """Network namespaces `decode_ns` and `prefill_ns`, joined by a veth pair; each has loopback
    up, its address on the pair, and a default route via the other."""

    decode_ns: str
    prefill_ns: str
    decode_ip: str = "10.200.0.1"
    prefill_ip: str = "10.200.0.2"

    def exec_argv(self, namespace: str, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", namespace, *argv]


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)


def _ip_ok(*args: str) -> None:
    result = _ip(*args)
    assert result.returncode == 0, f"ip {' '.join(args)}: {result.stderr.strip()}"


@pytest.fixture
def two_hosts():
    """TwoHosts with unique names, deleted after the test (their veth ends go with them); skips
    where network namespaces cannot be created."""
    if not sys.platform.startswith("linux") or shutil.which("ip") is None:
        pytest.skip("network namespaces need Linux and iproute2's `ip`")
    tag = f"{os.getpid() % 100000}-{secrets.token_hex(3)}"
    hosts = TwoHosts(f"tandem-d-{tag}", f"tandem-p-{tag}")
    created: list[str] = []
    try:
        for namespace in (hosts.decode_ns, hosts.prefill_ns):
            result = _ip("netns", "add", namespace)
            if result.returncode != 0:
                pytest.skip(f"cannot create a network namespace (`ip netns add`: "
                            f"{result.stderr.strip()}); needs root or CAP_NET_ADMIN")
            created.append(namespace)
        d_if, p_if = f"td{tag[-6:]}d", f"td{tag[-6:]}p"
        _ip_ok("link", "add", d_if, "netns", hosts.decode_ns, "type", "veth",
               "peer", "name", p_if, "netns", hosts.prefill_ns)
        for namespace, interface, own, other in ((hosts.decode_ns, d_if, hosts.decode_ip,
                                                  hosts.prefill_ip),
                                                 (hosts.prefill_ns, p_if, hosts.prefill_ip,
                                                  hosts.decode_ip)):
            _ip_ok("-n", namespace, "link", "set", "lo", "up")
            _ip_ok("-n", namespace, "addr", "add", f"{own}/30", "dev", interface)
            _ip_ok("-n", namespace, "link", "set", interface, "up")
            _ip_ok("-n", namespace, "route", "add", "default", "via", other)
        yield hosts
    finally:
        for namespace in created:
            _ip("netns", "del", namespace)


@pytest.mark.timeout(300)
def test_prefill_on_another_host_pushes_kv_to_the_advertised_address(tiny_models, two_hosts,
                                                                      spawn, tmp_path):
    """Fails without the fix: decode advertised 127.0.0.1, so prefill's KV push was refused."""
    model_dir = tiny_models["llama"]
    decode = spawn("decode", *two_hosts.exec_argv(two_hosts.decode_ns, *tier_argv(
        "decode", model_dir, tmp_path / "decode.json", "--kv-transfer-timeout", "30")))
    prefill = spawn("prefill", *two_hosts.exec_argv(two_hosts.prefill_ns, *tier_argv(
        "prefill", model_dir, tmp_path / "prefill.json")))
    decode_port = wait_port(decode, tmp_path / "decode.json")
    prefill_port = wait_port(prefill, tmp_path / "prefill.json")

    client = subprocess.run(
        two_hosts.exec_argv(two_hosts.decode_ns, sys.executable, "-c", NETNS_CLIENT,
                            f"127.0.0.1:{decode_port}", f"{two_hosts.prefill_ip}:{prefill_port}"),
        cwd=ROOT, capture_output=True, text=True, timeout=150)
    assert client.returncode == 0, client.stderr
    result = json.loads(client.stdout.strip().splitlines()[-1])
    logs = f"decode:\n{decode.tail()}\nprefill:\n{prefill.tail()}"
    assert result["error"] is None, f"{result['error']}\n{logs}"
    assert result["kv_transfer_address"].rpartition(":")[0] == two_hosts.decode_ip, logs
    assert len(result["tokens"]) == 4
