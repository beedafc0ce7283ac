"""`tandem serve`: starts prefill, decode and gateway as separate processes on this machine,
prints where it listens, and stops them all on Ctrl-C or SIGTERM."""

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
from pathlib import Path

from gateway.flags import API_KEY_ENV

logger = logging.getLogger("tandem.serve")

STARTUP_TIMEOUT_S = 600.0


def _tier_command(role: str, args: argparse.Namespace, model_dir: Path, ready: Path,
                  threads: int) -> list[str]:
    cmd = [sys.executable, "-m", "engine.cli", role, "--model", str(model_dir),
           "--host", "127.0.0.1", "--port", "0", "--ready-file", str(ready),
           "--served-model-name", args.served_model_name or model_dir.name,
           "--dtype", args.dtype, "--device", args.device, "--block-size", str(args.block_size),
           "--kv-cache-memory", args.kv_cache_memory, "--max-num-seqs", str(args.max_num_seqs),
           "--torch-threads", str(args.torch_threads or threads),
           "--load-format", args.load_format, "--attention-backend", args.attention_backend,
           "--metrics-port", "0"]  # the gateway finds it through GetInstanceInfo
    if args.num_kv_blocks:
        cmd += ["--num-kv-blocks", str(args.num_kv_blocks)]
    if args.enforce_eager:
        cmd.append("--enforce-eager")
    if args.max_model_len:
        cmd += ["--max-model-len", str(args.max_model_len)]
    if role == "prefill":
        cmd += ["--max-prefill-tokens", str(args.max_prefill_tokens)]
    return cmd


def _gateway_command(args: argparse.Namespace, addresses: dict[str, list[str]]) -> list[str]:
    cmd = [sys.executable, "-m", "engine.cli", "gateway",
           "--prefill", ",".join(addresses["prefill"]), "--decode", ",".join(addresses["decode"]),
           "--host", args.host, "--port", str(args.port), "--grpc-port", str(args.grpc_port),
           "--allowed-origins", ",".join(args.allowed_origins)]
    if args.served_model_name:
        cmd += ["--served-model-name", args.served_model_name]
    return cmd


def _gateway_env(args: argparse.Namespace) -> dict[str, str] | None:
    """The gateway's environment: --api-key travels as $TANDEM_API_KEY, never on a command line
    (which `ps` shows to every user). None: inherit ours (and any $TANDEM_API_KEY in it)."""
    return {**os.environ, API_KEY_ENV: args.api_key} if args.api_key else None


def _wait_ready(procs: list[subprocess.Popen], files: list[Path]) -> list[int]:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    last_log = time.monotonic()
    while True:
        ports = [json.loads(f.read_text())["port"] if f.exists() else None for f in files]
        if all(p is not None for p in ports):
            return ports
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{' '.join(proc.args[3:5])} exited with code {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"tiers not ready after {STARTUP_TIMEOUT_S:.0f} s")
        if time.monotonic() - last_log > 5:
            logger.info("waiting for %d of %d tier processes to load the model",
                        sum(p is None for p in ports), len(ports))
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


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 15
    for proc in procs:
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def launch(args: argparse.Namespace, model_dir: Path) -> int:
    """Runs `tandem serve` (parsed flags `args`) on the checkpoint in `model_dir` until Ctrl-C /
    SIGTERM (returns 0) or until one process exits (returns 1)."""
    num_tiers = args.prefill_workers + args.decode_workers
    threads = max(1, (os.cpu_count() or 1) // num_tiers)
    procs: list[subprocess.Popen] = []
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with tempfile.TemporaryDirectory(prefix="tandem-serve-") as tmp:
        try:
            roles = ["prefill"] * args.prefill_workers + ["decode"] * args.decode_workers
            files = [Path(tmp) / f"{role}-{i}.json" for i, role in enumerate(roles)]
            for role, ready in zip(roles, files):
                procs.append(subprocess.Popen(_tier_command(role, args, model_dir, ready, threads)))
            ports = _wait_ready(procs, files)
            addresses = {role: [f"127.0.0.1:{p}" for r, p in zip(roles, ports) if r == role]
                         for role in ("prefill", "decode")}
            procs.append(subprocess.Popen(_gateway_command(args, addresses),
                                          env=_gateway_env(args)))
            _wait_http(f"http://127.0.0.1:{args.port}/health", procs)
            print(f"Tandem serving {model_dir.name}: OpenAI API http://{args.host}:{args.port}/v1, "
                  f"gRPC {args.host}:{args.grpc_port}; prefill {addresses['prefill']}, "
                  f"decode {addresses['decode']}. Ctrl-C stops.", flush=True)
            while all(p.poll() is None for p in procs):
                time.sleep(0.5)
            failed = next(p for p in procs if p.poll() is not None)
            logger.error("%s exited with code %s; stopping the rest", failed.args[3], failed.returncode)
            return 1
        except KeyboardInterrupt:
            logger.info("stopping %d processes", len(procs))
            return 0
        finally:
            _stop(procs)
