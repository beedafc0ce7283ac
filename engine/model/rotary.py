"""Rotary position embedding: inverse frequencies and per-step cos/sin.

inv_freq is computed in float32 with exactly the operations transformers uses
(`modeling_rope_utils`), so cos/sin match it bit for bit; cos/sin are computed per step from
the step's positions (a [T, head_dim] product), which needs no cache sized by the context limit.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def compute_inv_freq(head_dim: int, rope_theta: float,
                     rope_scaling: dict[str, Any] | None) -> torch.Tensor:
    """[head_dim // 2] float32 inverse frequencies on the CPU.

    rope_scaling: None (plain RoPE) or a dict with "rope_type" in SUPPORTED_ROPE_TYPES and that
    type's parameters. Raises ValueError for any other rope type.
    """
    rope_type = (rope_scaling or {}).get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope_type {rope_type!r} is not supported; "
                         f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    # explicit device: the model may be built under a meta-device context
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (rope_theta ** exponents)
    if rope_type == "linear":
        return inv_freq / rope_scaling["factor"]
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, rope_scaling)
    return inv_freq


def _llama3_inv_freq(inv_freq: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1 frequency scaling: long wavelengths divided by `factor`, short ones kept, the
    band between interpolated smoothly."""
    factor = params["factor"]
    low_freq_factor = params["low_freq_factor"]
    high_freq_factor = params["high_freq_factor"]
    old_context_len = params["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor

    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Holds inv_freq as a float32, non-persistent buffer (never in a checkpoint).

    Move the model with `.to(device)` only: casting the whole module to a lower precision
    would round inv_freq too. The loader never does that.
    """

    def __init__(self, head_dim: int, rope_theta: float, rope_scaling: dict[str, Any] | None,
                 max_position: int = 0):
        super().__init__()
        self.max_position = max_position  # positions a cos/sin table must cover (TritonOps)
        self.register_buffer("inv_freq", compute_inv_freq(head_dim, rope_theta, rope_scaling),
                             persistent=False)

    def forward(self, positions: torch.Tensor,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [T] long. Returns (cos, sin), each [T, head_dim] in `dtype`."""
        freqs = positions.float().unsqueeze(-1) * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)
