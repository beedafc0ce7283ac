"""Triton kernel: SwiGLU activation, silu(gate) * up, over the fused gate || up projection.

Contract: kernels.reference.silu_and_mul (float32 math, one rounding to x's dtype; its
docstring says how that differs in bfloat16 from the model's unfused `F.silu(gate) * up`).
Grid: one program per (row, BLOCK columns of the inner dimension), so any inner size works.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_MAX_BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_out, inner, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inner
    gate_ptr = x_ptr + row * stride_x + cols
    gate = tl.load(gate_ptr, mask=mask).to(tl.float32)
    up = tl.load(gate_ptr + inner, mask=mask).to(tl.float32)
    silu = gate / (1.0 + tl.exp(-gate))  # torch's formula
    tl.store(out_ptr + row * stride_out + cols, (silu * up).to(out_ptr.dtype.element_ty),
             mask=mask)


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * up for x = gate || up ([..., 2 * inner]); result [..., inner] in x's dtype.

    x needs unit stride in its last dimension. out: optional destination ([..., inner], x's
    dtype, viewable as [rows, inner]); allocated when None. Returns out.
    """
    assert x.shape[-1] % 2 == 0 and x.stride(-1) == 1
    inner = x.shape[-1] // 2
    if out is None:
        out = torch.empty((*x.shape[:-1], inner), dtype=x.dtype, device=x.device)
    assert out.shape == (*x.shape[:-1], inner) and out.dtype == x.dtype
    x_rows, out_rows = x.reshape(-1, 2 * inner), out.view(-1, inner)
    assert out_rows.stride(-1) == 1
    block = min(triton.next_power_of_2(inner), _MAX_BLOCK)
    _silu_and_mul_kernel[(x_rows.shape[0], triton.cdiv(inner, block))](
        x_rows, out_rows, x_rows.stride(0), out_rows.stride(0), inner, BLOCK=block)
    return out
