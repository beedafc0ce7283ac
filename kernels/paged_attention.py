"""Triton paged attention: the CUDA replacement for `kernels.reference.paged_attention`.

One launch serves a mixed batch: prompt chunks (possibly after a prefix-cache hit), decode
steps and speculative verification, each sequence attending causally over its paged context.
It never synchronizes with the host, so it can be captured in a CUDA graph: the grid depends
only on shapes and host ints (`max_query_len`, `num_splits`, `max_seq_len`).

Tiling. A program owns one (query block, KV head[, split]). Its M dimension flattens the
block's BLOCK_Q query rows with the GROUP query heads that share the KV head (GQA), so each
KV tile is loaded once for the whole group. A KV tile is BLOCK_N keys: one or more whole
pages, each page's physical block id read from the block table.

                                   K^T tile: BLOCK_N keys = whole pages (here 2)
                                +------------------+------------------+
                                | page 2t          | page 2t + 1      |  physical block of
                                | (block_size keys)| (block_size keys)|  page p: block_tables
                                +------------------+------------------+  [seq, p], any order
    Q tile (BLOCK_M rows)
    m = 0: row 0, head 0        S = Q @ K^T * scale            (fp32 accumulate)
    m = 1: row 0, head 1        S[m, key] = -inf where key > context_len + row(m)   (causal)
    ...                         online softmax across KV tiles (running max m_i, sum l_i)
    m:     row m // GROUP,      acc = acc * alpha + P @ V      (V tile: the same slots)
           head m % GROUP

The query blocks of all sequences are packed on grid axis 0: sequence i's blocks start at
`query_start_loc[i] // BLOCK_Q + i`, a program finds its sequence by binary search over
`query_start_loc`, and `T // BLOCK_Q + B` programs cover any batch of T tokens and B sequences
(a long prompt chunk next to many decodes wastes no programs, unlike a B x max_query_len grid).

Split-K (flash decoding). With few sequences the grid above cannot fill the GPU during decode.
`num_splits` > 1 adds grid axis 2: split s of a query block attends to the s-th contiguous
run of its KV tiles and writes a float32 partial output (normalized by its own softmax sum)
and its log-sum-exp; `_reduce_splits_kernel` then merges the splits of each (token, head).
`choose_num_splits` picks the count from host values only.

Padding and masks. Sequences with query_len 0 (CUDA-graph padding rows) are skipped, and
tokens at or past `query_start_loc[-1]` (padding tokens) are never written: their rows of
`out` keep what they held (zeros when `out` is None). head_dim is padded to BLOCK_D (next
power of two, >= 16) and masked; M rows past BLOCK_Q x GROUP or past the sequence's queries
are masked; keys past each query's causal limit get -inf; slots past the sequence are not
loaded (nor are their block-table entries).

Numerics. Softmax statistics and accumulators are float32 (exp2 with log2(e) folded into the
scale). On the GPU, tl.dot takes the cache's fp16/bf16 operands (tensor cores) and P is cast
to that dtype for P @ V, as in flash attention; float32 inputs use exact ("ieee") float32 dots,
not TF32. Under the CPU interpreter every operand is float32 (numpy has no bfloat16).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634

# Split-K heuristic (see choose_num_splits).
MAX_SPLITS = 32
PROGRAMS_PER_SM = 4
MIN_TOKENS_PER_SPLIT = 256
DEFAULT_NUM_SMS = 132  # H100 SXM; used where the device cannot be asked (CPU interpreter)


class KernelConfig(NamedTuple):
    """Tile sizes and warps of the attention kernel (no autotuning)."""

    block_m: int  # M tile rows = block_q query rows x GROUP heads (tl.dot needs >= 16)
    block_q: int  # query rows per program
    block_n: int  # keys per KV tile, a multiple of block_size
    num_warps: int
    num_stages: int  # software-pipelining depth of the KV tile loads


def default_config(group: int, block_size: int, max_query_len: int) -> KernelConfig:
    """Decode-like batches get a 16-row M tile (the tl.dot minimum; a decode step fills GROUP of
    its rows); batches with a prompt chunk of at least 64 / GROUP queries get 64 rows, so each
    KV tile loaded serves more queries. A KV tile is 64 keys, or one page if pages are larger.

    From a sweep on an H100 (bf16, head_dim 128, GQA 4, block_size 16): decode reads the cache
    at 2.4-2.9 TB/s; 128-row tiles with 8 warps gain ~12% on long prompt chunks alone but lose
    ~50% on a chunk batched with many decodes, which then also run 128-row programs.
    """
    block_m = max(16, triton.next_power_of_2(group))
    if max_query_len * group >= 64:
        block_m = max(block_m, 64)
    return KernelConfig(block_m, block_m // group, block_n=max(block_size, 64),
                        num_warps=4 if block_m <= 64 else 8, num_stages=2)


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_query_len: int, block_q: int,
                      num_sms: int, max_seq_len: int | None = None) -> int:
    """How many KV splits per query block; a pure function of host values.

    Only decode-like batches split (every sequence fits one query block, so the grid has
    exactly num_seqs x num_kv_heads programs); they split until about PROGRAMS_PER_SM programs
    per SM (at most MAX_SPLITS), and, when `max_seq_len` is known, no split gets fewer than
    MIN_TOKENS_PER_SPLIT keys. Unknown `max_seq_len` (e.g. CUDA-graph capture) counts as long.
    """
    if max_query_len > block_q:
        return 1
    splits = min(MAX_SPLITS, PROGRAMS_PER_SM * num_sms // max(1, num_seqs * num_kv_heads))
    if max_seq_len is not None:
        splits = min(splits, triton.cdiv(max_seq_len, MIN_TOKENS_PER_SPLIT))
    return max(1, splits)


@triton.jit
def _find_sequence(query_start_loc_ptr, q_block, num_seqs, BLOCK_Q: tl.constexpr):
    """The last sequence i whose first query block, query_start_loc[i] // BLOCK_Q + i, is at
    or before `q_block` (binary search; the first-block indices strictly increase)."""
    lo: tl.int32 = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid <= q_block:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _paged_attention_kernel(
        q_ptr, kv_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
        out_ptr, partial_out_ptr, partial_lse_ptr,
        num_seqs, qk_scale,
        stride_q_tok, stride_q_head,
        stride_kv_block, stride_kv_kv, stride_kv_slot, stride_kv_head,
        stride_bt_seq,
        stride_o_tok, stride_o_head,
        stride_po_split, stride_po_tok, stride_po_head,
        stride_pl_split, stride_pl_tok,
        num_splits, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
        PAGE_SIZE: tl.constexpr, SPLIT_K: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """One (query block, KV head, split). qk_scale = softmax scale * log2(e) (exp2 softmax)."""
    q_block = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq = _find_sequence(query_start_loc_ptr, q_block, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    first_row = (q_block - (q_start // BLOCK_Q + seq)) * BLOCK_Q
    if first_row >= q_len:  # past this sequence's queries (or a query_len-0 padding row)
        return
    context_len = tl.load(seq_lens_ptr + seq) - q_len  # keys before this step's queries

    m = tl.arange(0, BLOCK_M)
    row = first_row + m // GROUP
    head = kv_head * GROUP + m % GROUP
    row_valid = (m < BLOCK_Q * GROUP) & (row < q_len)
    d = tl.arange(0, BLOCK_D)
    d_valid = d < HEAD_DIM
    token = (q_start + row).to(tl.int64)
    q = tl.load(q_ptr + token[:, None] * stride_q_tok + head[:, None] * stride_q_head + d[None, :],
                mask=row_valid[:, None] & d_valid[None, :], other=0.0).to(DOT_DTYPE)
    q_pos = context_len + row  # query row r sees keys 0..q_pos[r]

    # Keys the block needs (up to its last row), cut into num_splits runs of whole tiles.
    kv_len = context_len + tl.minimum(first_row + BLOCK_Q, q_len)
    num_tiles = tl.cdiv(kv_len, BLOCK_N)
    tiles_per_split = tl.cdiv(num_tiles, num_splits)
    tile_begin = split * tiles_per_split
    tile_end = tl.minimum(tile_begin + tiles_per_split, num_tiles)

    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)  # finite: a fully masked tile gives p = 0
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    kv_head_ptr = kv_ptr + kv_head * stride_kv_head
    for tile in range(tile_begin, tile_end):
        n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        n_valid = n < kv_len
        block = tl.load(block_tables_ptr + seq * stride_bt_seq + n // PAGE_SIZE, mask=n_valid,
                        other=0)
        slot = block.to(tl.int64) * stride_kv_block + (n % PAGE_SIZE) * stride_kv_slot
        k = tl.load(kv_head_ptr + slot[None, :] + d[:, None],
                    mask=n_valid[None, :] & d_valid[:, None], other=0.0).to(DOT_DTYPE)
        v = tl.load(kv_head_ptr + stride_kv_kv + slot[:, None] + d[None, :],
                    mask=n_valid[:, None] & d_valid[None, :], other=0.0).to(DOT_DTYPE)
        s = tl.dot(q, k, input_precision="ieee") * qk_scale
        s = tl.where(n[None, :] <= q_pos[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v, input_precision="ieee")
        m_i = m_new

    mask = row_valid[:, None] & d_valid[None, :]
    if not SPLIT_K:  # every query sees key 0, so l_i > 0
        tl.store(out_ptr + token[:, None] * stride_o_tok + head[:, None] * stride_o_head
                 + d[None, :], (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=mask)
    else:  # a split before a row's causal limit may see no key: l_i = 0, lse = -inf
        seen = l_i > 0
        partial = acc / tl.where(seen, l_i, 1.0)[:, None]
        lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
        tl.store(partial_out_ptr + split * stride_po_split + token[:, None] * stride_po_tok
                 + head[:, None] * stride_po_head + d[None, :], partial, mask=mask)
        tl.store(partial_lse_ptr + split * stride_pl_split + token * stride_pl_tok + head, lse,
                 mask=row_valid)


@triton.jit
def _reduce_splits_kernel(
        partial_out_ptr, partial_lse_ptr, out_ptr, query_start_loc_ptr, num_seqs, num_splits,
        stride_po_split, stride_po_tok, stride_po_head,
        stride_pl_split, stride_pl_tok,
        stride_o_tok, stride_o_head,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """One (token, head): out = sum_s 2^(lse_s - max) * partial_s / sum_s 2^(lse_s - max)."""
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    if token >= tl.load(query_start_loc_ptr + num_seqs):  # a padding token
        return
    s = tl.arange(0, BLOCK_S)
    s_valid = s < num_splits
    d = tl.arange(0, BLOCK_D)
    lse = tl.load(partial_lse_ptr + s * stride_pl_split + token * stride_pl_tok + head,
                  mask=s_valid, other=float("-inf"))
    weight = tl.exp2(lse - tl.max(lse, 0))  # split 0 holds key 0, so the max is finite
    partial = tl.load(partial_out_ptr + s[:, None] * stride_po_split + token * stride_po_tok
                      + head * stride_po_head + d[None, :],
                      mask=s_valid[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
    out = tl.sum(partial * weight[:, None], 0) / tl.sum(weight, 0)
    tl.store(out_ptr + token * stride_o_tok + head * stride_o_head + d,
             out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


def paged_attention(q: torch.Tensor, kv_layer: torch.Tensor, block_tables: torch.Tensor,
                    seq_lens: torch.Tensor, query_start_loc: torch.Tensor, max_query_len: int,
                    scale: float, out: torch.Tensor | None = None, num_splits: int | None = None,
                    max_seq_len: int | None = None) -> torch.Tensor:
    """Causal attention of q over each sequence's paged context; matches
    `kernels.reference.paged_attention` (softmax in float32, output in q's dtype).

    q:               [T, H, D] float16 / bfloat16 / float32; T may exceed query_start_loc[-1]
                     (padding tokens, whose rows of `out` are left untouched)
    kv_layer:        [num_blocks, 2, block_size, Hkv, D] (0 = K, 1 = V); block_size a power of 2
    block_tables:    [B, max_blocks] int32, rows 0-padded
    seq_lens:        [B] int32 tensor, context length after this step's tokens are written
    query_start_loc: [B + 1] int32 tensor, prefix sums of the query lengths; a sequence's
                     queries are its last query_len positions; query_len 0 rows are skipped
    max_query_len:   host int >= every query_len (1 for a pure decode batch)
    out:             optional preallocated [T, H, D] in q's dtype (else zeros are allocated)
    num_splits:      KV splits per query block (flash decoding); None = choose_num_splits
    max_seq_len:     optional host bound on seq_lens, a hint for choose_num_splits only

    Does not synchronize with the host (CUDA-graph capturable). Returns `out`.
    """
    _check_inputs(q, kv_layer, block_tables, seq_lens, query_start_loc, out)
    out = torch.zeros_like(q) if out is None else out
    num_seqs, num_kv_heads = block_tables.shape[0], kv_layer.shape[3]
    if q.shape[0] == 0 or num_seqs == 0:
        return out
    config = default_config(q.shape[1] // num_kv_heads, kv_layer.shape[2], max_query_len)
    if num_splits is None:
        num_splits = choose_num_splits(num_seqs, num_kv_heads, max_query_len, config.block_q,
                                       _num_sms(q.device), max_seq_len)
    if num_splits == 1:  # the partial buffers are not touched: pass `out` in their place
        _attend(q, kv_layer, block_tables, seq_lens, query_start_loc, scale, config, 1, out,
                out, out)
        return out
    partial_out = q.new_empty((num_splits, *q.shape), dtype=torch.float32)
    partial_lse = q.new_empty((num_splits, *q.shape[:2]), dtype=torch.float32)
    _attend(q, kv_layer, block_tables, seq_lens, query_start_loc, scale, config, num_splits, out,
            partial_out, partial_lse)
    _reduce_splits_kernel[(q.shape[0], q.shape[1])](
        partial_out, partial_lse, out, query_start_loc, num_seqs, num_splits,
        partial_out.stride(0), partial_out.stride(1), partial_out.stride(2),
        partial_lse.stride(0), partial_lse.stride(1),
        out.stride(0), out.stride(1),
        HEAD_DIM=q.shape[2], BLOCK_D=_block_d(q.shape[2]),
        BLOCK_S=triton.next_power_of_2(num_splits), num_warps=1)
    return out


def _attend(q: torch.Tensor, kv_layer: torch.Tensor, block_tables: torch.Tensor,
            seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float,
            config: KernelConfig, num_splits: int, out: torch.Tensor,
            partial_out: torch.Tensor, partial_lse: torch.Tensor) -> None:
    """Launches the attention kernel: into `out` when num_splits is 1, else into the partials."""
    num_tokens, num_heads, head_dim = q.shape
    num_seqs, num_kv_heads = block_tables.shape[0], kv_layer.shape[3]
    grid = (num_tokens // config.block_q + num_seqs, num_kv_heads, num_splits)
    _paged_attention_kernel[grid](
        q, kv_layer, block_tables, seq_lens, query_start_loc,
        out, partial_out, partial_lse,
        num_seqs, scale * LOG2E,
        q.stride(0), q.stride(1),
        kv_layer.stride(0), kv_layer.stride(1), kv_layer.stride(2), kv_layer.stride(3),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        partial_out.stride(0), partial_out.stride(1), partial_out.stride(2),
        partial_lse.stride(0), partial_lse.stride(1),
        num_splits, HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim),
        GROUP=num_heads // num_kv_heads,
        BLOCK_M=config.block_m, BLOCK_Q=config.block_q, BLOCK_N=config.block_n,
        PAGE_SIZE=kv_layer.shape[2], SPLIT_K=num_splits > 1, DOT_DTYPE=_dot_dtype(q, kv_layer),
        num_warps=config.num_warps, num_stages=config.num_stages)


def _check_inputs(q: torch.Tensor, kv_layer: torch.Tensor, block_tables: torch.Tensor,
                  seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                  out: torch.Tensor | None) -> None:
    """Shape, dtype and layout checks on host metadata only (no device reads)."""
    num_heads, head_dim = q.shape[1:]
    block_size, num_kv_heads, kv_head_dim = kv_layer.shape[2:]
    if kv_head_dim != head_dim or num_heads % num_kv_heads:
        raise ValueError(f"q heads/dim {tuple(q.shape[1:])} do not fit the KV cache's "
                         f"{(num_kv_heads, kv_head_dim)}")
    if block_size & (block_size - 1):
        raise ValueError(f"block_size {block_size} is not a power of two")
    num_seqs = block_tables.shape[0]
    if seq_lens.shape != (num_seqs,) or query_start_loc.shape != (num_seqs + 1,):
        raise ValueError(f"seq_lens {tuple(seq_lens.shape)} / query_start_loc "
                         f"{tuple(query_start_loc.shape)} do not match {num_seqs} sequences")
    for name, t in (("block_tables", block_tables), ("seq_lens", seq_lens),
                    ("query_start_loc", query_start_loc)):
        if t.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {t.dtype}")
    if q.stride(2) != 1 or kv_layer.stride(4) != 1 or block_tables.stride(1) != 1:
        raise ValueError("q, kv_layer and block_tables must be contiguous in their last dim")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.stride(2) != 1):
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype}, contiguous in its last dim")


def _dot_dtype(q: torch.Tensor, kv_layer: torch.Tensor) -> tl.dtype:
    """tl.dot operand dtype: the cache's dtype on the GPU (fp16/bf16 tensor cores, fp32
    accumulation), float32 when either side is float32, and float32 under the CPU interpreter,
    whose numpy arithmetic has no bfloat16."""
    if not q.is_cuda or torch.float32 in (q.dtype, kv_layer.dtype):
        return tl.float32
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[kv_layer.dtype]


def _block_d(head_dim: int) -> int:
    """head_dim padded to a power of two, at least 16 (the tl.dot minimum)."""
    return max(16, triton.next_power_of_2(head_dim))


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_NUM_SMS
