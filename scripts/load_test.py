"""A bounded load test of a whole `tandem serve` on loopback: N concurrent streaming clients for
a fixed time, mixed prompt and output lengths, a fraction of the requests cancelled at a random
point (the client closes its connection). It checks what the reliability issue asks:

  - no lost request: every request either finishes (a finish_reason, then [DONE]), is cancelled
    by its client, or ends with an explicit error (an HTTP error status, or an SSE error event
    then [DONE]); a stream that just stops is lost;
  - no leaked KV block: after the load every instance reports all its blocks free;
  - flat memory: after the warm-up (the first --warmup-fraction of the run), the median resident
    memory of each process over the second half of the rest is within --memory-slack-mib of the
    median over the first half (RSS is sampled every second).

    python scripts/load_test.py                         # 32 clients, 60 s, the built-in model
    python scripts/load_test.py --model DIR --duration 20 --concurrency 16 --output-json out.json

Prints a table and writes JSON (requests, outcomes by kind, latency percentiles of finished
requests, peak and end memory per process). Exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from protos.tandem.v1 import instance_pb2, instance_pb2_grpc  # noqa: E402

BANNER = re.compile(r"OpenAI API http://[^:]+:(\d+)/v1.*prefill (\[.*?\]), decode (\[.*?\])")
WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hum "
         "about paged attention and prefix caches").split()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="checkpoint directory (default: built-in)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--cancel-fraction", type=float, default=0.2)
    p.add_argument("--max-prompt-words", type=int, default=300)
    p.add_argument("--max-tokens", type=int, nargs=2, default=(4, 96), metavar=("MIN", "MAX"))
    p.add_argument("--warmup-fraction", type=float, default=0.25)
    p.add_argument("--memory-slack-mib", type=float, default=64.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--serve-arg", action="append", default=[],
                   help="an extra flag for tandem serve (repeatable), e.g. "
                        "--serve-arg=--num-kv-blocks=256")
    p.add_argument("--output-json", type=Path, default=None)
    return p.parse_args(argv)


class Served:
    """`tandem serve` as a child process, with its addresses from the start-up banner."""

    def __init__(self, args: argparse.Namespace):
        cmd = [sys.executable, "-m", "engine.cli", "serve", "--port", str(free_port()),
               "--grpc-port", str(free_port()), *args.serve_arg]
        if args.model:
            cmd += ["--model", args.model]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.output: list[str] = []
        for line in self.proc.stdout:
            self.output.append(line)
            match = BANNER.search(line)
            if match:
                self.http_port = int(match.group(1))
                self.instances = json.loads(match.group(2).replace("'", '"')) + \
                    json.loads(match.group(3).replace("'", '"'))
                break
        else:
            raise RuntimeError("tandem serve did not start:\n" + "".join(self.output[-40:]))
        threading.Thread(target=lambda: self.output.extend(self.proc.stdout), daemon=True).start()
        models = httpx.get(f"http://127.0.0.1:{self.http_port}/v1/models").json()
        self.model = models["data"][0]["id"]

    def pids(self) -> dict[str, int]:
        """Process name (serve, gateway, prefill, decode) -> pid."""
        pids = {"serve": self.proc.pid}
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        for pid in map(int, children):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            role = next((r for r in ("gateway", "prefill", "decode")
                         if r.encode() in cmdline), f"child-{pid}")
            pids[role] = pid
        return pids

    def blocks_held(self) -> dict[str, int]:
        held = {}
        for address in self.instances:
            with grpc.insecure_channel(address) as channel:
                info = instance_pb2_grpc.InstanceStub(channel).GetInstanceInfo(
                    instance_pb2.GetInstanceInfoRequest(), timeout=10)
            held[info.instance_id] = info.num_kv_blocks - info.num_free_kv_blocks
        return held

    def stop(self) -> int:
        self.proc.terminate()
        return self.proc.wait(timeout=60)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    try:
        pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except (OSError, ValueError):
        return 0.0
    return pages * 4096 / 2**20


async def one_request(client: httpx.AsyncClient, served: Served, rng: random.Random,
                      cancel_fraction: float, args: argparse.Namespace) -> tuple[str, float]:
    """(outcome, seconds): outcome is finished:<reason>, cancelled, error:<kind> or lost:<why>."""
    prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, args.max_prompt_words)))
    body = {"model": served.model, "prompt": prompt, "stream": True, "temperature": 0.8,
            "max_tokens": rng.randint(*args.max_tokens), "ignore_eos": True}
    cancel_after = rng.uniform(0.0, 2.0) if rng.random() < cancel_fraction else None
    started = time.monotonic()
    try:
        async with asyncio.timeout(cancel_after):
            async with client.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    await response.aread()
                    return f"error:http_{response.status_code}", time.monotonic() - started
                finish, error, done = None, None, False
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        done = True
                        continue
                    chunk = json.loads(data)
                    if "error" in chunk:
                        error = chunk["error"].get("code") or "error_event"
                    for choice in chunk.get("choices", ()):
                        finish = choice.get("finish_reason") or finish
    except TimeoutError:
        return "cancelled", time.monotonic() - started
    except httpx.HTTPError as e:
        return f"lost:{type(e).__name__}", time.monotonic() - started
    elapsed = time.monotonic() - started
    if error is not None and done:
        return f"error:{error}", elapsed
    if finish is not None and done:
        return f"finished:{finish}", elapsed
    return "lost:stream_ended_early", elapsed


async def run_load(served: Served, args: argparse.Namespace) -> dict:
    outcomes: Counter[str] = Counter()
    latencies: list[float] = []
    memory: dict[str, list[float]] = {name: [] for name in served.pids()}
    stop_at = time.monotonic() + args.duration
    limits = httpx.Limits(max_connections=args.concurrency * 2)

    async def client_loop(seed: int) -> None:
        client_rng = random.Random(seed)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{served.http_port}",
                                     timeout=120, limits=limits) as client:
            while time.monotonic() < stop_at:
                outcome, seconds = await one_request(client, served, client_rng,
                                                     args.cancel_fraction, args)
                outcomes[outcome] += 1
                if outcome.startswith("finished"):
                    latencies.append(seconds)

    async def sample_memory() -> None:
        pids = served.pids()
        while time.monotonic() < stop_at:
            for name, pid in pids.items():
                memory[name].append(rss_mib(pid))
            await asyncio.sleep(1.0)

    sampler = asyncio.create_task(sample_memory())
    await asyncio.gather(*(client_loop(args.seed * 1000 + i) for i in range(args.concurrency)))
    await sampler
    return {"outcomes": dict(outcomes), "latencies": latencies, "memory": memory}


def summarize(result: dict, served: Served, args: argparse.Namespace) -> tuple[dict, list[str]]:
    outcomes = result["outcomes"]
    latencies = sorted(result["latencies"])
    failures = []
    lost = {k: v for k, v in outcomes.items() if k.startswith("lost")}
    if lost:
        failures.append(f"lost requests: {lost}")
    time.sleep(2.0)  # cancelled requests finish aborting
    held = served.blocks_held()
    if any(held.values()):
        failures.append(f"KV blocks still held after the load: {held}")
    memory = {}
    for name, samples in result["memory"].items():
        steady = samples[int(len(samples) * args.warmup_fraction):]
        if len(steady) < 2:
            continue
        # a leak is a trend: the median of the last half of the steady samples against the
        # median of the first half (single samples swing with the allocator's caches)
        first = statistics.median(steady[:len(steady) // 2])
        last = statistics.median(steady[len(steady) // 2:])
        memory[name] = {"after_warmup_mib": round(first, 1), "end_mib": round(last, 1),
                        "peak_mib": round(max(samples), 1)}
        if last - first > args.memory_slack_mib:
            failures.append(f"{name} memory grew {last - first:.0f} MiB after warm-up")

    def pct(q: float) -> float | None:
        return round(latencies[min(int(q * len(latencies)), len(latencies) - 1)], 3) \
            if latencies else None

    summary = {
        "duration_s": args.duration, "concurrency": args.concurrency,
        "cancel_fraction": args.cancel_fraction, "requests": sum(outcomes.values()),
        "outcomes": outcomes, "finished_latency_s": {
            "p50": pct(0.5), "p99": pct(0.99),
            "mean": round(statistics.fmean(latencies), 3) if latencies else None},
        "blocks_held_after": held, "memory": memory, "failures": failures,
        "command": " ".join(sys.argv),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return summary, failures


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    served = Served(args)
    try:
        result = asyncio.run(run_load(served, args))
        summary, failures = summarize(result, served, args)
    finally:
        exit_code = served.stop()
    summary["serve_exit_code"] = exit_code
    print(f"{summary['requests']} requests in {args.duration:.0f} s, {args.concurrency} clients, "
          f"{args.cancel_fraction:.0%} cancelled at random")
    for outcome, count in sorted(summary["outcomes"].items()):
        print(f"  {outcome:<28} {count}")
    print(f"finished: p50 {summary['finished_latency_s']['p50']} s, "
          f"p99 {summary['finished_latency_s']['p99']} s")
    for name, m in summary["memory"].items():
        print(f"  {name:<8} RSS median after warm-up {m['after_warmup_mib']} MiB, at the end "
              f"{m['end_mib']} MiB, peak {m['peak_mib']} MiB")
    print("PASS" if not failures else "FAIL: " + "; ".join(failures))
    if args.output_json:
        args.output_json.write_text(json.dumps(summary, indent=2))
    return 0 if not failures and exit_code == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
