"""The model's non-attention kernels, chosen with the attention backend: RMSNorm (fused with the
residual add), rotary embedding and SwiGLU.

    TorchOps   the references in kernels/reference.py, computed exactly as transformers does
               (rotary cos/sin rounded to the model dtype): token-identical to it in every dtype.
    TritonOps  the Triton kernels in kernels/ (fp32 math, one rounding) and fused q/k/v and
               gate/up projections: identical in float32 up to matmul rounding; in bfloat16
               rotary and SwiGLU may differ from transformers by one ulp on some elements
               (kernels/reference.py says why), so logits agree within a tolerance.

Rotary inputs are prepared once per step (`rotary_inputs`) and used by every layer.
Nothing here synchronizes with the host, so a step can be captured in a CUDA graph.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F

from kernels import reference


class KernelOps(Protocol):
    name: str

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor: ...

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(rms_norm(x + residual), x + residual)."""

    def rotary_inputs(self, rotary_emb: Any, positions: torch.Tensor, dtype: torch.dtype) -> Any:
        """What `apply_rotary` needs for this step's positions (computed once per step)."""

    def apply_rotary(self, q: torch.Tensor, k: torch.Tensor,
                     rope: Any) -> tuple[torch.Tensor, torch.Tensor]: ...

    def silu_mul(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor: ...

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up for gate_up = gate || up (a fused gate/up projection's output)."""

    fused_projections: bool  # whether the model fuses q/k/v and gate/up (CausalLM.fuse_projections)


class TorchOps:
    name = "torch"
    fused_projections = False  # the checkpoint's own layout, as transformers computes it

    def rms_norm(self, x, weight, eps):
        return reference.rms_norm(x, weight, eps)

    def add_rms_norm(self, x, residual, weight, eps):
        return reference.fused_add_rms_norm(x, residual, weight, eps)

    def rotary_inputs(self, rotary_emb, positions, dtype):
        return rotary_emb(positions, dtype)  # (cos, sin) in the model dtype, as transformers

    def apply_rotary(self, q, k, rope):
        cos, sin = rope
        return reference.apply_rotary(q, cos, sin), reference.apply_rotary(k, cos, sin)

    def silu_mul(self, gate, up):
        return F.silu(gate) * up

    def silu_and_mul(self, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


class TritonOps:
    name = "triton"
    fused_projections = True  # one qkv and one gate_up matmul a layer

    def __init__(self) -> None:
        from kernels import activation, norm, rotary
        self._norm, self._rotary, self._activation = norm, rotary, activation
        self._cos_sin: dict[tuple[int, torch.device], torch.Tensor] = {}

    def rms_norm(self, x, weight, eps):
        return self._norm.rms_norm(x, weight, eps)

    def add_rms_norm(self, x, residual, weight, eps):
        return self._norm.fused_add_rms_norm(x, residual, weight, eps)

    def rotary_inputs(self, rotary_emb, positions, dtype):
        return positions, self.cos_sin_cache(rotary_emb)

    def cos_sin_cache(self, rotary_emb) -> torch.Tensor:
        """The [max_position, head_dim] float32 table of rotary_emb, built once on its device."""
        key = (id(rotary_emb), rotary_emb.inv_freq.device)
        if key not in self._cos_sin:
            self._cos_sin[key] = reference.build_cos_sin_cache(rotary_emb.inv_freq,
                                                               rotary_emb.max_position)
        return self._cos_sin[key]

    def apply_rotary(self, q, k, rope):
        positions, cache = rope
        self._rotary.apply_rotary(q, k, positions, cache)  # in place; strided views are fine
        return q, k

    def silu_mul(self, gate, up):
        return F.silu(gate) * up

    def silu_and_mul(self, gate_up):
        return self._activation.silu_and_mul(gate_up)
