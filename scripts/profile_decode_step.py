"""Where a decode step's time goes: scheduling, filling and uploading the step buffers, the
CUDA graph replay (the GPU's work), sampling and the scheduler update, each timed on its own
with the device synchronised around it, next to the whole step timed without those syncs.

    python scripts/profile_decode_step.py --model llama-3.1-8b --batch-sizes 1 64

Runs the bench's engine (dummy weights, bf16, CUDA graphs); prints one table row per batch size
and temperature. Phases timed apart add up to more than the whole step: without the syncs the
host prepares step N+1's inputs while nothing else waits, so the sum shows the host's share.
`--sampler torch` times the sample phase on the torch path instead of the Triton kernel
(kernels/sampling.py, the default on CUDA for rows without top-p), to compare the two.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time
from statistics import median

import torch

from engine.bench import runtime
from engine.bench.latency import _prefill, _prompts
from engine.request import Request
from engine.sampler import sample
from engine.sampling_params import SamplingParams

PHASES = ("schedule", "inputs", "graph", "sample", "update")


def _timed(device: torch.device, fn):
    runtime.synchronize(device)
    started = time.perf_counter()
    value = fn()
    runtime.synchronize(device)
    return value, (time.perf_counter() - started) * 1e3


def profile(parts, batch: int, context_len: int, temperature: float, steps: int,
            profiler: cProfile.Profile | None = None, kernels: bool = False,
            kernel: bool | None = None) -> dict:
    scheduler, runner = parts.scheduler, parts.runner
    sampling = SamplingParams(max_tokens=4 * steps + context_len, temperature=temperature,
                              ignore_eos=True).validate()
    requests = [Request(f"p{batch}-{i}", p, sampling)
                for i, p in enumerate(_prompts(parts, batch, context_len, 0))]
    for request in requests:
        scheduler.add(request)
    _prefill(parts, requests, 64)
    times = {phase: [] for phase in PHASES} | {"whole step": []}
    try:
        for _ in range(steps):
            output, ms = _timed(runner.device, scheduler.schedule)
            times["schedule"].append(ms)
            chunks = output.chunks
            key = runner._graph_key(chunks)
            assert key is not None and key[1] == 1, "not a graph-replayed decode step"
            size = key[0]

            def inputs():
                widest = runner.buffers.fill(chunks, runner.block_size, size, size)
                runner.buffers.upload(size, size, widest)

            times["inputs"].append(_timed(runner.device, inputs)[1])
            graph, logits = runner.graphs[key]
            times["graph"].append(_timed(runner.device, graph.replay)[1])
            tokens, ms = _timed(runner.device, lambda: sample(
                logits[:len(chunks)], [r for r, _ in chunks], kernel=kernel))
            times["sample"].append(ms)
            sampled = {r.request_id: t for (r, _), t in zip(chunks, tokens)}
            times["update"].append(_timed(runner.device,
                                          lambda: scheduler.update_from_output(output, sampled))[1])
        for _ in range(steps):
            times["whole step"].append(_timed(runner.device, lambda: runtime.step(parts))[1])
        if kernels:  # the GPU's kernels of whole steps (graph replays included, via CUPTI)
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as torch_profile

            with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(steps):
                    runtime.step(parts)
                runtime.synchronize(runner.device)
            averages = prof.key_averages()
            for key in ("self_device_time_total", "self_cuda_time_total"):
                try:
                    table = averages.table(sort_by=key, row_limit=25, max_name_column_width=70)
                    break
                except (AttributeError, KeyError, ValueError):
                    table = None
            print(f"kernels of {steps} whole steps, batch {batch}, T={temperature}:\n{table}",
                  flush=True)
        if profiler is not None:  # the host's Python, whole steps without syncs around them
            profiler.enable()
            for _ in range(steps):
                runtime.step(parts)
            runtime.synchronize(runner.device)
            profiler.disable()
    finally:
        runtime.abort_all(parts, requests)
    return {name: median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3.1-8b")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--context-len", type=int, default=512)
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument("--cprofile", action="store_true",
                        help="also cProfile whole steps; prints the top functions per row")
    parser.add_argument("--kernels", action="store_true",
                        help="also torch.profiler whole steps; prints the top GPU kernels per row")
    parser.add_argument("--sampler", choices=["auto", "torch", "kernel"], default="auto",
                        help="the sample phase's path for rows without top-p (auto: the kernel "
                             "on CUDA)")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    model_dir, _ = runtime.resolve_model(args.model)
    batch = max(args.batch_sizes)
    spec = runtime.EngineSpec(
        model_dir=model_dir, load_format="dummy", dtype="bfloat16", device="cuda",
        attention_backend="triton", block_size=16, max_num_seqs=batch,
        max_num_batched_tokens=8192, max_model_len=4096, num_kv_blocks=batch * 64 + 512,
        kv_cache_memory=None, gpu_memory_utilization=0.85)
    parts = runtime.build_engine(spec)
    print("| batch | temperature | " + " | ".join(f"{p} ms" for p in PHASES)
          + " | sum ms | whole step ms |")
    print("| ---: " * (len(PHASES) + 4) + "|")
    for batch in args.batch_sizes:
        for temperature in args.temperatures:
            profiler = cProfile.Profile() if args.cprofile else None
            t = profile(parts, batch, args.context_len, temperature, args.steps, profiler,
                        args.kernels, {"auto": None, "torch": False, "kernel": True}[args.sampler])
            row = [f"{t[p]:.2f}" for p in PHASES]
            print(f"| {batch} | {temperature} | " + " | ".join(row)
                  + f" | {sum(t[p] for p in PHASES):.2f} | {t['whole step']:.2f} |", flush=True)
            if profiler is not None:
                text = io.StringIO()
                pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(15)
                print(f"cProfile, batch {batch}, T={temperature}, {args.steps} steps:\n"
                      + text.getvalue(), flush=True)


if __name__ == "__main__":
    main()
