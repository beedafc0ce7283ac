"""Triton kernel: rotate-half rotary embedding of q and k, in place, from a cos/sin table.

Contract: kernels.reference.apply_rotary_cached, with the table from
kernels.reference.build_cos_sin_cache: [max_position, head_dim] float32, row p =
cos(p * inv_freq) || sin(p * inv_freq), inv_freq being RotaryEmbedding's (so plain, linear and
llama3-scaled RoPE all arrive here already folded into the table). The rotation covers the
whole head_dim (no partial rotary). One program per token reads its position from device memory
(no host sync), loads that table row once and rotates all of the token's q heads and k heads
as [heads, head_dim // 2] tiles: first' = first * cos - second * sin, second' = second * cos +
first * sin, in float32, rounded once to the input dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(x_ptr, stride_h, num_heads, cos, sin, half,
                  BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Rotate one token's heads in place; x_ptr points at its first head, cos/sin: [1, half]."""
    heads = tl.arange(0, BLOCK_H)[:, None]
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < num_heads) & (cols < half)
    first_ptr = x_ptr + heads * stride_h + cols
    first = tl.load(first_ptr, mask=mask).to(tl.float32)
    second = tl.load(first_ptr + half, mask=mask).to(tl.float32)
    dtype = x_ptr.dtype.element_ty
    tl.store(first_ptr, (first * cos - second * sin).to(dtype), mask=mask)
    tl.store(first_ptr + half, (second * cos + first * sin).to(dtype), mask=mask)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, pos_ptr, cache_ptr,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_cache,
                   num_heads, num_kv_heads, half,
                   BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    row_ptr = cache_ptr + tl.load(pos_ptr + token).to(tl.int64) * stride_cache
    cols = tl.arange(0, BLOCK_HALF)
    cos = tl.load(row_ptr + cols, mask=cols < half)[None, :]
    sin = tl.load(row_ptr + half + cols, mask=cols < half)[None, :]
    _rotate_heads(q_ptr + token * stride_qt, stride_qh, num_heads, cos, sin, half,
                  BLOCK_HQ, BLOCK_HALF)
    _rotate_heads(k_ptr + token * stride_kt, stride_kh, num_kv_heads, cos, sin, half,
                  BLOCK_HK, BLOCK_HALF)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                 cos_sin_cache: torch.Tensor) -> None:
    """Rotate q ([T, num_heads, head_dim]) and k ([T, num_kv_heads, head_dim]) in place at
    positions ([T] int32/int64, on the device) using cos_sin_cache (see the module docstring).

    q and k may be strided views (e.g. slices of a fused QKV output) but need unit stride in
    head_dim. Positions are not range-checked (that would sync with the host).
    """
    num_tokens, num_heads, head_dim = q.shape
    assert k.shape[0] == num_tokens and k.shape[2] == head_dim and head_dim % 2 == 0
    assert positions.shape == (num_tokens,)
    assert cos_sin_cache.dtype == torch.float32 and cos_sin_cache.shape[1] == head_dim
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and cos_sin_cache.stride(-1) == 1
    _rotary_kernel[(num_tokens,)](
        q, k, positions, cos_sin_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin_cache.stride(0),
        num_heads, k.shape[1], head_dim // 2,
        BLOCK_HQ=triton.next_power_of_2(num_heads), BLOCK_HK=triton.next_power_of_2(k.shape[1]),
        BLOCK_HALF=triton.next_power_of_2(head_dim // 2))
