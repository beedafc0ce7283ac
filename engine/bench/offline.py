"""`tandem bench offline`: throughput of the engine in this process, every request submitted at
once, through the real scheduler and model runner (no gRPC, no KV transfer: one engine computes
the prompts and decodes, as tests/engine_loop.py does).

Measured: the wall time from the first `schedule()` until the last request finished (device
synchronised before each clock read), after one untimed warm-up run of WARMUP_REQUESTS requests
(compilation, allocator) with fresh token ids. Derived from it:

    requests/s         = requests / wall
    output tokens/s    = generated tokens / wall      (EOS ignored: every request generates the
                                                       output length it drew)
    total tokens/s     = (prompt + generated tokens) / wall
    mean batch size    = scheduled sequences / steps   (prefill chunks and decode rows alike)

The timing covers host work too (scheduling, batch preparation, sampling), as it does in serving.
With --compare-transformers, transformers generate() then runs the same prompts on the same
weight tensors (engine/bench/hf_compare.py); speedup_vs_transformers is Tandem / transformers
output tok/s.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from engine.bench import hf_compare, report, runtime
from engine.bench.datasets import BenchRequest, build_workload, warmup_requests
from engine.instance import EngineParts
from engine.request import Request
from engine.sampling_params import SamplingParams

WARMUP_REQUESTS = 8
WARMUP_OUTPUT_LEN = 4

COLUMNS = [report.Column("engine", "engine"), report.Column("num_requests", "requests"),
           report.Column("wall_s", "wall s", "{:.2f}"),
           report.Column("requests_per_s", "requests/s", "{:.2f}"),
           report.Column("output_tokens_per_s", "output tok/s", "{:.1f}"),
           report.Column("total_tokens_per_s", "total tok/s", "{:.1f}"),
           report.Column("num_steps", "steps"),
           report.Column("mean_batch_size", "mean batch", "{:.1f}")]


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The payload of an offline run (see the module docstring for every figure)."""
    if args.compare_transformers:
        hf_compare.check_available()
    spec = runtime.spec_from_args(args)
    parts = runtime.build_engine(spec)
    workload = build_workload(args.dataset, args.num_prompts, parts.model_config.vocab_size,
                              args.seed, parts.max_model_len, tuple(args.random_input_len),
                              tuple(args.random_output_len))
    payload = {"mode": "offline", "environment": report.environment(spec.device, args.argv),
               "engine": runtime.engine_facts(spec, parts), "dataset": workload.describe(),
               "sampling": {"temperature": args.temperature, "ignore_eos": True}}
    run_requests(parts, warmup_requests(workload, WARMUP_REQUESTS, WARMUP_OUTPUT_LEN,
                                        parts.model_config.vocab_size), args.temperature)
    with report.Progress(len(workload.requests), "tandem offline") as progress:
        payload["results"] = run_requests(parts, workload.requests, args.temperature, progress)
    if args.compare_transformers:
        model, device = parts.runner.model, parts.runner.device
        del parts  # the engine and its KV cache go before transformers allocates
        runtime.release_device_memory(device)
        payload["transformers"] = hf_compare.offline(model, spec.model_dir, workload,
                                                     args.hf_batch_size, args.temperature)
        payload["speedup_vs_transformers"] = (payload["results"]["output_tokens_per_s"]
                                              / payload["transformers"]["output_tokens_per_s"])
    return payload


def run_requests(parts: EngineParts, bench_requests: list[BenchRequest], temperature: float,
                 progress: report.Progress | None = None) -> dict[str, Any]:
    """Submits every request, steps the engine until all finished; the measured figures."""
    requests = [Request(f"bench-{i}", list(r.prompt_token_ids),
                        SamplingParams(max_tokens=r.output_len, temperature=temperature,
                                       ignore_eos=True).validate())
                for i, r in enumerate(bench_requests)]
    device = parts.runner.device
    num_steps = num_seqs = 0
    for request in requests:
        parts.scheduler.add(request)
    try:
        runtime.synchronize(device)
        started = time.perf_counter()
        while parts.scheduler.has_work():
            output, finished = runtime.step(parts)
            if not output.chunks:
                raise RuntimeError("the scheduler scheduled nothing while requests wait")
            num_steps += 1
            num_seqs += len(output.chunks)
            if progress is not None:
                progress.update(len(finished))
        runtime.synchronize(device)
        wall_s = time.perf_counter() - started
    finally:
        runtime.abort_all(parts, requests)
    return throughput("tandem", wall_s, requests, num_steps, num_seqs)


def throughput(engine: str, wall_s: float, requests: list[Request], num_steps: int,
               num_seqs: int) -> dict[str, Any]:
    num_input = sum(r.num_prompt_tokens for r in requests)
    num_output = sum(r.num_output_tokens for r in requests)
    return {"engine": engine, "wall_s": wall_s, "num_requests": len(requests),
            "num_input_tokens": num_input, "num_output_tokens": num_output,
            "requests_per_s": len(requests) / wall_s, "output_tokens_per_s": num_output / wall_s,
            "total_tokens_per_s": (num_input + num_output) / wall_s, "num_steps": num_steps,
            "mean_batch_size": num_seqs / num_steps if num_steps else None}


def table(payload: dict[str, Any]) -> str:
    rows = [payload["results"]] + ([payload["transformers"]] if "transformers" in payload else [])
    lines = [report.markdown_table(rows, COLUMNS)]
    if "speedup_vs_transformers" in payload:
        lines.append("output tok/s, Tandem / transformers generate(): "
                     f"{payload['speedup_vs_transformers']:.2f}x")
    return "\n".join(lines)
