"""`tandem serve`: starts prefill, decode and gateway as separate processes on this machine,
prints where it listens, restarts a process that dies unexpectedly, and stops them all on Ctrl-C
or SIGTERM: the gateway first (it drains its requests for up to --shutdown-grace-s), then the
tiers, so that no tier cuts a request the gateway is still draining."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from gateway.flags import API_KEY_ENV

logger = logging.getLogger("tandem.serve")

STARTUP_TIMEOUT_S = 600.0
# After its grace period, how long a stopping process gets to abort its requests and exit.
STOP_MARGIN_S = 15.0
# At most MAX_RESTARTS restarts (all processes together) within RESTART_WINDOW_S; one more and
# `tandem serve` gives up: something is wrong that restarting will not fix.
MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0
SUPERVISE_PERIOD_S = 0.5


@dataclass
class _Child:
    """One supervised process: a name for the logs, its command line and environment (None:
    ours), and the process running it now."""

    name: str
    cmd: list[str]
    env: dict[str, str] | None = None
    proc: subprocess.Popen | None = None

    def start(self) -> None:
        """Runs cmd in its own process group: a terminal's Ctrl-C (SIGINT to the foreground
        group) reaches only `tandem serve`, which then stops the children in order."""
        self.proc = subprocess.Popen(self.cmd, env=self.env, process_group=0)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def pin_port(self, port: int, flag: str = "--port") -> None:
        """Restarts bind `port` (the one it first bound) for `flag`, not port 0: the gateway, the
        other tiers and the clients know the process by its address."""
        self.cmd[self.cmd.index(flag) + 1] = str(port)


class _RestartBudget:
    """Allows MAX_RESTARTS restarts per sliding RESTART_WINDOW_S."""

    def __init__(self) -> None:
        self._times: deque[float] = deque()

    def take(self) -> bool:
        """Counts a restart now; False (not counted) when the budget is spent."""
        now = time.monotonic()
        while self._times and now - self._times[0] > RESTART_WINDOW_S:
            self._times.popleft()
        if len(self._times) >= MAX_RESTARTS:
            return False
        self._times.append(now)
        return True


def _tier_command(role: str, args: argparse.Namespace, model_dir: Path, ready: Path,
                  threads: int) -> list[str]:
    cmd = [sys.executable, "-m", "engine.cli", role, "--model", str(model_dir),
           "--host", "127.0.0.1", "--port", "0", "--ready-file", str(ready),
           "--served-model-name", args.served_model_name or model_dir.name,
           "--dtype", args.dtype, "--device", args.device, "--block-size", str(args.block_size),
           "--kv-cache-memory", args.kv_cache_memory, "--max-num-seqs", str(args.max_num_seqs),
           "--torch-threads", str(args.torch_threads or threads),
           "--load-format", args.load_format, "--attention-backend", args.attention_backend,
           "--metrics-port", "0",  # the gateway finds it through GetInstanceInfo
           "--shutdown-grace-s", str(args.shutdown_grace_s)]
    if args.num_kv_blocks:
        cmd += ["--num-kv-blocks", str(args.num_kv_blocks)]
    if args.enforce_eager:
        cmd.append("--enforce-eager")
    if args.tokenizer:
        cmd += ["--tokenizer", str(args.tokenizer.resolve())]
    if args.max_model_len:
        cmd += ["--max-model-len", str(args.max_model_len)]
    if role == "prefill":
        cmd += ["--max-prefill-tokens", str(args.max_prefill_tokens)]
    if role == "decode" and args.speculative_method:
        cmd += ["--speculative-method", args.speculative_method,
                "--prompt-lookup-min", str(args.prompt_lookup_min),
                "--prompt-lookup-max", str(args.prompt_lookup_max),
                "--speculative-saturation-tokens", str(args.speculative_saturation_tokens)]
        if args.num_speculative_tokens is not None:
            cmd += ["--num-speculative-tokens", str(args.num_speculative_tokens)]
        if args.draft_model is not None:
            cmd += ["--draft-model", str(args.draft_model.resolve())]
        if not args.speculative_governor:
            cmd.append("--no-speculative-governor")
    return cmd


def parse_gpu_list(value: str | None, flag: str) -> list[str]:
    """--prefill-gpus / --decode-gpus: comma-separated GPU indices; [] when not given. Raises
    ValueError for anything else."""
    if value is None:
        return []
    gpus = [g.strip() for g in value.split(",")]
    if not gpus or not all(g.isdigit() for g in gpus):
        raise ValueError(f"{flag} wants comma-separated GPU indices such as 0 or 1,2; got {value!r}")
    return gpus


def _tier_env(gpus: list[str], index: int) -> dict[str, str] | None:
    """The environment of a role's `index`-th worker: CUDA_VISIBLE_DEVICES set to its GPU, the
    (index mod n)-th of `gpus`; None (inherit ours) when no GPUs were given."""
    if not gpus:
        return None
    return {**os.environ, "CUDA_VISIBLE_DEVICES": gpus[index % len(gpus)]}


def _gateway_command(args: argparse.Namespace, addresses: dict[str, list[str]],
                     ready: Path) -> list[str]:
    cmd = [sys.executable, "-m", "engine.cli", "gateway",
           "--prefill", ",".join(addresses["prefill"]), "--decode", ",".join(addresses["decode"]),
           "--host", args.host, "--port", str(args.port), "--grpc-port", str(args.grpc_port),
           "--ready-file", str(ready),
           "--allowed-origins", ",".join(args.allowed_origins),
           "--max-request-bytes", str(args.max_request_bytes),
           "--shutdown-grace-s", str(args.shutdown_grace_s),
           "--request-timeout", str(args.request_timeout)]
    if args.served_model_name:
        cmd += ["--served-model-name", args.served_model_name]
    return cmd


def _gateway_env(args: argparse.Namespace) -> dict[str, str] | None:
    """The gateway's environment: --api-key travels as $TANDEM_API_KEY, never on a command line
    (which `ps` shows to every user). None: inherit ours (and any $TANDEM_API_KEY in it)."""
    return {**os.environ, API_KEY_ENV: args.api_key} if args.api_key else None


def _wait_ready(procs: list[subprocess.Popen], files: list[Path]) -> list[dict[str, int]]:
    """The ready files' contents ({"port": ...}: the ports bound), once every one is written;
    RuntimeError when one of `procs` exits first or past STARTUP_TIMEOUT_S."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    last_log = time.monotonic()
    while True:
        contents = [json.loads(f.read_text()) if f.exists() else None for f in files]
        if all(c is not None for c in contents):
            return contents
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{' '.join(proc.args[3:5])} exited with code {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes not ready after {STARTUP_TIMEOUT_S:.0f} s")
        if time.monotonic() - last_log > 5:
            logger.info("waiting for %d of %d processes to start serving",
                        sum(c is None for c in contents), len(contents))
            last_log = time.monotonic()
        time.sleep(0.1)


def _wait_http(url: str, procs: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError("a Tandem process exited during start-up")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"gateway not healthy at {url} after {STARTUP_TIMEOUT_S:.0f} s")


def _supervise(children: list[_Child]) -> int:
    """Restarts every child that exits, with its command line, until the restart budget is
    spent (returns 1). Returns only then: Ctrl-C / SIGTERM interrupt it."""
    budget = _RestartBudget()
    while True:
        for child in children:
            if child.alive():
                continue
            code = child.proc.returncode
            if not budget.take():
                logger.error("%s exited with code %s; %d restarts within %.0f s already: giving "
                             "up and stopping the rest", child.name, code, MAX_RESTARTS,
                             RESTART_WINDOW_S)
                return 1
            logger.warning("%s (pid %d) exited unexpectedly with code %s; restarting it",
                           child.name, child.proc.pid, code)
            child.start()
            logger.info("%s restarted as pid %d", child.name, child.proc.pid)
        time.sleep(SUPERVISE_PERIOD_S)


def _terminate(children: list[_Child], timeout_s: float) -> None:
    """SIGTERM to each live child, then waits up to timeout_s for them all; SIGKILL to the
    ones still running."""
    live = [c for c in children if c.alive()]
    for child in live:
        child.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for child in live:
        try:
            child.proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            logger.error("%s (pid %d) did not stop within %.0f s: killing it", child.name,
                         child.proc.pid, timeout_s)
            child.proc.kill()
            child.proc.wait()


def _force_on_signal(children: list[_Child]) -> None:
    """From now on, SIGINT / SIGTERM / SIGHUP to us is passed on to every live child as
    SIGTERM: a child already draining then stops at once (its second signal), so a second
    Ctrl-C is fast."""
    def forward(signum: int, frame: object) -> None:
        logger.warning("%s again: stopping without draining", signal.Signals(signum).name)
        for child in children:
            if child.alive():
                child.proc.send_signal(signal.SIGTERM)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)


def _interrupt_once(children: list[_Child]):
    """The handler of the first SIGINT / SIGTERM / SIGHUP: raises KeyboardInterrupt (the
    shutdown starts), and at once makes any further signal forward to the children
    (`_force_on_signal`) instead of interrupting the shutdown itself, which would leave a
    traceback, a non-zero exit and perhaps children not stopped."""
    def interrupt(signum: int, frame: object) -> None:
        _force_on_signal(children)
        raise KeyboardInterrupt

    return interrupt


def _stop(children: list[_Child], grace_s: float) -> None:
    """The gateway first (it drains for up to grace_s), then the tiers, whose requests have
    then all ended."""
    _force_on_signal(children)
    gateways = [c for c in children if c.name == "gateway"]
    tiers = [c for c in children if c.name != "gateway"]
    if any(c.alive() for c in gateways):
        logger.info("stopping the gateway (it drains for up to %.0f s)", grace_s)
        _terminate(gateways, grace_s + STOP_MARGIN_S)
    logger.info("stopping %d tier processes", sum(c.alive() for c in tiers))
    _terminate(tiers, grace_s + STOP_MARGIN_S)


def _start_gateway(args: argparse.Namespace, addresses: dict[str, list[str]], ready: Path,
                   children: list[_Child]) -> tuple[int, int]:
    """Starts the gateway (appended to `children`), waits until it is healthy and returns the
    (HTTP, gRPC) ports it bound: --port / --grpc-port, or free ones for 0, which its restarts
    then keep."""
    gateway = _Child("gateway", _gateway_command(args, addresses, ready), _gateway_env(args))
    children.append(gateway)
    gateway.start()
    bound, = _wait_ready([c.proc for c in children], [ready])
    gateway.pin_port(bound["port"])
    gateway.pin_port(bound["grpc_port"], "--grpc-port")
    _wait_http(f"http://127.0.0.1:{bound['port']}/health", [c.proc for c in children])
    return bound["port"], bound["grpc_port"]


def launch(args: argparse.Namespace, model_dir: Path) -> int:
    """Runs `tandem serve` (parsed flags `args`) on the checkpoint in `model_dir` until Ctrl-C /
    SIGTERM (returns 0), restarting a process that exits meanwhile; returns 1 when restarts
    exceed MAX_RESTARTS within RESTART_WINDOW_S, raises RuntimeError when one exits during
    start-up."""
    num_tiers = args.prefill_workers + args.decode_workers
    threads = max(1, (os.cpu_count() or 1) // num_tiers)
    children: list[_Child] = []
    # the children do not see a terminal's SIGHUP
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt_once(children))
    with tempfile.TemporaryDirectory(prefix="tandem-serve-") as tmp:
        try:
            roles = ["prefill"] * args.prefill_workers + ["decode"] * args.decode_workers
            files = [Path(tmp) / f"{role}-{i}.json" for i, role in enumerate(roles)]
            gpus = {"prefill": parse_gpu_list(args.prefill_gpus, "--prefill-gpus"),
                    "decode": parse_gpu_list(args.decode_gpus, "--decode-gpus")}
            for i, (role, ready) in enumerate(zip(roles, files)):
                env = _tier_env(gpus[role], roles[:i].count(role))
                children.append(_Child(f"{role}-{i}",
                                       _tier_command(role, args, model_dir, ready, threads), env))
                children[-1].start()
            ports = [ready["port"] for ready in _wait_ready([c.proc for c in children], files)]
            for child, port in zip(children, ports):
                child.pin_port(port)
            addresses = {role: [f"127.0.0.1:{p}" for r, p in zip(roles, ports) if r == role]
                         for role in ("prefill", "decode")}
            http_port, grpc_port = _start_gateway(args, addresses, Path(tmp) / "gateway.json",
                                                  children)
            print(f"Tandem serving {model_dir.name}: OpenAI API http://{args.host}:{http_port}/v1, "
                  f"gRPC {args.host}:{grpc_port}; prefill {addresses['prefill']}, "
                  f"decode {addresses['decode']}. Ctrl-C stops.", flush=True)
            return _supervise(children)
        except KeyboardInterrupt:
            logger.info("stopping: %d processes", sum(c.alive() for c in children))
            return 0
        finally:
            _stop(children, args.shutdown_grace_s)
