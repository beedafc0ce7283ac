"""Start-up shared by the prefill and decode tiers: load the model, size the KV cache from a
memory budget, build the scheduler and runner, and serve `tandem.v1.Instance`."""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, NamedTuple

import torch

from engine.block_pool import BlockPool
from engine.errors import InvalidRequestError
from engine.grpc_server import map_errors
from engine.kv_cache import KVLayout, allocate_kv_cache, dtype_name, num_blocks_for_budget
from engine.model import ModelConfig, load_model
from engine.model_runner import ModelRunner, RunnerConfig
from engine.scheduler import Scheduler, SchedulerConfig
from engine.structured import GrammarCache
from engine.tokenizer import TOKENIZER_FILES, Tokenizer
from protos.tandem.v1 import instance_pb2, instance_pb2_grpc

logger = logging.getLogger("engine")

TOKENIZER_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class InstanceConfig:
    """Flags of one prefill or decode instance, fixed at start-up."""

    model_dir: Path
    served_model_name: str
    dtype: str = "auto"
    device: str = "cpu"
    block_size: int = 16
    kv_cache_memory: int = 256 * 2**20
    num_kv_blocks: int | None = None
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    max_model_len: int | None = None
    enable_prefix_cache: bool = True
    attention_backend: str = "auto"  # "auto": triton on CUDA, the torch reference elsewhere
    load_format: str = "auto"  # "dummy": random weights from config.json alone (benchmarks)
    enforce_eager: bool = False  # no CUDA graphs
    tokenizer_dir: Path | None = None  # --tokenizer; None: the model directory's

    @property
    def tokenizer_path(self) -> Path:
        """Where the tokenizer files are: --tokenizer, else the model directory."""
        return Path(self.tokenizer_dir or self.model_dir)


class EngineParts(NamedTuple):
    """What start-up found and built (run-time values, kept out of InstanceConfig)."""

    model_config: ModelConfig
    layout: KVLayout
    max_model_len: int
    scheduler: Scheduler
    runner: ModelRunner

    def check_prompt(self, prompt_token_ids: list[int]) -> None:
        """Raises InvalidRequestError unless the prompt is non-empty, below the context length
        and within the vocabulary."""
        if not prompt_token_ids:
            raise InvalidRequestError("prompt_token_ids is empty")
        if len(prompt_token_ids) >= self.max_model_len:
            raise InvalidRequestError(f"prompt has {len(prompt_token_ids)} tokens; the limit is "
                                      f"{self.max_model_len - 1}")
        vocab = self.model_config.vocab_size
        if max(prompt_token_ids) >= vocab:
            raise InvalidRequestError(f"token id {max(prompt_token_ids)} >= vocab size {vocab}")


def resolve_max_model_len(config: InstanceConfig, model_config: ModelConfig,
                           pool_tokens: int) -> int:
    """The context length served: --max-model-len, else the model's (capped at a sliding
    window), and never more than one sequence the KV pool can hold (`pool_tokens`).

    An explicit --max-model-len beyond the model or the pool is an error; the model's own
    length beyond the pool is lowered with a warning, so that every admitted request fits."""
    limit = model_config.max_position_embeddings
    if model_config.sliding_window:
        limit = min(limit, model_config.sliding_window)  # attention is exact below the window
    if config.max_model_len is not None:
        if config.max_model_len > limit:
            raise ValueError(f"--max-model-len {config.max_model_len} exceeds the model's {limit}")
        if config.max_model_len > pool_tokens:
            raise ValueError(f"--max-model-len {config.max_model_len} does not fit the KV cache, "
                             f"which holds {pool_tokens} tokens: raise --kv-cache-memory (or "
                             "--num-kv-blocks) or lower --max-model-len")
        return config.max_model_len
    if limit > pool_tokens:
        logger.warning("max model len lowered from the model's %d to %d tokens, what the KV cache "
                       "holds; raise --kv-cache-memory to serve longer sequences", limit,
                       pool_tokens)
        return pool_tokens
    return limit


def attention_backend_name(config: InstanceConfig, device: torch.device) -> str:
    """--attention-backend, where "auto" is triton on CUDA and the torch reference elsewhere."""
    if config.attention_backend != "auto":
        return config.attention_backend
    return "triton" if device.type == "cuda" else "torch"


def build_engine_parts(config: InstanceConfig, kv_from_remote: bool,
                       graph_query_lens: tuple[int, ...] = (1,)) -> EngineParts:
    """Loads the model and allocates the KV cache. Blocking; logs what it found.
    `graph_query_lens`: the runner's CUDA graphs (1: decode; k + 1 too when speculating)."""
    from engine.attention import get_attention_backend

    started = time.monotonic()
    device = torch.device(config.device)
    backend = attention_backend_name(config, device)
    model, model_config = load_model(config.model_dir, dtype=config.dtype, device=device,
                                     attn_backend=get_attention_backend(backend),
                                     load_format=config.load_format)
    layout = kv_layout(config, model, model_config)
    num_blocks = config.num_kv_blocks or num_blocks_for_budget(layout, config.kv_cache_memory)
    max_model_len = resolve_max_model_len(config, model_config, num_blocks * config.block_size)
    kv_cache = allocate_kv_cache(layout, num_blocks, device)
    pool = BlockPool(num_blocks, enable_prefix_cache=config.enable_prefix_cache and not kv_from_remote)
    sched_config = SchedulerConfig(max_num_batched_tokens=config.max_num_batched_tokens,
                                   max_num_seqs=config.max_num_seqs, block_size=config.block_size,
                                   max_model_len=max_model_len, kv_from_remote=kv_from_remote)
    scheduler = Scheduler(sched_config, pool, frozenset(model_config.eos_token_ids))
    logger.info("loaded %s (%s, %s) in %.1f s; KV cache %d blocks x %d tokens = %.1f MiB; "
                "max model len %d", config.served_model_name, model_config.architecture,
                layout.dtype, time.monotonic() - started, num_blocks, layout.block_size,
                num_blocks * layout.bytes_per_block / 2**20, max_model_len)
    return EngineParts(model_config, layout, max_model_len, scheduler, ModelRunner(
        model, kv_cache, runner_config(config, max_model_len, backend, graph_query_lens), device))


def kv_layout(config: InstanceConfig, model: torch.nn.Module,
              model_config: ModelConfig) -> KVLayout:
    """The KV cache layout of `model` (its dtype and shapes) with the instance's block size."""
    return KVLayout(dtype=dtype_name(next(model.parameters()).dtype),
                    block_size=config.block_size, num_layers=model_config.num_layers,
                    num_kv_heads=model_config.num_kv_heads, head_dim=model_config.head_dim)


def runner_config(config: InstanceConfig, max_model_len: int, backend: str,
                  graph_query_lens: tuple[int, ...] = (1,)) -> RunnerConfig:
    """The runner's sizes from the instance's flags; CUDA graphs (of `graph_query_lens` tokens
    per sequence) with the triton backend unless --enforce-eager."""
    return RunnerConfig(block_size=config.block_size, max_num_seqs=config.max_num_seqs,
                        max_num_tokens=config.max_num_batched_tokens,
                        max_model_len=max_model_len,
                        cuda_graphs=not config.enforce_eager and backend == "triton",
                        graph_query_lens=graph_query_lens)


def grammar_cache(parts: EngineParts, tokenizer: Tokenizer) -> GrammarCache:
    """The tier's structured-output grammars, over the model's vocabulary (which may be larger
    than the tokenizer's) with the model's EOS ids as the tokens that end a complete grammar."""
    mc = parts.model_config
    return GrammarCache(tokenizer, mc.vocab_size, mc.eos_token_ids)


def new_instance_id(role: str) -> str:
    return f"{role}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class InstanceServicer(instance_pb2_grpc.InstanceServicer):
    """tandem.v1.Instance: describes this instance and serves its tokenizer files."""

    def __init__(self, info: instance_pb2.InstanceInfo, config: InstanceConfig,
                 scheduler: Scheduler):
        self._info = info
        self._tokenizer_dir = config.tokenizer_path
        self._scheduler = scheduler

    @map_errors
    async def GetInstanceInfo(self, request, context) -> instance_pb2.InstanceInfo:
        info = instance_pb2.InstanceInfo()
        info.CopyFrom(self._info)
        scheduler = self._scheduler  # counters read without the engine thread: a snapshot
        info.num_free_kv_blocks = scheduler.pool.num_free_blocks
        info.num_running_requests = len(scheduler.running) + len(scheduler.waiting_for_kv)
        info.num_waiting_requests = len(scheduler.waiting)
        return info

    @map_errors
    async def GetTokenizer(self, request, context) -> AsyncIterator[instance_pb2.TokenizerFileChunk]:
        for name in TOKENIZER_FILES:
            path = self._tokenizer_dir / name
            if not path.exists():
                continue
            data = path.read_bytes()
            for start in range(0, max(len(data), 1), TOKENIZER_CHUNK_BYTES):
                yield instance_pb2.TokenizerFileChunk(
                    file_name=name, data=data[start:start + TOKENIZER_CHUNK_BYTES])


def instance_info(role: int, config: InstanceConfig, parts: EngineParts,
                  kv_transfer_address: str = "") -> instance_pb2.InstanceInfo:
    mc = parts.model_config
    return instance_pb2.InstanceInfo(
        role=role, instance_id=new_instance_id(instance_pb2.Role.Name(role).removeprefix("ROLE_").lower()),
        model_name=config.served_model_name, architecture=mc.architecture,
        max_model_len=parts.max_model_len, vocab_size=mc.vocab_size,
        eos_token_ids=list(mc.eos_token_ids), kv_layout=parts.layout.to_pb(),
        kv_transfer_address=kv_transfer_address, num_kv_blocks=parts.scheduler.pool.num_blocks)
