"""Triton kernels: RMSNorm, and RMSNorm fused with the residual add before it.

Contracts: kernels.reference.rms_norm and kernels.reference.fused_add_rms_norm. One program
per row holds the whole row in registers (BLOCK = next power of two >= hidden size, masked),
so any hidden size works and each row is read once.

Dtype rules, as in the references (the Llama convention): the mean of squares and the scaling
run in float32; the normalized row is rounded to x's dtype before the weight multiplies it; the
result has dtype torch.promote_types(x.dtype, weight.dtype) (the model dtype when the weight
has been cast with the model). The weight product itself is exact in float32 for 16-bit
inputs, so it rounds exactly as torch's does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _scale_and_store(x, w_ptr, out_ptr, cols, mask, n_cols, eps, X_DTYPE: tl.constexpr):
    """x: a float32 row (zero where masked). Stores weight * rms_normalized(x) to out_ptr."""
    inv_rms = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    normed = (x * inv_rms).to(X_DTYPE).to(tl.float32)
    weight = tl.load(w_ptr + cols, mask=mask).to(tl.float32)
    tl.store(out_ptr + cols, (weight * normed).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, stride_x, stride_out, n_cols, eps,
                     BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    _scale_and_store(x, w_ptr, out_ptr + row * stride_out, cols, mask, n_cols, eps,
                     x_ptr.dtype.element_ty)


@triton.jit
def _fused_add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
                               stride_x, stride_res, stride_out, stride_res_out, n_cols, eps,
                               BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    res = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0).to(tl.float32)
    summed = (x + res).to(x_ptr.dtype.element_ty)  # rounded as torch's x + residual rounds
    tl.store(res_out_ptr + row * stride_res_out + cols, summed, mask=mask)
    _scale_and_store(summed.to(tl.float32), w_ptr, out_ptr + row * stride_out, cols, mask,
                     n_cols, eps, x_ptr.dtype.element_ty)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as [rows, hidden] (a view when possible, else a copy), with unit stride in hidden."""
    assert t.stride(-1) == 1, "the hidden dimension must have unit stride"
    return t.reshape(-1, t.shape[-1])


def _launch_config(hidden: int) -> dict[str, int]:
    block = triton.next_power_of_2(hidden)
    return {"BLOCK": block, "num_warps": min(max(block // 256, 1), 8)}


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm of x ([..., hidden]) by weight ([hidden]); see the module docstring for dtypes.

    out: optional destination of x's shape and the result dtype, viewable as [rows, hidden];
    allocated when None. Returns out.
    """
    hidden = x.shape[-1]
    assert weight.shape == (hidden,) and weight.is_contiguous()
    dtype = torch.promote_types(x.dtype, weight.dtype)
    if out is None:
        out = torch.empty(x.shape, dtype=dtype, device=x.device)
    assert out.shape == x.shape and out.dtype == dtype
    x_rows, out_rows = _rows(x), out.view(-1, hidden)
    assert out_rows.stride(-1) == 1
    _rms_norm_kernel[(x_rows.shape[0],)](
        x_rows, weight, out_rows, x_rows.stride(0), out_rows.stride(0), hidden, eps,
        **_launch_config(hidden))
    return out


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) in one pass; x, residual: [..., hidden], same
    dtype. The sum is rounded to that dtype before the norm, as the unfused code does. Both
    results are new contiguous tensors of x's shape; the inputs are not modified.
    """
    hidden = x.shape[-1]
    assert residual.shape == x.shape and residual.dtype == x.dtype
    assert weight.shape == (hidden,) and weight.is_contiguous()
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    residual_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    x_rows, res_rows = _rows(x), _rows(residual)
    out_rows, res_out_rows = out.view(-1, hidden), residual_out.view(-1, hidden)
    _fused_add_rms_norm_kernel[(x_rows.shape[0],)](
        x_rows, res_rows, weight, out_rows, res_out_rows,
        x_rows.stride(0), res_rows.stride(0), out_rows.stride(0), res_out_rows.stride(0),
        hidden, eps, **_launch_config(hidden))
    return out, residual_out
