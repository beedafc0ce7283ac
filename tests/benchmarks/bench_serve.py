"""Whole-system throughput: `tandem serve` on the default model, driven over HTTP by C concurrent
clients, next to transformers generate() on the same weights and machine.

    python -m tests.benchmarks.bench_serve [--concurrency 1 16] [--requests 32] [--prompt-tokens 64]
                                            [--max-tokens 64]

Each client sends token-id prompts (so prompt length is exact) with temperature 0 and ignore_eos,
one request after another; all requests of a level run in one window.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import random
import statistics
import time

import httpx

from tests.e2e.conftest import start_serve, stop_serve


def _one(client: httpx.Client, model: str, prompt: list[int], max_tokens: int) -> tuple[int, float]:
    started = time.perf_counter()
    ttft = None
    tokens = 0
    with client.stream("POST", "/v1/completions", json={
            "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if ttft is None and line.startswith("data: {") and '"text"' in line:
                ttft = time.perf_counter() - started
            if '"usage"' in line and '"choices":[]' in line.replace(" ", ""):
                import json

                tokens = json.loads(line[6:])["usage"]["completion_tokens"]
    return tokens, ttft or 0.0


def run_level(base: str, model: str, concurrency: int, num_requests: int, prompt_tokens: int,
              max_tokens: int) -> dict:
    rng = random.Random(concurrency)
    prompts = [[rng.randrange(10, 4000) for _ in range(prompt_tokens)] for _ in range(num_requests)]
    with httpx.Client(base_url=base, timeout=600) as client:
        _one(client, model, prompts[0], 4)  # warm-up
        started = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(lambda p: _one(client, model, p, max_tokens), prompts))
        elapsed = time.perf_counter() - started
    tokens = sum(t for t, _ in results)
    return dict(concurrency=concurrency, requests=num_requests, seconds=elapsed,
                req_s=num_requests / elapsed, tok_s=tokens / elapsed,
                ttft_p50=statistics.median(t for _, t in results))


def hf_baseline(model_dir, prompt_tokens: int, max_tokens: int) -> float:
    """transformers generate() at batch 1, greedy, tokens/s (after a warm-up)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.randint(10, 4000, (1, prompt_tokens))
    kwargs = dict(max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                  pad_token_id=0, attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        model.generate(ids, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})
        started = time.perf_counter()
        model.generate(ids, **kwargs)
    return max_tokens / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    from engine.model.checkpoint import RANDOM_MODEL_NAME, build_random_model, random_model_dir

    served = start_serve(build_random_model())  # the CPU figures in docs/benchmarks.md use it
    try:
        model = RANDOM_MODEL_NAME
        rows = [run_level(f"http://127.0.0.1:{served.http_port}", model, c,
                          max(args.requests, c), args.prompt_tokens, args.max_tokens)
                for c in args.concurrency]
        served.assert_all_blocks_free()
    finally:
        stop_serve(served)
    hf = hf_baseline(random_model_dir(), args.prompt_tokens, args.max_tokens)
    print(f"prompt {args.prompt_tokens} tokens, {args.max_tokens} generated, temperature 0")
    print("clients  requests  seconds   req/s   out tok/s   TTFT p50   vs HF generate (batch 1)")
    for r in rows:
        print(f"{r['concurrency']:7d}  {r['requests']:8d}  {r['seconds']:7.1f}  {r['req_s']:6.2f}"
              f"  {r['tok_s']:10.1f}  {r['ttft_p50'] * 1000:7.0f} ms  {r['tok_s'] / hf:6.2f}x")
    print(f"transformers generate(), batch 1: {hf:.1f} tok/s")


if __name__ == "__main__":
    main()
