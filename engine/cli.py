"""The `tandem` command: `serve` (all tiers on this machine), `prefill`, `decode`, `gateway`.

Torch-free at import: `tandem gateway` never loads torch; the tiers import their modules lazily.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path

DEFAULT_KV_CACHE = "256MiB"


def configure_logging(name: str) -> None:
    logging.basicConfig(level=os.environ.get("TANDEM_LOG_LEVEL", "INFO"),
                        format=f"%(asctime)s {name}[%(process)d] %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, default=None,
                   help="Hugging Face checkpoint directory (default: the built-in tiny model)")
    p.add_argument("--served-model-name", default=None,
                   help="name clients use (default: the model directory's name)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--kv-cache-memory", default=DEFAULT_KV_CACHE,
                   help="memory for the KV cache, e.g. 512MiB, 8GiB")
    p.add_argument("--num-kv-blocks", type=int, default=None, help="override --kv-cache-memory")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=64, help="running requests at most")
    p.add_argument("--torch-threads", type=int, default=None)


def add_tier_args(p: argparse.ArgumentParser, default_port: int) -> None:
    add_model_args(p)
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=default_port, help="0 picks a free port")
    p.add_argument("--ready-file", type=Path, default=None,
                   help="write {'port': ...} as JSON here once serving")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="gateway + prefill + decode as processes on this machine")
    add_model_args(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000, help="HTTP port of the gateway")
    serve.add_argument("--grpc-port", type=int, default=50051, help="public gRPC port")
    serve.add_argument("--prefill-workers", type=int, default=1)
    serve.add_argument("--decode-workers", type=int, default=1)
    serve.add_argument("--max-prefill-tokens", type=int, default=2048)
    prefill = sub.add_parser("prefill", help="one prefill instance")
    add_tier_args(prefill, 8100)
    prefill.add_argument("--max-prefill-tokens", type=int, default=2048,
                         help="prompt tokens computed per step across the batch (chunk size)")
    prefill.add_argument("--no-prefix-cache", action="store_true")
    decode = sub.add_parser("decode", help="one decode instance")
    add_tier_args(decode, 8200)
    decode.add_argument("--kv-port", type=int, default=0, help="KV transfer port (0: any free)")
    decode.add_argument("--advertise-host", default=None,
                        help="host peers use to reach this instance's KV port")
    decode.add_argument("--kv-transfer-timeout", type=float, default=60.0,
                        help="seconds a prompt's KV may take to arrive")
    from gateway.server import add_arguments as add_gateway_args

    add_gateway_args(sub.add_parser("gateway", help="the OpenAI HTTP + public gRPC front door"))
    return parser


def resolve_model_dir(model: Path | None) -> Path:
    if model is not None:
        return model
    from engine.model.checkpoint import build_default_model

    return build_default_model()


def instance_config(args: argparse.Namespace, max_batched_tokens: int, prefix_cache: bool):
    from engine.instance import InstanceConfig
    from engine.kv_cache import parse_size

    model_dir = resolve_model_dir(args.model).resolve()
    return InstanceConfig(
        model_dir=model_dir, served_model_name=args.served_model_name or model_dir.name,
        dtype=args.dtype, device=args.device, block_size=args.block_size,
        kv_cache_memory=parse_size(args.kv_cache_memory), num_kv_blocks=args.num_kv_blocks,
        max_num_batched_tokens=max_batched_tokens, max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len, enable_prefix_cache=prefix_cache)


def _set_threads(args: argparse.Namespace) -> None:
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)


def _write_ready(path: Path | None, **values: object) -> None:
    if path is not None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(values))
        tmp.replace(path)


async def _serve_until_stopped(server, ready_file: Path | None) -> None:
    """Starts a tier server, announces its port, serves until cancelled, then stops it."""
    port = await server.start()
    _write_ready(ready_file, port=port)
    try:
        await server.grpc.server.wait_for_termination()
    finally:
        await server.stop()


async def _run_prefill(args: argparse.Namespace) -> None:
    from prefill_service.server import PrefillServer

    config = instance_config(args, args.max_prefill_tokens, not args.no_prefix_cache)
    await _serve_until_stopped(PrefillServer(config, args.host, args.port), args.ready_file)


async def _run_decode(args: argparse.Namespace) -> None:
    from decode_service.server import DecodeServer

    config = instance_config(args, max(args.max_num_seqs, 256), False)
    server = DecodeServer(config, args.host, args.port, args.kv_port, args.advertise_host,
                          args.kv_transfer_timeout)
    await _serve_until_stopped(server, args.ready_file)


async def _until_signalled(coro, name: str) -> None:
    """Runs coro; SIGINT / SIGTERM cancel it, so its cleanup (finally blocks) runs."""
    task = asyncio.ensure_future(coro)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        logging.getLogger(name).info("%s stopped", name)


def run_until_signalled(coro, name: str) -> None:
    """Runs a server coroutine on uvloop (asyncio where uvloop is missing) until a signal."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(_until_signalled(coro, name))
    else:
        uvloop.run(_until_signalled(coro, name))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.command)
    if args.command == "serve":
        from engine.launcher import launch

        return launch(args)
    if args.command == "gateway":
        from gateway.server import main as gateway_main

        gateway_main(args)
        return 0
    _set_threads(args)
    runner = {"prefill": _run_prefill, "decode": _run_decode}[args.command]
    run_until_signalled(runner(args), args.command)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
