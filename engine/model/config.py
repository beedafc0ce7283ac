"""What the model code needs from a checkpoint directory's config.json, parsed once.

Parsing is torch-free (the CLI and gateway may read a config without importing torch); only
`resolve_dtype` touches torch, and imports it when called.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
)
_DTYPE_NAMES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
}


class ModelLoadError(Exception):
    """A checkpoint directory cannot be loaded; the message names the offending path."""


class UnsupportedArchitectureError(ModelLoadError):
    """config.json names an architecture this engine has no model code for."""


@dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters of one checkpoint, normalised across Llama/Mistral/Qwen.

    attention_bias: bias on q/k/v projections; o_proj_bias: bias on o_proj (Llama and Qwen3 tie
    it to attention_bias, Qwen2 has q/k/v bias only). rope_scaling is None for plain RoPE, else
    a dict with "rope_type" and that type's parameters (never rope_theta). sliding_window is None
    unless the checkpoint actually uses one. eos_token_ids is the union of config.json and
    generation_config.json, config.json's first.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    o_proj_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    torch_dtype: str | None = None
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    rope_scaling: dict[str, Any] | None = field(default=None, hash=False)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        """Reads config.json (required) and generation_config.json (optional).

        Raises ModelLoadError when the directory or config.json is missing or unreadable,
        UnsupportedArchitectureError for architectures outside SUPPORTED_ARCHITECTURES.
        """
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise ModelLoadError(f"model directory not found: {model_dir}")
        raw = _read_json(model_dir / "config.json", required=True)
        generation = _read_json(model_dir / "generation_config.json", required=False)
        try:
            return cls.from_dict(raw, generation)
        except UnsupportedArchitectureError as e:
            raise UnsupportedArchitectureError(f"{model_dir / 'config.json'}: {e}") from None
        except (KeyError, TypeError, ValueError) as e:
            raise ModelLoadError(f"{model_dir / 'config.json'}: invalid config ({e!r})") from e

    @classmethod
    def from_dict(cls, raw: dict[str, Any], generation: dict[str, Any] | None = None) -> ModelConfig:
        """Builds a config from parsed config.json (and generation_config.json) contents."""
        arch = _architecture(raw)
        if raw.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {raw['hidden_act']!r} is not supported (only silu)")
        num_heads = int(raw["num_attention_heads"])
        num_kv_heads = int(raw.get("num_key_value_heads") or num_heads)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_attention_heads {num_heads} not a multiple of "
                             f"num_key_value_heads {num_kv_heads}")
        qkv_bias, o_bias = _attention_biases(arch, raw)
        rope_theta, rope_scaling = _rope(raw)
        return cls(
            architecture=arch,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=int(raw["hidden_size"]),
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=_head_dim(arch, raw, num_heads),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=qkv_bias,
            o_proj_bias=o_bias,
            mlp_bias=arch == "LlamaForCausalLM" and bool(raw.get("mlp_bias", False)),
            qk_norm=arch == "Qwen3ForCausalLM",
            sliding_window=_sliding_window(arch, raw),
            torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
            eos_token_ids=_eos_ids(raw, generation or {}),
            bos_token_id=raw.get("bos_token_id", (generation or {}).get("bos_token_id")),
        )


def resolve_dtype(name: str, config: ModelConfig):
    """Maps "auto" | "float32" | "bfloat16" | "float16" (and fp32/bf16/fp16) to a torch.dtype.

    "auto" takes the checkpoint's torch_dtype, float32 when it names none. The requested dtype is
    kept as is on every device (no silent upcast on CPU). Raises ValueError for other names.
    """
    import torch

    key = (config.torch_dtype or "float32") if name == "auto" else name
    canonical = _DTYPE_NAMES.get(str(key).removeprefix("torch."))
    if canonical is None:
        raise ValueError(f"unsupported dtype {key!r}; use auto, float32, bfloat16 or float16")
    return getattr(torch, canonical)


def _read_json(path: Path, *, required: bool) -> dict[str, Any] | None:
    if not path.is_file():
        if required:
            raise ModelLoadError(f"config.json not found: {path}")
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e


def _architecture(raw: dict[str, Any]) -> str:
    names = raw.get("architectures") or []
    for name in names:
        if name in SUPPORTED_ARCHITECTURES:
            return name
    raise UnsupportedArchitectureError(
        f"architecture {names or raw.get('model_type')!r} is not supported; "
        f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")


def _head_dim(arch: str, raw: dict[str, Any], num_heads: int) -> int:
    if raw.get("head_dim"):
        return int(raw["head_dim"])
    if arch == "Qwen3ForCausalLM":
        return 128  # transformers' Qwen3Config default
    return int(raw["hidden_size"]) // num_heads


def _attention_biases(arch: str, raw: dict[str, Any]) -> tuple[bool, bool]:
    """(q/k/v bias, o_proj bias) as each architecture's modeling code builds them."""
    if arch == "Qwen2ForCausalLM":
        return True, False
    if arch == "MistralForCausalLM":
        return False, False
    flag = bool(raw.get("attention_bias", False))
    return flag, flag


def _rope(raw: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from either the transformers-4 keys (rope_theta,
    rope_scaling) or the transformers-5 `rope_parameters` dict."""
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if rope_type == "default":
        return theta, None
    if rope_type in ("llama3", "yarn", "longrope"):
        params.setdefault("original_max_position_embeddings",
                          raw.get("max_position_embeddings", 2048))
    return theta, {"rope_type": rope_type, **params}


def _sliding_window(arch: str, raw: dict[str, Any]) -> int | None:
    window = raw.get("sliding_window")
    if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM") and not raw.get("use_sliding_window"):
        return None
    if arch == "LlamaForCausalLM":
        return None
    return int(window) if window else None


def _eos_ids(raw: dict[str, Any], generation: dict[str, Any]) -> tuple[int, ...]:
    ids: list[int] = []
    for value in (raw.get("eos_token_id"), generation.get("eos_token_id")):
        for token_id in value if isinstance(value, list) else [value]:
            if token_id is not None and int(token_id) not in ids:
                ids.append(int(token_id))
    return tuple(ids)
