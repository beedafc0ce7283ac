"""Triton kernel: Gumbel-max sampling of the rows without top-p, in one pass over the logits.

Contract: engine.sampler's torch path for those rows (`_sample_unsorted`: temperature, min_p,
top-k, the counter hash, Gumbel-max, `_finish`), whose module docstring is the reference. Per
row the kernel computes the row key (a, m) from the seed's two 32-bit lanes and the position in
uint32 arithmetic (the same mix32 and absorption order as `engine.sampler.row_keys`), then per
vocabulary tile:

    x     = float32(logit) / T                 IEEE round-to-nearest division (div_rn), as torch
    x     = -inf where x < max(x) + log(min_p) (min_p rows)
    x     = -inf where x < kth                 (top-k rows: kth = the row's k-th largest x)
    h     = mix32((a + m * t) mod 2**32)
    score = x - log(-log1p((float32(h) + 0.5) * -(2**-32 * (1 - 2**-24))))
    token = the first (lowest id) t with the largest score; -1 when that score is not finite or
            any score is NaN (as torch's max and `_finish`)

Every step is the torch path's float32 operation in the same order (no multiply feeds an add,
so FMA contraction changes nothing), so the scores are bit-identical except for log1p and log:
on CUDA they are libdevice's (`__nv_log1pf`, `__nv_logf`, the CUDA math library torch's CUDA
kernels call), under the interpreter (which has no libdevice) numpy's log and Goldberg's
log1p(v) = v * log(1 + v) / ((1 + v) - 1), each within an ulp or two of torch's CPU results.
The engine.sampler docstring accepts such differences: a token changes only when the row's two
best scores lie within an ulp.

min_p and top-k: the caller passes each row's top values of the RAW logits (`top`: torch.topk,
descending, or torch.amax when no row uses top-k), column 0 being the row's max and column
k - 1 its k-th largest; the kernel divides them by T. x -> x / T (correctly rounded) is
monotone for T > 0, so these are exactly the max and the k-th largest of the scaled row, as the
torch path takes them. Masking by the k-th value after min_p equals the torch path's top-k over
the min_p-masked row (if fewer than k survive min_p, both mask nothing more). Temperatures are
validated to (0, 100]; a NaN one makes every score NaN, so the row fails either way, as a row
with a NaN logit does (its max is NaN, which masks nothing, as in torch).

Parallelism: a grid of (row, vocabulary split) programs. One program per row would leave most
of a GPU idle at small batches (batch 1: one SM scanning 128k tokens, ~125 tiles of 1024 in
series, each tile ~100 instructions per element for the hash, the division and the two logs),
so the vocabulary is cut into `num_splits` contiguous chunks of whole tiles, enough for about
two programs per SM over the batch (and at least two tiles per program). With one split (large
batches) the kernel writes the token itself: one launch. With several it writes each chunk's
(best score, lowest id with it) and a second, tiny kernel (one program per row, reading
num_splits pairs) picks the row's token: the lowest id among the splits' equal best scores, so
the first maximum wins as in torch. The row max for min_p comes from the caller (one torch
reduction) rather than a first pass in every program, which at batch 1 would read the whole row
once per split.

Parameters travel as ONE int32 [R, 7] tensor (`pack_rows`: one host -> device copy, from
pinned memory on CUDA, so the host does not wait for the forward still running): per
row the logits row it samples (so the rows may be any subset of a larger logits tensor), the
seed's low and high 32-bit lanes and the position (as uint32 bit patterns), the temperature and
log(min_p) (float32 bit patterns; -inf: no min_p) and the column of its k-th value in `top`
(-1: no top-k).
"""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Iterable

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice
from triton.runtime.interpreter import InterpretedFunction

from engine.sampler import _U_SCALE, KEY_IV_A, KEY_IV_B, MIX_MUL_1, MIX_MUL_2

# the packed per-row parameters' columns (int32 each)
ROW, SEED_LO, SEED_HI, POSITION, TEMPERATURE, LOG_MIN_P, KTH_COLUMN = range(7)
NUM_COLUMNS = 7
_ROW_FORMAT = struct.Struct("<iIIIffi")  # the columns above, little-endian as torch stores them

_BLOCK = 1024  # tokens per tile
_MIN_TILES_PER_PROGRAM = 2
_PROGRAMS_PER_SM = 2
_NO_TOKEN = tl.constexpr(2**31 - 1)  # larger than any token id: loses every min()

_MUL_1 = tl.constexpr(MIX_MUL_1)
_MUL_2 = tl.constexpr(MIX_MUL_2)
_IV_A = tl.constexpr(KEY_IV_A)
_IV_B = tl.constexpr(KEY_IV_B)
_MINUS_U_SCALE = tl.constexpr(-_U_SCALE)
_COLUMNS = tl.constexpr(NUM_COLUMNS)


def pack_rows(rows: Iterable[tuple[int, int, int, int, float, float, int]],
              device: torch.device | str) -> torch.Tensor:
    """The kernel's per-row parameters as one int32 [R, 7] tensor on `device`, from tuples
    (logits row, seed low lane, seed high lane, position, temperature, log(min_p) or -inf,
    column of the k-th top value or -1); lanes and position in [0, 2**32). To CUDA it goes from
    pinned memory without waiting (no synchronisation with the work already queued)."""
    rows = list(rows)
    if not rows:
        return torch.empty(0, NUM_COLUMNS, dtype=torch.int32, device=device)
    buffer = bytearray(_ROW_FORMAT.size * len(rows))
    for i, row in enumerate(rows):
        _ROW_FORMAT.pack_into(buffer, i * _ROW_FORMAT.size, *row)
    params = torch.frombuffer(buffer, dtype=torch.int32).view(len(rows), NUM_COLUMNS)
    if torch.device(device).type == "cuda":
        return params.pin_memory().to(device, non_blocking=True)
    return params.to(device)


@triton.jit
def _mix32(x):
    """lowbias32 on uint32 values (multiplies wrap mod 2**32, shifts are logical)."""
    x ^= x >> 16
    x *= _MUL_1
    x ^= x >> 15
    x *= _MUL_2
    return x ^ (x >> 16)


@triton.jit
def _row_key(seed_lo, seed_hi, position, iv):
    return _mix32(_mix32(_mix32(iv ^ seed_lo) ^ seed_hi) ^ position)


@triton.jit
def _log_exponential(h, LIBDEVICE: tl.constexpr):
    """log(E), E = -log1p(-u), u = (float32(h) + 1/2) * 2**-32 * (1 - 2**-24)."""
    minus_u = (h.to(tl.float32) + 0.5) * _MINUS_U_SCALE
    if LIBDEVICE:
        return libdevice.log(-libdevice.log1p(minus_u))
    one_minus_u = 1.0 + minus_u  # the interpreter: no libdevice; Goldberg's log1p
    log1p = tl.where(one_minus_u == 1.0, minus_u,
                     tl.log(one_minus_u) * tl.math.div_rn(minus_u, one_minus_u - 1.0))
    return tl.log(-log1p)


@triton.jit
def _store_token(out_ptr, best, token, failed):
    """token, or -1 where the best score is not finite or a score was NaN (`_finish`)."""
    ok = (best > float("-inf")) & (best < float("inf")) & (failed == 0)
    tl.store(out_ptr, tl.where(ok, token, -1).to(tl.int64))


@triton.jit(do_not_specialize=["stride_top", "num_splits"])  # they vary: no recompiles
def _gumbel_kernel(logits_ptr, stride_row, params_ptr, top_ptr, stride_top, out_ptr,
                   best_ptr, token_ptr, vocab, chunk, num_splits, HAS_TOP: tl.constexpr,
                   SPLIT: tl.constexpr, LIBDEVICE: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    split = tl.program_id(1)
    params = params_ptr + i * _COLUMNS
    row = tl.load(params).to(tl.int64)
    seed_lo = tl.load(params + 1).to(tl.uint32, bitcast=True)
    seed_hi = tl.load(params + 2).to(tl.uint32, bitcast=True)
    position = tl.load(params + 3).to(tl.uint32, bitcast=True)
    temperature = tl.load(params + 4).to(tl.float32, bitcast=True)
    a = _row_key(seed_lo, seed_hi, position, _IV_A)
    m = _row_key(seed_lo, seed_hi, position, _IV_B) | 1
    logits_row = logits_ptr + row * stride_row
    cols = tl.arange(0, BLOCK)

    cut = tl.full([], float("-inf"), tl.float32)  # x < cut is masked
    if HAS_TOP:
        top_row = top_ptr + i * stride_top
        log_min_p = tl.load(params + 5).to(tl.float32, bitcast=True)
        if log_min_p > float("-inf"):
            cut = tl.math.div_rn(tl.load(top_row).to(tl.float32), temperature) + log_min_p
        kth_column = tl.load(params + 6)
        if kth_column >= 0:
            kth = tl.math.div_rn(tl.load(top_row + kth_column).to(tl.float32), temperature)
            cut = tl.maximum(cut, kth)

    best = tl.full([BLOCK], float("-inf"), tl.float32)  # per lane: the first max seen
    best_token = tl.full([BLOCK], _NO_TOKEN, tl.int32)
    nan = tl.zeros([BLOCK], tl.int32)
    begin = split * chunk
    end = tl.minimum(begin + chunk, vocab)
    for start in range(begin, end, BLOCK):
        tokens = start + cols
        x = tl.load(logits_row + tokens, mask=tokens < end, other=float("-inf")).to(tl.float32)
        x = tl.math.div_rn(x, temperature)
        x = tl.where(x < cut, float("-inf"), x)
        h = _mix32(a + m * tokens.to(tl.uint32))
        score = x - _log_exponential(h, LIBDEVICE)
        nan |= (score != score).to(tl.int32)
        better = score > best  # strict: a lane keeps its first (lowest) token on ties
        best = tl.where(better, score, best)
        best_token = tl.where(better, tokens, best_token)
    top = tl.max(best)
    token = tl.min(tl.where(best == top, best_token, _NO_TOKEN))
    failed = tl.max(nan)
    if not SPLIT:
        _store_token(out_ptr + i, top, token, failed)
    else:
        at = i * num_splits + split
        tl.store(best_ptr + at, tl.where(failed != 0, float("nan"), top))
        tl.store(token_ptr + at, token)


@triton.jit
def _reduce_splits_kernel(best_ptr, token_ptr, out_ptr, num_splits, BLOCK: tl.constexpr):
    """One row's token from its splits' (best score, token): the lowest token among the
    largest scores; -1 where that score is not finite or a split saw a NaN."""
    i = tl.program_id(0)
    splits = tl.arange(0, BLOCK)
    mask = splits < num_splits
    best = tl.load(best_ptr + i * num_splits + splits, mask=mask, other=float("-inf"))
    token = tl.load(token_ptr + i * num_splits + splits, mask=mask, other=_NO_TOKEN)
    failed = tl.max((best != best).to(tl.int32))
    top = tl.max(tl.where(best != best, float("-inf"), best))
    _store_token(out_ptr + i, top, tl.min(tl.where(best == top, token, _NO_TOKEN)), failed)


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def default_num_splits(num_rows: int, vocab: int, device: torch.device) -> int:
    """Vocabulary splits per row: about _PROGRAMS_PER_SM programs per SM over the batch, each
    with at least _MIN_TILES_PER_PROGRAM tiles; 1 off CUDA (the interpreter runs programs one
    after another, so more of them only adds overhead)."""
    if device.type != "cuda":
        return 1
    wanted = math.ceil(_PROGRAMS_PER_SM * _num_sms(device) / num_rows)
    return max(1, min(wanted, triton.cdiv(vocab, _BLOCK * _MIN_TILES_PER_PROGRAM)))


def gumbel_sample(logits: torch.Tensor, params: torch.Tensor, top: torch.Tensor | None = None,
                  num_splits: int | None = None) -> torch.Tensor:
    """One token per row of params (int32 [R, 7] on the logits' device, see `pack_rows`):
    int64 [R], -1 for a row whose best score is not finite (as engine.sampler's `_finish`).

    logits: [N, V], any float dtype, unit stride along V; row params[i, ROW] is sampled.
    top: [R, K], needed when a row uses min_p or top-k: the largest K of each sampled row's
    logits, descending (torch.topk values, K >= every KTH_COLUMN + 1; K = 1 for min_p alone).
    num_splits: vocabulary splits per row (default: `default_num_splits`)."""
    assert logits.dim() == 2 and logits.stride(1) == 1
    assert params.dtype == torch.int32 and params.shape[1] == NUM_COLUMNS
    assert params.is_contiguous() and params.device == logits.device
    num_rows, vocab = params.shape[0], logits.shape[1]
    out = torch.empty(num_rows, dtype=torch.int64, device=logits.device)
    if num_rows == 0:
        return out
    if num_splits is None:
        num_splits = default_num_splits(num_rows, vocab, logits.device)
    tiles = triton.cdiv(vocab, _BLOCK)
    chunk = triton.cdiv(tiles, max(1, min(num_splits, tiles))) * _BLOCK
    num_splits = triton.cdiv(vocab, chunk)
    best = token = out  # unused with one split
    if num_splits > 1:
        best = torch.empty(num_rows, num_splits, dtype=torch.float32, device=logits.device)
        token = torch.empty(num_rows, num_splits, dtype=torch.int32, device=logits.device)
    if top is not None:
        assert top.shape[0] == num_rows and top.stride(1) == 1
    libdevice_math = not isinstance(_gumbel_kernel, InterpretedFunction)  # no libdevice there
    _gumbel_kernel[(num_rows, num_splits)](
        logits, logits.stride(0), params, logits if top is None else top,
        0 if top is None else top.stride(0), out, best, token, vocab, chunk, num_splits,
        HAS_TOP=top is not None, SPLIT=num_splits > 1, LIBDEVICE=libdevice_math, BLOCK=_BLOCK)
    if num_splits > 1:
        _reduce_splits_kernel[(num_rows,)](best, token, out, num_splits,
                                           BLOCK=triton.next_power_of_2(num_splits))
    return out
