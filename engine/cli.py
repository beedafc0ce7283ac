"""The `tandem` command: `serve` (all tiers on this machine), `prefill`, `decode`, `gateway`.

The top of the import graph: it imports the tiers and the gateway (lazily), and nothing imports
it (tests/unit/test_layering.py); process helpers shared with the servers live in
`engine.serving`. Torch-free at import: `tandem gateway` never loads torch.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from functools import partial
from pathlib import Path

from engine.serving import add_shutdown_grace_arg, configure_logging, run_until_signalled

DEFAULT_KV_CACHE = "256MiB"
DECODE_EPILOG = ("Multi-host: prefill instances push KV to the address this instance advertises "
                 "(logged at start-up as 'KV transfer on HOST:PORT', and returned by "
                 "Instance.GetInstanceInfo). Bound to 0.0.0.0 it advertises this host's own "
                 "address; pass --advertise-host when that is not the one other hosts reach "
                 "(NAT, several interfaces).")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, default=None,
                   help="Hugging Face checkpoint directory (default: the built-in "
                        "tandem-stdlib-7m, a small Llama trained on Python's standard library)")
    p.add_argument("--tokenizer", type=Path, default=None, metavar="DIR",
                   help="directory of the tokenizer files (tokenizer.json, tokenizer_config.json, "
                        "...) when the model directory has none, e.g. a config-only checkpoint "
                        "with --load-format dummy (default: the model directory)")
    p.add_argument("--served-model-name", default=None,
                   help="name clients use (default: the model directory's name)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: the checkpoint's torch_dtype (float32 for the built-in model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--kv-cache-memory", default=DEFAULT_KV_CACHE,
                   help="memory for the KV cache, e.g. 512MiB, 8GiB")
    p.add_argument("--num-kv-blocks", type=int, default=None, help="override --kv-cache-memory")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=64, help="running requests at most")
    p.add_argument("--torch-threads", type=int, default=None)
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"],
                   help="dummy: random weights from config.json alone (benchmarks)")
    p.add_argument("--attention-backend", default="auto", choices=["auto", "triton", "torch"],
                   help="auto: triton on CUDA, the torch reference elsewhere")
    p.add_argument("--enforce-eager", action="store_true",
                   help="no CUDA graphs (decode steps run eagerly)")


def add_speculative_args(p: argparse.ArgumentParser) -> None:
    """Speculative decoding on the decode tier (`tandem decode`, `tandem serve`)."""
    p.add_argument("--speculative-method", default=None, choices=["ngram", "draft"],
                   help="propose draft tokens for the decode tier to verify in one forward pass: "
                        "ngram = prompt lookup (no extra model), draft = a smaller model with the "
                        "same tokenizer (--draft-model); output is unchanged (default: off)")
    p.add_argument("--draft-model", type=Path, default=None, metavar="DIR",
                   help="draft: its Hugging Face checkpoint directory (default with the built-in "
                        "model: the built-in draft, tandem-stdlib-draft-1m)")
    p.add_argument("--num-speculative-tokens", type=int, default=None, metavar="K",
                   help="draft tokens proposed per request and step (needed with "
                        "--speculative-method)")
    p.add_argument("--prompt-lookup-min", type=int, default=1, metavar="N",
                   help="ngram: shortest suffix matched")
    p.add_argument("--prompt-lookup-max", type=int, default=3, metavar="N",
                   help="ngram: longest suffix matched")
    p.add_argument("--speculative-governor", action=argparse.BooleanOptionalAction, default=True,
                   help="measure the throughput of steps with and without drafts and keep "
                        "drafting only where it pays, bar a probe step in 16 (default: on; "
                        "off trusts the batch-size estimate alone)")
    p.add_argument("--speculative-saturation-tokens", type=int, default=256, metavar="T",
                   help="tokens per step at which a decode step stops being memory-bound: drafts "
                        "shrink as the batch nears it and stop at it (default 256)")


def speculative_config(args: argparse.Namespace):
    """The SpeculativeConfig the flags ask for, or None."""
    if args.speculative_method is None:
        return None
    if args.num_speculative_tokens is None:
        raise SystemExit("--speculative-method needs --num-speculative-tokens")
    from decode_service.speculative import SpeculativeConfig

    return SpeculativeConfig(args.speculative_method, args.num_speculative_tokens,
                             args.prompt_lookup_min, args.prompt_lookup_max,
                             args.speculative_saturation_tokens, resolve_draft_dir(args),
                             args.speculative_governor)


def resolve_draft_dir(args: argparse.Namespace) -> Path | None:
    """--draft-model for --speculative-method draft; the built-in draft for the built-in model."""
    if args.speculative_method != "draft":
        if args.draft_model is not None:
            raise SystemExit("--draft-model goes with --speculative-method draft")
        return None
    if args.draft_model is not None:
        return args.draft_model.resolve()
    from engine.model.checkpoint import builtin_draft_dir, is_builtin_model

    if not is_builtin_model(resolve_model_dir(args.model)):
        raise SystemExit("--speculative-method draft needs --draft-model")
    return builtin_draft_dir()


def add_tier_args(p: argparse.ArgumentParser, default_port: int) -> None:
    add_model_args(p)
    p.add_argument("--host", default="0.0.0.0",
                   help="address to listen on (default 0.0.0.0: every interface; a concrete "
                        "address keeps the instance on that network only)")
    p.add_argument("--port", type=int, default=default_port,
                   help="gRPC port the gateway is given as HOST:PORT (0 picks a free port)")
    p.add_argument("--ready-file", type=Path, default=None,
                   help="write {'port': ...} as JSON here once serving")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics at http://HOST:PORT/metrics, HOST being "
                        "--host (0: any free port, logged; default: none); GetInstanceInfo "
                        "advertises the port, and the gateway's /metrics includes them")
    add_shutdown_grace_arg(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="gateway + prefill + decode as processes on this machine")
    add_model_args(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000,
                       help="HTTP port of the gateway (0: any free port, printed at start-up)")
    serve.add_argument("--grpc-port", type=int, default=50051,
                       help="public gRPC port (0: any free port, printed at start-up)")
    serve.add_argument("--prefill-workers", type=int, default=1)
    serve.add_argument("--decode-workers", type=int, default=1)
    serve.add_argument("--max-prefill-tokens", type=int, default=2048)
    serve.add_argument("--prefill-gpus", default=None, metavar="IDS",
                       help="GPUs of the prefill workers, comma-separated indices (worker i gets "
                            "the (i mod n)-th, as its CUDA_VISIBLE_DEVICES), e.g. 0; default: "
                            "every worker sees this process's GPUs and uses the first")
    serve.add_argument("--decode-gpus", default=None, metavar="IDS",
                       help="GPUs of the decode workers, as --prefill-gpus, e.g. 1,2,3")
    add_speculative_args(serve)
    from gateway.flags import add_access_arguments, add_request_timeout_arg

    add_access_arguments(serve)
    add_request_timeout_arg(serve)
    add_shutdown_grace_arg(serve)
    prefill = sub.add_parser("prefill", help="one prefill instance")
    add_tier_args(prefill, 8100)
    prefill.add_argument("--max-prefill-tokens", type=int, default=2048,
                         help="prompt tokens computed per step across the batch (chunk size)")
    prefill.add_argument("--no-prefix-cache", action="store_true")
    decode = sub.add_parser("decode", help="one decode instance", epilog=DECODE_EPILOG)
    add_tier_args(decode, 8200)
    decode.add_argument("--kv-port", type=int, default=0,
                        help="port prefill instances push KV blocks to, on --host (0: any free; "
                             "fix it to open a firewall for it)")
    decode.add_argument("--advertise-host", default=None, metavar="HOST",
                        help="host or address prefill instances on other hosts reach the KV port "
                             "on (default: --host; with a wildcard --host such as 0.0.0.0, this "
                             "host's own address: the default route's source address)")
    decode.add_argument("--kv-transfer-timeout", type=float, default=60.0,
                        help="seconds a prompt's KV may take to arrive")
    add_speculative_args(decode)
    decode.add_argument("--max-queue-len", type=int, default=None, metavar="N",
                        help="requests that may wait for admission; one more is refused at once "
                             "with RESOURCE_EXHAUSTED (HTTP 429 at the gateway) (default: 4 x "
                             "--max-num-seqs)")
    from gateway.flags import add_arguments as add_gateway_args

    gateway = sub.add_parser("gateway", help="the OpenAI HTTP + public gRPC front door")
    add_gateway_args(gateway)
    gateway.add_argument("--ready-file", type=Path, default=None,
                         help="write {'port': HTTP port, 'grpc_port': ...} as JSON here once "
                              "serving: the ports bound, also for --port 0 / --grpc-port 0")
    from engine.bench.cli import add_bench_parser

    add_bench_parser(sub)
    return parser


def resolve_model_dir(model: Path | None) -> Path:
    """--model, else the built-in trained model shipped in the package."""
    if model is not None:
        return model
    from engine.model.checkpoint import builtin_model_dir

    return builtin_model_dir()


def resolve_dtype_flag(dtype: str, model_dir: Path) -> str:
    """--dtype, where "auto" runs the built-in model in float32 (BUILTIN_MODEL_DTYPE)."""
    from engine.model.checkpoint import BUILTIN_MODEL_DTYPE, is_builtin_model

    return BUILTIN_MODEL_DTYPE if dtype == "auto" and is_builtin_model(model_dir) else dtype


def instance_config(args: argparse.Namespace, max_batched_tokens: int, prefix_cache: bool):
    from engine.instance import InstanceConfig
    from engine.kv_cache import parse_size

    model_dir = resolve_model_dir(args.model).resolve()
    return InstanceConfig(
        model_dir=model_dir, served_model_name=args.served_model_name or model_dir.name,
        dtype=resolve_dtype_flag(args.dtype, model_dir), device=args.device,
        block_size=args.block_size,
        kv_cache_memory=parse_size(args.kv_cache_memory), num_kv_blocks=args.num_kv_blocks,
        max_num_batched_tokens=max_batched_tokens, max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len, enable_prefix_cache=prefix_cache,
        attention_backend=args.attention_backend, load_format=args.load_format,
        enforce_eager=args.enforce_eager,
        tokenizer_dir=args.tokenizer.resolve() if args.tokenizer else None)


def _set_threads(args: argparse.Namespace) -> None:
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)


def _write_ready(path: Path | None, **values: object) -> None:
    if path is not None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(values))
        tmp.replace(path)


async def _serve_until_stopped(server, ready_file: Path | None, stop: asyncio.Event,
                               grace_s: float) -> int:
    """Starts a tier server, announces its port, serves until `stop` is set (then drains for up
    to grace_s), until it is cancelled, or until its engine fails; then stops it. Returns the
    exit code: 1 if the engine failed, else 0."""
    port = await server.start()
    _write_ready(ready_file, port=port)
    # never cancel wait_for_termination: grpc then fails its own stop() with CancelledError
    terminated = asyncio.ensure_future(server.grpc.server.wait_for_termination())
    failed = asyncio.ensure_future(server.engine.failed.wait())
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([terminated, failed, stopping], return_when=asyncio.FIRST_COMPLETED)
        if failed.done():
            logging.getLogger("engine").critical(
                "the engine failed (%s); exiting with status 1", server.engine.core.error)
            return 1
        if stopping.done():
            await server.drain(grace_s)
        return 0
    finally:
        failed.cancel()
        stopping.cancel()
        await server.stop()


async def _run_prefill(args: argparse.Namespace, stop: asyncio.Event) -> int:
    from prefill_service.server import PrefillServer

    config = instance_config(args, args.max_prefill_tokens, not args.no_prefix_cache)
    server = PrefillServer(config, args.host, args.port, args.metrics_port)
    return await _serve_until_stopped(server, args.ready_file, stop, args.shutdown_grace_s)


async def _run_decode(args: argparse.Namespace, stop: asyncio.Event) -> int:
    from decode_service.server import DecodeServer

    config = instance_config(args, max(args.max_num_seqs, 256), False)
    server = DecodeServer(config, args.host, args.port, args.kv_port, args.advertise_host,
                          args.kv_transfer_timeout, args.metrics_port,
                          max_queue_len=args.max_queue_len,
                          speculative=speculative_config(args))
    return await _serve_until_stopped(server, args.ready_file, stop, args.shutdown_grace_s)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # what a benchmark's JSON records as its command line
    configure_logging(args.command)
    if args.command == "bench":
        from engine.bench.cli import main as bench_main

        return bench_main(args)
    if args.command == "serve":
        from engine.launcher import launch, parse_gpu_list

        try:
            parse_gpu_list(args.prefill_gpus, "--prefill-gpus")
            parse_gpu_list(args.decode_gpus, "--decode-gpus")
        except ValueError as exc:
            build_parser().error(str(exc))
        return launch(args, resolve_model_dir(args.model).resolve())
    if args.command == "gateway":
        from gateway.server import main as gateway_main

        gateway_main(args, on_listening=lambda http_port, grpc_port: _write_ready(
            args.ready_file, port=http_port, grpc_port=grpc_port))
        return 0
    _set_threads(args)
    runner = {"prefill": _run_prefill, "decode": _run_decode}[args.command]
    return run_until_signalled(partial(runner, args), args.command)


if __name__ == "__main__":
    raise SystemExit(main())
