"""`tandem bench latency`: milliseconds per decode step at batch sizes 1..64 and one context
length, next to the memory-bandwidth roofline.

For each batch size B: B requests with prompts of `context_len` random tokens are admitted and
prefilled (untimed), `warmup_steps` decode steps run untimed, then `steps` decode steps are
timed one by one (device synchronised around each). Every timed step must be a pure decode step
(B sequences, one token each). A step is a whole engine step: schedule, batch preparation,
forward, sampling, bookkeeping: what a decode step costs when serving.

    ms/step        median of the timed steps (robust to a stray slow step; the mean is
                   reported too, as ms_per_step_mean)
    tokens/s       B / median step time
    weight bytes   every parameter once, except the input embedding, of which only B rows are
                   gathered; with tied embeddings the table is the LM head's and is read fully,
                   once (decode_weight_bytes)
    KV bytes       K and V of every cached token of every sequence, all layers, read once:
                   sum of the sequences' lengths x kv_bytes_per_token, averaged over the timed
                   steps (the one token each sequence writes is not counted)
    roofline ms    (weight bytes + KV bytes) / copy bandwidth
    of roofline    roofline ms / measured ms (1.0 = moving those bytes at copy speed)

Copy bandwidth is measured in the same run, before the engine is built: the best of a few timed
groups of `dst.copy_(src)` over a COPY_BUFFER_BYTES buffer, counting bytes read plus bytes
written. On a CPU it is a torch memcpy rate and the roofline is loose: a small model's weights
sit in cache there, and CPU decode is rarely bound by memory.
"""

from __future__ import annotations

import argparse
import time
from statistics import mean, median
from typing import Any

import torch

from engine.bench import hf_compare, report, runtime
from engine.bench.datasets import random_workload
from engine.instance import EngineParts
from engine.kv_cache import KVLayout
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.scheduler import SchedulerOutput, cdiv

COPY_BUFFER_BYTES = {"cuda": 1 << 30, "cpu": 128 << 20}
COPY_ITERS = {"cuda": 20, "cpu": 3}
COPY_REPEATS = 5

COLUMNS = [report.Column("batch_size", "batch"), report.Column("context_len", "context"),
           report.Column("ms_per_step", "ms/step", "{:.2f}"),
           report.Column("tokens_per_s", "tok/s", "{:.1f}"),
           report.Column("bytes_per_step", "MB/step", "{:.1f}", scale=1e-6),
           report.Column("roofline_ms", "roofline ms", "{:.2f}"),
           report.Column("fraction_of_roofline", "of roofline", "{:.1%}"),
           report.Column("transformers_ms_per_step", "transformers ms/step", "{:.2f}"),
           report.Column("speedup_vs_transformers", "vs transformers", "{:.2f}x")]


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The payload of a latency sweep (see the module docstring for every figure)."""
    if args.compare_transformers:
        hf_compare.check_available()
    batch_sizes = sorted(set(args.batch_sizes))
    spec = runtime.spec_from_args(args, max_num_seqs=max(batch_sizes))
    if spec.max_num_batched_tokens < max(batch_sizes):
        raise ValueError(f"--max-num-batched-tokens {spec.max_num_batched_tokens} is below the "
                         f"largest batch ({max(batch_sizes)}): its decode steps would split")
    bandwidth = copy_bandwidth(torch.device(spec.device))
    parts = runtime.build_engine(spec)
    prompts = {b: _prompts(parts, b, args.context_len, args.seed) for b in batch_sizes}
    payload = {"mode": "latency", "environment": report.environment(spec.device, args.argv),
               "engine": runtime.engine_facts(spec, parts), "context_len": args.context_len,
               "steps": args.steps, "warmup_steps": args.warmup_steps,
               "sampling": {"temperature": args.temperature, "ignore_eos": True},
               "copy_bandwidth": bandwidth,
               "kv_bytes_per_token": kv_bytes_per_token(parts.layout)}
    rows = []
    with report.Progress(len(batch_sizes), "tandem decode steps") as progress:
        for b in batch_sizes:
            row = measure_decode(parts, prompts[b], args.steps, args.warmup_steps,
                                 args.temperature)
            rows.append(row | roofline(parts.runner.model, parts.layout, b,
                                       row["kv_tokens_per_step"], bandwidth["bytes_per_s"],
                                       row["ms_per_step"]))
            progress.update()
    if args.compare_transformers:
        model, device = parts.runner.model, parts.runner.device
        del parts  # the engine and its KV cache go before transformers allocates
        runtime.release_device_memory(device)
        _compare_transformers(model, spec, rows, prompts, args)
    payload["rows"] = rows
    return payload


def _prompts(parts: EngineParts, batch_size: int, context_len: int, seed: int) -> list[list[int]]:
    """batch_size random prompts of context_len tokens (their own seed per batch size)."""
    workload = random_workload(batch_size, parts.model_config.vocab_size, seed + batch_size,
                               (context_len, context_len), (1, 1))
    return [r.prompt_token_ids for r in workload.requests]


def measure_decode(parts: EngineParts, prompts: list[list[int]], steps: int, warmup_steps: int,
                   temperature: float) -> dict[str, Any]:
    """Admits and prefills the prompts, then times `steps` decode steps of the whole batch."""
    budget = parts.scheduler.config.max_num_batched_tokens  # >= batch size (checked in run)
    # decoding rows take a token each from every step's budget while the others prefill
    prefill_steps = cdiv(sum(len(p) for p in prompts), max(budget - len(prompts), 1)) + 1
    max_tokens = prefill_steps + warmup_steps + steps + 1  # nobody finishes while timed
    _check_fits(parts, prompts, max_tokens)
    sampling = SamplingParams(max_tokens=max_tokens, temperature=temperature,
                              ignore_eos=True).validate()
    requests = [Request(f"latency-{len(prompts)}-{i}", list(p), sampling)
                for i, p in enumerate(prompts)]
    for request in requests:
        parts.scheduler.add(request)
    device = parts.runner.device
    step_s, kv_tokens = [], []
    try:
        _prefill(parts, requests, prefill_steps)
        for _ in range(warmup_steps):
            runtime.step(parts)
        for _ in range(steps):
            runtime.synchronize(device)
            started = time.perf_counter()
            output, _ = runtime.step(parts)
            runtime.synchronize(device)
            step_s.append(time.perf_counter() - started)
            _check_decode_step(output, len(requests))
            kv_tokens.append(sum(r.num_computed_tokens for r, _ in output.chunks))
    finally:
        runtime.abort_all(parts, requests)
    median_s = median(step_s)
    return {"batch_size": len(prompts), "context_len": len(prompts[0]),
            "ms_per_step": median_s * 1e3, "ms_per_step_mean": mean(step_s) * 1e3,
            "tokens_per_s": len(prompts) / median_s, "kv_tokens_per_step": mean(kv_tokens),
            "mean_seq_len": mean(kv_tokens) / len(prompts)}


def _check_fits(parts: EngineParts, prompts: list[list[int]], max_tokens: int) -> None:
    """Raises ValueError unless every sequence fits the context and all fit the pool at once."""
    longest = len(prompts[0]) + max_tokens
    if longest > parts.max_model_len:
        raise ValueError(f"context {len(prompts[0])} + {max_tokens} tokens exceeds the model's "
                         f"{parts.max_model_len}: lower --context-len or --steps")
    block_size = parts.layout.block_size
    needed = len(prompts) * cdiv(longest, block_size)
    if needed > parts.scheduler.pool.num_blocks:
        raise ValueError(f"batch {len(prompts)} needs {needed} KV blocks, the cache has "
                         f"{parts.scheduler.pool.num_blocks}: raise --kv-cache-memory")


def _prefill(parts: EngineParts, requests: list[Request], max_steps: int) -> None:
    """Steps until every request has its first token (prompt computed)."""
    for _ in range(max_steps):
        if all(r.num_output_tokens for r in requests):
            return
        runtime.step(parts)
    if not all(r.num_output_tokens for r in requests):
        raise RuntimeError(f"prefill of {len(requests)} requests took over {max_steps} steps")


def _check_decode_step(output: SchedulerOutput, batch_size: int) -> None:
    if len(output.chunks) != batch_size or any(n != 1 for _, n in output.chunks):
        raise RuntimeError(f"a timed step was not a decode step of {batch_size} sequences: "
                           f"{[n for _, n in output.chunks]}")


# roofline
def decode_weight_bytes(model: torch.nn.Module, batch_size: int) -> int:
    """Weight bytes a decode step of batch_size sequences must read (module docstring)."""
    embed = model.model.embed_tokens.weight
    total = runtime.parameter_bytes(model)
    if embed is not model.lm_head.weight:
        rows = min(batch_size, embed.shape[0])
        total += (rows - embed.shape[0]) * embed.shape[1] * embed.element_size()
    return total


def kv_bytes_per_token(layout: KVLayout) -> int:
    """K and V of one token over every layer: 2 x layers x KV heads x head dim x dtype size."""
    return layout.bytes_per_block // layout.block_size


def roofline(model: torch.nn.Module, layout: KVLayout, batch_size: int,
             kv_tokens_per_step: float, bandwidth: float, measured_ms: float) -> dict[str, float]:
    """Bytes a decode step reads, the time they take at `bandwidth`, and measured / that."""
    weight_bytes = decode_weight_bytes(model, batch_size)
    kv_bytes = kv_tokens_per_step * kv_bytes_per_token(layout)
    roofline_ms = (weight_bytes + kv_bytes) / bandwidth * 1e3
    return {"weight_bytes": weight_bytes, "kv_bytes": kv_bytes,
            "bytes_per_step": weight_bytes + kv_bytes, "roofline_ms": roofline_ms,
            "fraction_of_roofline": roofline_ms / measured_ms}


def copy_bandwidth(device: torch.device) -> dict[str, Any]:
    """Bytes read + written per second by dst.copy_(src), best of COPY_REPEATS timed groups."""
    num_bytes, iters = COPY_BUFFER_BYTES[device.type], COPY_ITERS[device.type]
    src = torch.randint(0, 256, (num_bytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up
    best = 0.0
    for _ in range(COPY_REPEATS):
        runtime.synchronize(device)
        started = time.perf_counter()
        for _ in range(iters):
            dst.copy_(src)
        runtime.synchronize(device)
        best = max(best, 2 * num_bytes * iters / (time.perf_counter() - started))
    del src, dst
    runtime.release_device_memory(device)
    return {"bytes_per_s": best, "buffer_bytes": num_bytes, "copies_per_group": iters,
            "groups": COPY_REPEATS, "method": "torch copy_, bytes read + written, best group"}


def _compare_transformers(model: torch.nn.Module, spec: runtime.EngineSpec,
                          rows: list[dict[str, Any]], prompts: dict[int, list[list[int]]],
                          args: argparse.Namespace) -> None:
    """Adds transformers' decode ms/step (same prompts, same weights) to each row."""
    hf = hf_compare.transformers_model(model, spec.model_dir)
    with report.Progress(len(rows), "transformers decode steps") as progress:
        for row in rows:
            ms = hf_compare.decode_ms_per_step(hf, prompts[row["batch_size"]], args.steps,
                                               args.warmup_steps, args.temperature)
            row["transformers_ms_per_step"] = ms
            row["speedup_vs_transformers"] = ms / row["ms_per_step"]
            progress.update()


def table(payload: dict[str, Any]) -> str:
    bandwidth = payload["copy_bandwidth"]["bytes_per_s"]
    return "\n".join([report.markdown_table(payload["rows"], COLUMNS),
                      f"copy bandwidth (read + write) {bandwidth / 1e9:.1f} GB/s on "
                      f"{payload['environment']['device_name']}; context {payload['context_len']} "
                      f"tokens, {payload['steps']} timed steps after {payload['warmup_steps']}"])


def draw(payload: dict[str, Any], plt: Any) -> None:
    """ms/step (Tandem, roofline, transformers) and the fraction of roofline, by batch size."""
    rows = payload["rows"]
    batch = [r["batch_size"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(batch, [r["ms_per_step"] for r in rows], "o-", label="Tandem")
    left.plot(batch, [r["roofline_ms"] for r in rows], "k--", label="roofline")
    if "transformers_ms_per_step" in rows[0]:
        left.plot(batch, [r["transformers_ms_per_step"] for r in rows], "s-",
                  label="transformers generate()")
    left.set(xlabel="batch size", ylabel="ms per decode step",
             title=f"decode step, context {payload['context_len']}")
    left.legend()
    right.plot(batch, [r["fraction_of_roofline"] for r in rows], "o-")
    right.set(xlabel="batch size", ylabel="roofline ms / measured ms",
              title="fraction of the bandwidth roofline")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(batch, [str(b) for b in batch])
    fig.suptitle(f"{payload['engine']['model']} ({payload['engine']['dtype']}) on "
                 f"{payload['environment']['device_name']}")
