"""Builds a CausalLM from a Hugging Face style checkpoint directory (safetensors only).

The model is constructed on the meta device, then every parameter is replaced by the tensor
read from the checkpoint (already on the target device and in the target dtype), so weights
are materialised exactly once.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from safetensors import safe_open

from engine.attention import AttentionBackend, TorchAttentionBackend
from engine.model.config import ModelConfig, ModelLoadError, resolve_dtype
from engine.model.llama import CausalLM

logger = logging.getLogger("engine.model")

_SINGLE_FILE = "model.safetensors"
_INDEX_FILE = "model.safetensors.index.json"
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # stored by some old Llama checkpoints


LOAD_FORMATS = ("auto", "dummy")
DUMMY_WEIGHT_RANGE = 1e-3  # dummy weights ~ U(-r, r), as vLLM's --load-format dummy


def load_model(model_dir: str | Path, dtype: str = "auto", device: str | torch.device = "cpu",
               attn_backend: AttentionBackend | None = None,
               load_format: str = "auto") -> tuple[CausalLM, ModelConfig]:
    """Loads config and weights; returns the model in eval mode on `device` in `dtype`.

    dtype: "auto" (the checkpoint's torch_dtype) | "float32" | "bfloat16" | "float16".
    load_format: "auto" reads the safetensors weights; "dummy" needs only config.json and
    fills every weight with seeded random values of the right shape on `device` (for
    benchmarks: a Llama-3.1-8B config runs without its 16 GB of weights).
    attn_backend defaults to TorchAttentionBackend. With tie_word_embeddings, lm_head shares
    the embedding weight (a stored lm_head.weight is ignored, as in transformers).
    Raises ModelLoadError for a missing directory, config or weight file, for missing,
    unexpected or mis-shaped tensors, and for unsupported settings (e.g. the rope type).
    """
    start = time.perf_counter()
    model_dir = Path(model_dir)
    config = ModelConfig.from_dir(model_dir)
    torch_dtype = resolve_dtype(dtype, config)
    try:
        with torch.device("meta"):
            model = CausalLM(config, attn_backend or TorchAttentionBackend())
    except ValueError as e:
        raise ModelLoadError(f"{model_dir}: {e}") from e
    if load_format not in LOAD_FORMATS:
        raise ModelLoadError(f"unknown load format {load_format!r}; choose from {LOAD_FORMATS}")
    if load_format == "dummy":
        tensors = _dummy_tensors(model, config, torch.device(device), torch_dtype)
    else:
        tensors = _read_tensors(model_dir, torch.device(device), torch_dtype)
    _check_tensors(model, tensors, config, model_dir)
    model.load_state_dict(tensors, strict=False, assign=True)
    del tensors  # the model holds them now (fusing below then frees the unfused parts)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    if model.model.ops.fused_projections:
        model.fuse_projections()
    model.to(device)  # moves the non-persistent buffers (rotary inv_freq)
    model.eval().requires_grad_(False)
    _log_loaded(model, model_dir, torch_dtype, time.perf_counter() - start)
    if config.sliding_window is not None and config.sliding_window < config.max_position_embeddings:
        logger.warning("%s uses a %d-token sliding window, which attention does not implement: "
                       "outputs past that context length differ from the reference",
                       model_dir, config.sliding_window)
    return model, config


def weight_files(model_dir: Path) -> list[Path]:
    """The checkpoint's safetensors files: the single file, or the shards named by the index."""
    single, index = model_dir / _SINGLE_FILE, model_dir / _INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise ModelLoadError(f"cannot read weight index {index}: {e!r}") from e
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
    elif single.is_file():
        files = [single]
    else:
        raise ModelLoadError(f"no weights in {model_dir}: expected {_SINGLE_FILE} or {_INDEX_FILE}")
    for path in files:
        if not path.is_file():
            raise ModelLoadError(f"weight shard not found: {path}")
    return files


def _read_tensors(model_dir: Path, device: torch.device,
                  dtype: torch.dtype) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in weight_files(model_dir):
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for name in f.keys():
                if name.endswith(_IGNORED_SUFFIXES):
                    continue
                tensor = f.get_tensor(name)
                tensors[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return tensors


def _dummy_tensors(model: CausalLM, config: ModelConfig, device: torch.device,
                   dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Seeded U(-r, r) weights (norm weights 1) of the model's shapes, made on `device`."""
    generator = torch.Generator(device=device).manual_seed(0)
    tensors = {}
    for name, param in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        tensor = torch.empty(param.shape, dtype=dtype, device=device)
        if name.endswith("norm.weight"):
            tensor.fill_(1.0)
        else:
            tensor.uniform_(-DUMMY_WEIGHT_RANGE, DUMMY_WEIGHT_RANGE, generator=generator)
        tensors[name] = tensor
    return tensors


def _check_tensors(model: CausalLM, tensors: dict[str, torch.Tensor], config: ModelConfig,
                   model_dir: Path) -> None:
    """Raises ModelLoadError unless the checkpoint holds exactly the model's tensors."""
    expected = {name: p.shape for name, p in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
        tensors.pop("lm_head.weight", None)
    missing = sorted(expected.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - expected.keys())
    wrong_shape = sorted(f"{name} {tuple(tensors[name].shape)} != {tuple(shape)}"
                         for name, shape in expected.items()
                         if name in tensors and tensors[name].shape != shape)
    problems = []
    for label, names in (("missing", missing), ("unexpected", unexpected),
                         ("wrong shape", wrong_shape)):
        if names:
            problems.append(f"{label} tensors ({len(names)}): {', '.join(names[:20])}"
                            + (" ..." if len(names) > 20 else ""))
    if problems:
        raise ModelLoadError(f"checkpoint {model_dir} does not match {config.architecture}: "
                             + "; ".join(problems))


def _log_loaded(model: CausalLM, model_dir: Path, dtype: torch.dtype, seconds: float) -> None:
    params = list(model.parameters())  # a tied weight is listed once
    num_params = sum(p.numel() for p in params)
    num_bytes = sum(p.numel() * p.element_size() for p in params)
    logger.info("loaded %s (%s, %s): %.2fM params, %.1f MiB in %.2fs", model_dir,
                model.config.architecture, dtype, num_params / 1e6, num_bytes / 2**20, seconds)
