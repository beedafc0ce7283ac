"""The engine a benchmark drives, built as the tiers build it (`build_engine_parts`), and the
one step loop the in-process modes share:

    scheduler.schedule() -> runner.execute(output.chunks) -> scheduler.update_from_output(...)

plus model resolution (a directory, or a bundled config for `--load-format dummy`), KV-cache
sizing on a GPU, and device synchronisation before clocks are read.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.instance import EngineParts, InstanceConfig, build_engine_parts
from engine.model import ModelConfig, resolve_dtype
from engine.request import Request, RequestStatus
from engine.scheduler import SchedulerOutput

logger = logging.getLogger("engine.bench")

BUNDLED_MODELS_DIR = Path(__file__).resolve().parent / "models"


def bundled_model_names() -> list[str]:
    return sorted(p.name for p in BUNDLED_MODELS_DIR.iterdir() if (p / "config.json").is_file())


def resolve_model(spec: str | None) -> tuple[Path, str]:
    """(model directory, default load format) for --model: an existing directory ("auto":
    read its weights), a bundled config name ("dummy": it has no weights), or None for the
    built-in default model."""
    if spec is None:
        from engine.model.checkpoint import build_random_model

        return build_random_model(), "auto"
    path = Path(spec)
    if path.is_dir():
        return path.resolve(), "auto"
    if spec in bundled_model_names():
        return BUNDLED_MODELS_DIR / spec, "dummy"
    raise ValueError(f"--model {spec!r} is neither a directory nor a bundled config "
                     f"({', '.join(bundled_model_names())})")


def resolve_device(name: str) -> str:
    """'auto' is cuda when a GPU is visible, else cpu."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def synchronize(device: torch.device) -> None:
    """Waits for queued device work, so that a host clock read after it covers that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release_device_memory(device: torch.device) -> None:
    """Collects garbage and returns cached, unused device memory to the driver."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@dataclass(frozen=True)
class EngineSpec:
    """What `build_engine` needs; the bench CLI fills it from its flags."""

    model_dir: Path
    load_format: str
    dtype: str
    device: str
    attention_backend: str
    block_size: int
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int | None
    num_kv_blocks: int | None
    kv_cache_memory: int | None  # bytes; None: gpu_memory_utilization on CUDA, else CPU_KV_CACHE
    gpu_memory_utilization: float
    enforce_eager: bool = False  # no CUDA graphs for decode steps
    torch_threads: int | None = None  # CPU threads for torch ops; None: torch's default


CPU_KV_CACHE = 256 * 2**20  # the tiers' default --kv-cache-memory


def spec_from_args(args, max_num_seqs: int | None = None) -> EngineSpec:
    """The EngineSpec of the bench CLI's engine flags (max_num_seqs overrides --max-num-seqs)."""
    from engine.kv_cache import parse_size

    model_dir, default_format = resolve_model(args.model)
    return EngineSpec(
        model_dir=model_dir, load_format=args.load_format or default_format, dtype=args.dtype,
        device=resolve_device(args.device), attention_backend=args.attention_backend,
        block_size=args.block_size, max_num_seqs=max_num_seqs or args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
        num_kv_blocks=args.num_kv_blocks,
        kv_cache_memory=parse_size(args.kv_cache_memory) if args.kv_cache_memory else None,
        gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.enforce_eager,
        torch_threads=args.torch_threads)


def build_engine(spec: EngineSpec) -> EngineParts:
    """Loads the model and allocates the KV cache (prefix cache on, as the tiers run). Sets
    torch's thread count (process-wide) when the spec gives one."""
    if spec.torch_threads:
        torch.set_num_threads(spec.torch_threads)
    kv_cache_memory = spec.kv_cache_memory
    if kv_cache_memory is None:
        sized_by_gpu = torch.device(spec.device).type == "cuda" and spec.num_kv_blocks is None
        kv_cache_memory = gpu_kv_cache_bytes(spec) if sized_by_gpu else CPU_KV_CACHE
    config = InstanceConfig(
        model_dir=spec.model_dir, served_model_name=spec.model_dir.name, dtype=spec.dtype,
        device=spec.device, block_size=spec.block_size, kv_cache_memory=kv_cache_memory,
        num_kv_blocks=spec.num_kv_blocks, max_num_batched_tokens=spec.max_num_batched_tokens,
        max_num_seqs=spec.max_num_seqs, max_model_len=spec.max_model_len,
        attention_backend=spec.attention_backend, load_format=spec.load_format,
        enforce_eager=spec.enforce_eager)
    return build_engine_parts(config, kv_from_remote=False)


def engine_facts(spec: EngineSpec, parts: EngineParts) -> dict[str, Any]:
    """What the engine ran with, as built (for the JSON)."""
    model = parts.runner.model
    attention = model.model.layers[0].self_attn.attn_backend
    return {"model_dir": str(spec.model_dir), "model": spec.model_dir.name,
            "architecture": parts.model_config.architecture, "load_format": spec.load_format,
            "dtype": parts.layout.dtype, "device": spec.device,
            "attention_backend": getattr(attention, "name", type(attention).__name__),
            "cuda_graph_batch_sizes": sorted({b for b, _ in parts.runner.graphs}),
            "cuda_graph_query_lens": sorted({q for _, q in parts.runner.graphs}),
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "weight_bytes": parameter_bytes(model), "block_size": parts.layout.block_size,
            "num_kv_blocks": parts.scheduler.pool.num_blocks,
            "kv_cache_bytes": parts.scheduler.pool.num_blocks * parts.layout.bytes_per_block,
            "max_model_len": parts.max_model_len, "max_num_seqs": spec.max_num_seqs,
            "max_num_batched_tokens": spec.max_num_batched_tokens}


def gpu_kv_cache_bytes(spec: EngineSpec) -> int:
    """KV budget on a GPU, before the model is loaded: utilization x total memory, less what is
    already in use (other processes, the CUDA context) and less the weights (parameter count x
    dtype size, from the config). The remaining (1 - utilization) share is the headroom for
    activations and the allocator."""
    device = torch.device(spec.device)
    free, total = torch.cuda.mem_get_info(device)
    weights = parameter_bytes(meta_model(spec.model_dir, spec.dtype))
    budget = int(spec.gpu_memory_utilization * total) - (total - free) - weights
    if budget <= 0:
        raise ValueError(f"no GPU memory left for the KV cache: {total / 2**30:.1f} GiB x "
                         f"{spec.gpu_memory_utilization} - {(total - free) / 2**30:.1f} GiB in "
                         f"use - {weights / 2**30:.1f} GiB of weights; raise "
                         "--gpu-memory-utilization")
    logger.info("KV cache budget %.2f GiB (%.2f of %.1f GiB, %.1f GiB in use, %.1f GiB of weights)",
                budget / 2**30, spec.gpu_memory_utilization, total / 2**30,
                (total - free) / 2**30, weights / 2**30)
    return budget


def meta_model(model_dir: Path, dtype: str) -> torch.nn.Module:
    """The model's module tree on the meta device (shapes and dtypes, no memory)."""
    from engine.attention import TorchAttentionBackend
    from engine.model.llama import CausalLM

    config = ModelConfig.from_dir(model_dir)
    with torch.device("meta"):
        return CausalLM(config, TorchAttentionBackend()).to(resolve_dtype(dtype, config))


def parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters, a tied (shared) tensor counted once."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


# the step loop
def step(parts: EngineParts) -> tuple[SchedulerOutput, list[Request]]:
    """Runs one engine step; frees the blocks of the requests it finished and returns them.
    Raises RuntimeError when a request's sampling fails (a benchmark must not go on silently)."""
    scheduler = parts.scheduler
    output = scheduler.schedule()
    result = parts.runner.execute(output.chunks)
    if result.failed:
        raise RuntimeError(f"sampling failed during the benchmark: {result.failed}")
    finished = scheduler.update_from_output(output, result.sampled)
    for request in finished:
        scheduler.free_blocks(request)
    return output, finished


def abort_all(parts: EngineParts, requests: list[Request]) -> None:
    """Finishes the unfinished ones among `requests` and frees every block they hold."""
    for request in requests:
        if not request.status.finished:
            parts.scheduler.finish(request, RequestStatus.FINISHED_ABORTED)
        if request.block_ids:
            parts.scheduler.free_blocks(request)
