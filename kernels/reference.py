"""Torch reference implementations of the paged-KV operations.

These are the contracts the Triton kernels must match. Shapes:

    kv_layer:      [num_blocks, 2, block_size, num_kv_heads, head_dim]   (index 0 = K, 1 = V)
    slot_mapping:  [num_new_tokens]  flat slot = block_id * block_size + offset_in_block;
                   -1 marks a padding token whose K/V is not written
    block_tables:  [num_seqs, max_blocks_per_seq] int32, rows padded with 0
    seq_lens:      [num_seqs]  tokens in context after this step's tokens are written
    query_start_loc: [num_seqs + 1]  prefix sums of the per-sequence query lengths

A sequence's queries are its last `query_len` positions, so one call serves a prompt chunk
(many queries, maybe after a prefix-cache hit), a decode step (one query) and, later,
speculative verification (a few queries).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Scatter new keys/values ([T, num_kv_heads, head_dim]) into their slots. Mutates kv_layer.

    Values are cast to kv_layer's dtype. Tokens whose slot is -1 (padding, e.g. a batch padded
    to a captured CUDA-graph size) write nothing. Dropping them uses boolean indexing, which
    syncs with the host; the Triton kernel (kernels.cache) masks them instead.
    """
    valid = slot_mapping >= 0
    k, v, slot_mapping = k[valid], v[valid], slot_mapping[valid]
    num_blocks, _, block_size, num_kv_heads, head_dim = kv_layer.shape
    flat = kv_layer.view(num_blocks, 2, block_size, num_kv_heads * head_dim)
    block_ids = torch.div(slot_mapping, block_size, rounding_mode="floor")
    offsets = slot_mapping - block_ids * block_size
    flat[block_ids, 0, offsets] = k.reshape(-1, num_kv_heads * head_dim).to(kv_layer.dtype)
    flat[block_ids, 1, offsets] = v.reshape(-1, num_kv_heads * head_dim).to(kv_layer.dtype)


def paged_attention(q: torch.Tensor, kv_layer: torch.Tensor, block_tables: torch.Tensor,
                    seq_lens: list[int], query_start_loc: list[int], scale: float) -> torch.Tensor:
    """Causal attention of q ([T, num_heads, head_dim]) over each sequence's paged context.

    Returns [T, num_heads, head_dim] in q's dtype; softmax runs in float32.
    """
    num_heads = q.shape[1]
    block_size, num_kv_heads = kv_layer.shape[2], kv_layer.shape[3]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    for i, seq_len in enumerate(seq_lens):
        start, end = query_start_loc[i], query_start_loc[i + 1]
        query_len = end - start
        if query_len == 0:
            continue
        num_blocks = (seq_len + block_size - 1) // block_size
        blocks = kv_layer[block_tables[i, :num_blocks].long()]  # [n, 2, bs, Hkv, D]
        keys = blocks[:, 0].reshape(-1, num_kv_heads, blocks.shape[-1])[:seq_len]
        values = blocks[:, 1].reshape(-1, num_kv_heads, blocks.shape[-1])[:seq_len]
        keys = keys.float().repeat_interleave(group, dim=1)      # [S, H, D]
        values = values.float().repeat_interleave(group, dim=1)
        query = q[start:end].float()                             # [Q, H, D]
        scores = torch.einsum("qhd,shd->hqs", query, keys) * scale
        q_pos = torch.arange(seq_len - query_len, seq_len, device=q.device).unsqueeze(1)
        k_pos = torch.arange(seq_len, device=q.device).unsqueeze(0)
        scores = scores.masked_fill((k_pos > q_pos).unsqueeze(0), float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[start:end] = torch.einsum("hqs,shd->qhd", probs, values).to(q.dtype)
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32, result in x's dtype (the Llama convention)."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add, then RMSNorm: returns (rms_norm(x + residual), x + residual).

    x and residual share a dtype; the sum is rounded to it before the norm, exactly as the
    unfused `hidden = hidden + out; rms_norm(hidden)` does.
    """
    residual_out = x + residual
    return rms_norm(residual_out, weight, eps), residual_out


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding. x: [T, heads, head_dim]; cos/sin: [T, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


def build_cos_sin_cache(inv_freq: torch.Tensor, max_position: int) -> torch.Tensor:
    """[max_position, head_dim] float32 table for the rotary kernels, on inv_freq's device.

    Row p is cos(p * inv_freq) || sin(p * inv_freq), each half head_dim // 2 wide (rotate-half
    repeats the frequencies, so one copy of each suffices). Computed with the operations
    engine.model.rotary.RotaryEmbedding uses, so a gathered row equals its float32 cos/sin.
    """
    positions = torch.arange(max_position, device=inv_freq.device).float()
    freqs = positions.unsqueeze(-1) * inv_freq.float()
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


def apply_rotary_cached(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                        cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half rotary of q ([T, num_heads, head_dim]) and k ([T, num_kv_heads, head_dim])
    at positions ([T] int), with cos/sin gathered from a build_cos_sin_cache table.

    Math in float32, each result cast once to its input's dtype. Returns new tensors. (The
    model today, like transformers, rounds cos/sin to the model dtype and rotates in it; in
    bfloat16 results differ from these by about one ulp on some elements.)
    """
    cos, sin = cos_sin_cache[positions.long()].chunk(2, dim=-1)
    cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
    return (apply_rotary(q.float(), cos, sin).to(q.dtype),
            apply_rotary(k.float(), cos, sin).to(k.dtype))


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU activation: x is [..., 2 * inner], gate || up; returns silu(gate) * up, [..., inner].

    Math in float32, one rounding to x's dtype at the end. The model's MLP today computes
    `F.silu(gate) * up` in the model dtype, as transformers does, which rounds twice (after
    silu, after the product); in bfloat16 (8-bit mantissa) the two differ by about one ulp on
    some elements. Float32 math is the more accurate of the two and what vLLM's and SGLang's
    fused kernels compute; for float32 inputs the two are the same computation.
    """
    gate, up = x.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype)
