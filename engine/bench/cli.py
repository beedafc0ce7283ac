"""`tandem bench offline|latency|serve`: flags, and the run -> table -> JSON -> plot sequence.

Torch-free at import (engine/cli.py builds this parser for every `tandem` command); a mode's
module, and torch with it, is imported when that mode runs. `serve` never imports torch.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import logging
from pathlib import Path

from engine.bench.datasets import DATASETS, RANDOM_LEN_RANGE
from engine.bench.report import save_plot, write_json
from engine.model.config import ModelLoadError

logger = logging.getLogger("engine.bench")

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
SWEEP_MODES = ("latency", "serve")


def add_bench_parser(subparsers: argparse._SubParsersAction) -> None:
    """Adds `bench` and its modes to the `tandem` command's subparsers."""
    bench = subparsers.add_parser("bench", help="measure throughput, decode latency, serving",
                                  description=__doc__.splitlines()[0])
    modes = bench.add_subparsers(dest="bench_mode", required=True)
    offline = modes.add_parser("offline", help="engine in-process, every request at once: "
                                               "requests/s, output and total tokens/s")
    _add_engine_args(offline)
    _add_dataset_args(offline)
    offline.add_argument("--hf-batch-size", type=int, default=64,
                         help="transformers generate() batch size (--compare-transformers)")
    _add_output_args(offline, plot=False)
    latency = modes.add_parser("latency", help="decode ms per step at batch sizes 1..64, next to "
                                               "the memory-bandwidth roofline")
    _add_engine_args(latency)
    latency.add_argument("--batch-sizes", type=int, nargs="+", default=list(DEFAULT_BATCH_SIZES))
    latency.add_argument("--context-len", type=int, default=512,
                         help="prompt tokens of each sequence before the timed decode steps")
    latency.add_argument("--steps", type=int, default=32, help="timed decode steps")
    latency.add_argument("--warmup-steps", type=int, default=8, help="untimed decode steps first")
    _add_output_args(latency, plot=True)
    serve = modes.add_parser("serve", help="Poisson arrivals against a running gateway: TTFT, "
                                           "TPOT, ITL, E2EL percentiles and goodput")
    _add_serve_args(serve)
    _add_dataset_args(serve)
    _add_output_args(serve, plot=True)


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="checkpoint directory, or a bundled config (llama-3.1-8b, qwen3-0.6b; "
                        "dummy weights); default: the built-in tiny model")
    p.add_argument("--load-format", default=None, choices=["auto", "dummy"],
                   help="default: dummy for a bundled config, auto (read the weights) otherwise")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", help="auto: cuda when available, else cpu")
    p.add_argument("--attention-backend", default="auto", choices=["auto", "triton", "torch"])
    p.add_argument("--enforce-eager", action="store_true",
                   help="no CUDA graphs (decode steps run eagerly)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--kv-cache-memory", default=None,
                   help="KV cache size, e.g. 8GiB (default: --gpu-memory-utilization on CUDA, "
                        "256MiB on CPU)")
    p.add_argument("--num-kv-blocks", type=int, default=None, help="overrides --kv-cache-memory")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85,
                   help="share of GPU memory for weights + KV cache when no size is given")
    p.add_argument("--max-num-seqs", type=int, default=256, help="running requests at most")
    p.add_argument("--max-num-batched-tokens", type=int, default=8192,
                   help="tokens per engine step (the prefill chunk budget)")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--torch-threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="0: greedy; default 1.0, as vLLM's throughput and latency benchmarks")
    p.add_argument("--compare-transformers", action="store_true",
                   help="also run transformers generate() on the same weights and prompts")


def _add_dataset_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="random", choices=DATASETS,
                   help="random: uniform lengths; sharegpt-shaped: ShareGPT's mean lengths "
                        "(synthetic, see engine/bench/datasets.py)")
    p.add_argument("--num-prompts", type=int, default=None,
                   help="default: 256 (random, nano-vllm's workload), 1000 (sharegpt-shaped)")
    for side in ("input", "output"):
        p.add_argument(f"--random-{side}-len", type=int, nargs=2, metavar=("MIN", "MAX"),
                       default=list(RANDOM_LEN_RANGE),
                       help=f"{side} tokens of the random dataset, uniform on [MIN, MAX]")


def _add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="grpc", choices=["grpc", "openai"],
                   help="grpc: tandem.v1.Generation; openai: /v1/completions (needs httpx)")
    p.add_argument("--target", default="127.0.0.1:50051",
                   help="HOST:PORT of the gateway's public gRPC API")
    p.add_argument("--base-url", default="http://127.0.0.1:8000",
                   help="the gateway's HTTP address (--backend openai)")
    p.add_argument("--served-model-name", default=None, help="default: the only model served")
    p.add_argument("--api-key", default=None,
                   help="the gateway's API key (default: $TANDEM_API_KEY), sent as a bearer token")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="prompt ids are drawn below it (--backend openai; gRPC asks the server)")
    p.add_argument("--request-rate", type=float, nargs="+", default=[float("inf")],
                   help="requests/s, one run each (inf: all at once)")
    p.add_argument("--slo", default=None, metavar="ttft=MS,tpot=MS,e2el=MS",
                   help="SLOs for goodput, in milliseconds")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy")


def _add_output_args(p: argparse.ArgumentParser, plot: bool) -> None:
    p.add_argument("--seed", type=int, default=0, help="seed of prompts, lengths and arrivals")
    p.add_argument("--output-json", type=Path, default=None,
                   help="where to write every figure (default: tandem-bench-MODE-DATE.json)")
    if plot:
        p.add_argument("--plot", type=Path, default=None,
                       help="PNG of the sweep (default: the JSON's path with .png)")


def main(args: argparse.Namespace) -> int:
    """Runs the mode, prints its table, writes the JSON and (sweeps) the plot. Returns 0, or 2
    when the flags ask for something impossible (the log says why)."""
    mode = importlib.import_module(f"engine.bench.{args.bench_mode}")
    try:
        payload = mode.run(args)
    except (ValueError, ModelLoadError) as e:
        logger.error("%s", e)
        return 2
    print(mode.table(payload), flush=True)
    json_path = args.output_json or Path(f"tandem-bench-{args.bench_mode}-"
                                         f"{datetime.datetime.now():%Y%m%d-%H%M%S}.json")
    write_json(json_path, payload)
    if args.bench_mode in SWEEP_MODES:
        save_plot(args.plot or json_path.with_suffix(".png"),
                  lambda plt: mode.draw(payload, plt))
    return 0
