"""Triton kernel: scatter a step's keys and values into the paged KV cache.

Contract: kernels.reference.write_kv_cache. One program per token copies all of that token's
K/V heads (a [num_kv_heads, head_dim] tile each) into its slot; a slot of -1 masks every load
and store, so padded batches need no host-side filtering and the launch is CUDA-graph
capturable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_cache_kernel(k_ptr, v_ptr, cache_ptr, slot_ptr,
                           stride_kt, stride_kh, stride_vt, stride_vh,
                           stride_block, stride_kv, stride_slot, stride_head,
                           block_size, num_kv_heads, head_dim,
                           BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    # none for a padding token (folded into the head bound: and-ing the scalar `slot >= 0`
    # into a 2-D mask breaks masked loads in Triton's interpreter)
    heads_to_write = tl.where(slot >= 0, num_kv_heads, 0)
    mask = (heads < heads_to_write) & (dims < head_dim)
    k = tl.load(k_ptr + token * stride_kt + heads * stride_kh + dims, mask=mask)
    v = tl.load(v_ptr + token * stride_vt + heads * stride_vh + dims, mask=mask)
    dst = (cache_ptr + (slot // block_size) * stride_block + (slot % block_size) * stride_slot
           + heads * stride_head + dims)
    tl.store(dst, k.to(cache_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + stride_kv, v.to(cache_ptr.dtype.element_ty), mask=mask)


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Write k and v ([T, num_kv_heads, head_dim]) at slot_mapping ([T] int32/int64 flat slots,
    -1 = padding, written nowhere) into kv_layer ([num_blocks, 2, block_size, num_kv_heads,
    head_dim]), cast to kv_layer's dtype. Mutates kv_layer; slots not named stay untouched.

    k and v may be strided views (e.g. slices of a fused QKV output) but need unit stride in
    head_dim, as does kv_layer. Slots are not range-checked (that would sync with the host).
    """
    num_tokens, num_kv_heads, head_dim = k.shape
    assert v.shape == k.shape and kv_layer.shape[3:] == (num_kv_heads, head_dim)
    assert slot_mapping.shape == (num_tokens,)
    assert k.stride(-1) == 1 and v.stride(-1) == 1 and kv_layer.stride(-1) == 1
    _write_kv_cache_kernel[(num_tokens,)](
        k, v, kv_layer, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kv_layer.stride(0), kv_layer.stride(1), kv_layer.stride(2), kv_layer.stride(3),
        kv_layer.shape[2], num_kv_heads, head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim))
