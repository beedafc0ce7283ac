"""Token sampling on the logits' device, batched: greedy, temperature, top-k, top-p, min-p,
seeded, after the logits processors (logit_bias, the min_tokens mask, penalties).

Order of application (this docstring is the reference)
------------------------------------------------------
    0. grammar mask               structured output: tokens the request's grammar does not
                                  allow next are -inf (engine/structured.py; only constrained
                                  rows, xgrammar's bitmask)
    1. logit_bias                 logits[t] += bias[t], before the other processors (OpenAI)
    2. min_tokens mask            stop_token_ids, and EOS unless ignore_eos, are -inf while the
                                  request has fewer than min_tokens output tokens (as vLLM)
    3. penalties                  repetition (prompt and output tokens), then frequency and
                                  presence (output tokens so far), as vLLM: BEFORE temperature
    -> greedy rows: the argmax of these processed logits (penalties and bias are honoured)
    4. temperature                logits / T
    5. min_p                      drop t when p[t] < min_p * max p (as vLLM: after temperature,
                                  before top-k / top-p); computed as logits[t] < max + log(min_p)
    6. top-k, then top-p          over the survivors
    7. Gumbel-max                 with the counter hash below
Steps 1-3 live in engine/logits_processors.py and touch only the rows of requests that use
them; a batch where no request uses them (or min_p) does no extra device work or host -> device
copy, and every row's token is bit for bit what it was before they existed.

Logprobs (SamplingParams.logprobs = N, 0..20, for the rows that ask)
--------------------------------------------------------------------
    log_softmax of the RAW logits the model produced: before step 0 (no grammar mask,
    logit_bias, min_tokens mask or penalties) and before temperature, min_p, top-k and top-p
    (vLLM's default `logprobs_mode=raw_logprobs`). So a greedy row's logprobs are transformers' log_softmax of
    the same logits (tests: within 1e-4 in float32, end to end), and a sampled token's logprob
    is not the probability it was drawn with when temperature, filtering, penalties or a bias
    changed the distribution. They are computed by the tier that samples the token: the prefill
    tier's first token's travel to decode in TransferComplete (kv_transfer.proto).
    Per row: the chosen token's logprob (always), and the N most likely tokens by raw logprob,
    most likely first, ties by ascending token id (among tokens tied at the N-th value, which
    are kept is torch.topk's choice). The chosen token appears among them only when it ranks.

Scheme
------
Every non-greedy row is sampled with the Gumbel-max trick over counter-based random numbers:

    token = argmax_t( filtered_logits[t] / T - log E(seed, position, t) ),  E = -log1p(-u)

where u(seed, position, t) in (0, 1) is a pure function of the request's seed, the position of
the token being sampled (`request.num_tokens`) and the candidate token id t, E ~ Exp(1), so
-log E = -log(-log(1 - u)) is a standard Gumbel variate (1 - u, as uniform as u, so that the
likely winners, E near 0, keep full float32 precision). argmax(logits/T + Gumbel) is
distributed as softmax(logits/T) restricted to the tokens filtering keeps. There is no generator
state: the same (seed, position) gives the same noise vector, hence the same token, whatever
else is in the batch, in whatever order, and whichever tier samples it (prefill samples the
first token, decode the rest) or process. Unseeded requests get a fresh 63-bit seed per call
(`random.getrandbits`, on the host).

Greedy rows (`SamplingParams.greedy`, which includes tiny temperatures) are the argmax of the
logits. Filtering equals the former per-row `_filter`: temperature first, then top-k (ties at the
k-th value are kept: `logits < kth` is masked), then top-p over the top-k survivors, renormalised
(the token that crosses top_p is kept: drop where cumulative probability minus own > top_p).

The counter hash (part of the cross-tier contract)
--------------------------------------------------
All integer work is on int64 tensors holding 32-bit lanes (values in [0, 2**32)), so nothing
overflows and every right shift is of a non-negative value: the result is bit-identical on CPU and
CUDA, and equal to the same formulas on Python ints (the tests check both).

    mix32(x)  = lowbias32 (C. Wellons, hash-prospector), a bijection of 32-bit integers:
                x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x846CA68B; x ^= x >> 16
                (each multiply mod 2**32; a constant >= 2**31 is used as its signed 32-bit value
                c - 2**32, so |x * c| < 2**63 and `& 0xFFFFFFFF` gives the exact low 32 bits)
    seed      : uint64 (reduced mod 2**64) -> s0 = seed & 0xFFFFFFFF, s1 = seed >> 32, split on
                the host (a seed >= 2**63 never enters an int64 whole)
    position  : p = position & 0xFFFFFFFF (positions are < 2**32)
    row key   : two chains, lane A from IV_A = 0x9E3779B9, lane B from IV_B = 0x6A09E667:
                x = mix32(IV ^ s0); x = mix32(x ^ s1); x = mix32(x ^ p)
                a = lane A, m = lane B | 1   (~63 bits of key per (seed, position))
    token     : h(t) = mix32((a + m * t) & 0xFFFFFFFF)
                (a SplitMix-style Weyl stream per row: start a, odd step m, read through mix32;
                for a fixed row t -> h is injective: no two tokens of a row share h)
    uniform   : u = (float32(h) + 0.5) * (2**-32 * (1 - 2**-24)), in float32: in (0, 1), at most
                1 - 2**-24 (float32(h) rounds to at most 2**32), so E = -log1p(-u) is finite

These constants and steps (the multipliers and shifts, IV_A, IV_B, the absorption order, the
Weyl step, the mapping to u) ARE the contract: a prefill and a decode instance must run the
same sampler version, or a seeded request's first token and its later tokens come from
different streams. Changing any of them is a contract change; tests/unit/test_sampler.py pins
h for fixed inputs so that it shows.

Float part: float32, on the logits' device. The integer part is exact everywhere; int -> float32
conversion and the scaling are correctly rounded IEEE ops, but log1p/log may round differently
by an ulp between CPU and CUDA (or between a vectorised and a scalar code path, or between the
torch path and the Triton kernel below, whose logf/log1pf on CUDA are libdevice's, the CUDA
math library torch's kernels use too), so a draw whose two best scores lie within an ulp (~1e-6)
of each other could differ between devices: rare enough that we accept it rather than pay
float64 over [N, vocab] (the logits themselves differ far more than that between a prefill and
a decode kernel). Likewise top-p's float32 softmax + cumsum may decide differently on another
device for a token within rounding of the boundary. Resolution: the smallest E is ~1.2e-10, so
tokens down to probability ~1e-10 are drawn at their rate; the largest Gumbel value is ~22.9
and the smallest ~-2.8 (the true tails beyond are negligible).

Cost (N rows, V vocab)
----------------------
Rows are grouped on the host: greedy; no top-p; top-p. All work is batched over [rows, V]:
- logits processors (only when a row uses one): a copy of the logits with those rows processed
  (engine/logits_processors.py gives their cost: one int64 and one float32 host -> device
  tensor, one scatter_add for the token counts, elementwise passes).
- greedy: one max reduction, O(N*V).
- rows without top-p, on CUDA (kernels.sampling; `kernel=` forces either path): ONE Triton
  kernel reads each row's logits once and keeps everything else in registers (the row key from
  the seed and position, the divide, the min_p and top-k masks, the hash, the noise and the
  running first maximum), then writes the token (-1: failed). At small batches it splits the
  vocabulary over programs (about two per SM) and a second, tiny kernel picks each row's token
  from its splits' (best score, id). Per-row parameters: ONE int32 host -> device tensor
  (from pinned memory, no synchronisation). Before the kernel, only when a row uses top-k:
  torch.topk of the group's largest k over the rows' raw logits (O(V) selection per row, no
  sort; an index_select first when the group is not every row), else only when a row uses
  min_p: torch.amax of those rows; the kernel divides each row's max and k-th value by T
  (x -> x / T is monotone, so they are the scaled row's). Same tokens as the torch path below
  (log1p/log may differ by an ulp, see above).
- rows without top-p elsewhere, and top-p rows, O(N*V) in torch: the temperature divide, the
  hash (14 int64 elementwise passes, in place with one temporary), the noise (6 float32
  passes), a subtract and a max (on an H100, roughly 20 passes of 32-64 MB for N=64,
  V=128256); their per-row parameters go host -> device as one int64 and one float32 tensor
  per group, and the row keys take ~30 small int64 ops.
- min_p (torch path, only when a row of the group uses it): a max reduction and a masked fill.
- top-k without top-p (torch path): torch.topk of the group's largest k (O(V) selection per
  row, no sort), then a mask by each row's k-th value.
- top-p (with or without top-k): ONE stable descending sort of those rows (O(V log V) per row;
  a segmented radix sort on CUDA; on CPU it dominates), then masks, a softmax and a cumsum in
  sorted order; the noise is hashed on the sorted token ids, so nothing is scattered back.
- logprobs (only for the rows that ask; none: no device work at all): one index_select of
  those rows, one log_softmax, one gather of the chosen tokens' values and, when a row wants
  top entries, one torch.topk of the largest N asked (then two small sorts of [R, N] for the
  tie order); the results travel in the same single device -> host transfer as the tokens
  (everything packed into one float64 tensor, exact for ids and float32 values).
No per-row Python loop touches the vocabulary, no per-row .item(); the result comes back as ONE
int64 tensor (the token, or -1 for a row that could not be sampled; float64, with the logprobs,
when a row asked for them). Ties: the first maximum wins (lowest token id; in sorted order
for top-p rows, i.e. larger logit, then lower id).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import random
from typing import AbstractSet, NamedTuple

import torch

from engine.logits_processors import LogitsProcessors, bias_error, uses_processors
from engine.request import Request
from engine.sampling_params import TokenLogprobs
from engine.structured import grammar_rows, mask_grammar_rows

MASK32 = 0xFFFFFFFF
# lowbias32 multipliers and the two row-key chains' initial values (2**32/phi and the fractional
# part of sqrt(2), as in SHA-256): part of the cross-tier contract, see the module docstring.
MIX_MUL_1 = 0x7FEB352D
MIX_MUL_2 = 0x846CA68B
KEY_IV_A = 0x9E3779B9
KEY_IV_B = 0x6A09E667
# 2**-32 * (1 - 2**-24), exact in float32: float32(h) rounds up to 2**32 at most, so
# u = (float32(h) + 1/2) * _U_SCALE <= 1 - 2**-24 (the largest float32 below 1) and
# E = -log1p(-u) stays finite; the (1 - 2**-24) shrink is a negligible bias
_U_SCALE = 2.0**-32 * (1.0 - 2.0**-24)
_FAILED = -1  # token value marking a row whose distribution is not finite

SAMPLING_FAILED = "the token distribution is not finite (overflow or NaN logits)"


class SamplingError(RuntimeError):
    """Sampling one request's token failed (e.g. its logits are not finite)."""


def _signed32(c: int) -> int:
    """A 32-bit constant as its two's-complement signed value, so x * c fits in int64."""
    return c - (1 << 32) if c >= 1 << 31 else c


_MUL_1 = _signed32(MIX_MUL_1)
_MUL_2 = _signed32(MIX_MUL_2)


def mix32(x):
    """lowbias32 on 32-bit lanes of an int64 tensor (or a Python int in [0, 2**32)).

    Products stay below 2**63 in magnitude (|x| < 2**32, |c| <= 2**31) and shifts apply to
    non-negative values only, so this is exact and identical on every device."""
    x = x ^ (x >> 16)
    x = (x * _MUL_1) & MASK32
    x = x ^ (x >> 15)
    x = (x * _MUL_2) & MASK32
    return x ^ (x >> 16)


def _mix32_(x: torch.Tensor) -> torch.Tensor:
    """mix32 in place on an int64 tensor of 32-bit lanes (one temporary; fewer passes)."""
    tmp = torch.empty_like(x)
    torch.bitwise_right_shift(x, 16, out=tmp)
    x.bitwise_xor_(tmp).mul_(_MUL_1).bitwise_and_(MASK32)
    torch.bitwise_right_shift(x, 15, out=tmp)
    x.bitwise_xor_(tmp).mul_(_MUL_2).bitwise_and_(MASK32)
    torch.bitwise_right_shift(x, 16, out=tmp)
    return x.bitwise_xor_(tmp)


def row_keys(seed_lo: torch.Tensor, seed_hi: torch.Tensor,
             position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, m), each [R] int64 in [0, 2**32) with m odd, for R rows' (seed lanes, position)."""
    x = mix32(torch.stack([seed_lo ^ KEY_IV_A, seed_lo ^ KEY_IV_B]))  # [2, R]: both chains
    x = mix32(x ^ seed_hi)
    x = mix32(x ^ position)
    return x[0], x[1] | 1


def token_hash(a: torch.Tensor, m: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """h(t) = mix32((a + m*t) mod 2**32); a, m broadcast against token_ids (int64, t < 2**31)."""
    return _mix32_(torch.addcmul(a, token_ids, m).bitwise_and_(MASK32))


def split_seed(seed: int) -> tuple[int, int]:
    """A uint64 seed as its (low, high) 32-bit lanes (reduced mod 2**64 first)."""
    seed %= 1 << 64
    return seed & MASK32, seed >> 32


def counter_hash(seed: int, position: int, token_ids: torch.Tensor) -> torch.Tensor:
    """The 32-bit hash h(seed, position, t) for the int64 token ids given (any shape)."""
    lo, hi = split_seed(seed)
    lanes = torch.tensor([lo, hi, position & MASK32], dtype=torch.int64, device=token_ids.device)
    a, m = row_keys(lanes[0:1], lanes[1:2], lanes[2:3])
    return token_hash(a, m, token_ids)


def _minus_uniform(h: torch.Tensor) -> torch.Tensor:
    """-u, float32: u = (float32(h) + 1/2) * _U_SCALE, in (0, 1 - 2**-24]."""
    return h.to(torch.float32).add_(0.5).mul_(-_U_SCALE)


def uniform(h: torch.Tensor) -> torch.Tensor:
    """u in (0, 1), float32, from 32-bit hashes h (what the sampler draws from)."""
    return _minus_uniform(h).neg_()


def _log_exponential(a: torch.Tensor, m: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """log(E), E = -log1p(-u) ~ Exp(1), float32; the Gumbel noise is -log(E)."""
    return _minus_uniform(token_hash(a, m, token_ids)).log1p_().neg_().log_()


class _RowValues(NamedTuple):
    """One non-greedy row's sampling parameters, on the host."""

    row: int
    seed_lo: int
    seed_hi: int
    position: int
    top_k: int  # vocab: off
    temperature: float
    top_p: float  # inf: off
    log_min_p: float  # -inf: off


def _row_values(rows: list[int], requests: list[Request], vocab: int) -> list[_RowValues]:
    """The rows' parameters; an unseeded request gets a fresh 63-bit seed (one per row, in
    row order)."""
    values = []
    for row in rows:
        request = requests[row]
        params = request.sampling
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        values.append(_RowValues(
            row, *split_seed(seed), request.num_tokens & MASK32,
            params.top_k if 0 < params.top_k < vocab else vocab,
            params.temperature, params.top_p if params.top_p < 1.0 else float("inf"),
            math.log(params.min_p) if params.min_p > 0 else float("-inf")))
    return values


def _max_top_k(values: list[_RowValues], vocab: int) -> int:
    """The largest top-k the rows use, 0 when none does."""
    return max((v.top_k for v in values if v.top_k < vocab), default=0)


class _Rows:
    """One group of non-greedy rows and their per-row parameters: one int64 and one float32
    tensor go to the device (later: slices of persistent per-request buffers)."""

    def __init__(self, rows: list[int], requests: list[Request], vocab: int,
                 device: torch.device):
        values = _row_values(rows, requests, vocab)
        self.count = len(rows)
        self.vocab = vocab
        self.max_top_k = _max_top_k(values, vocab)  # 0: no row uses it
        self.use_min_p = any(v.log_min_p > float("-inf") for v in values)
        self.index, seed_lo, seed_hi, position, self.top_k = (
            torch.tensor([v[:5] for v in values], dtype=torch.int64).T.contiguous().to(device))
        self.temperature, self.top_p, self.log_min_p = (
            torch.tensor([v[5:] for v in values], dtype=torch.float32).T.contiguous().to(device))
        self.a, self.m = row_keys(seed_lo, seed_hi, position)

    def scaled(self, logits: torch.Tensor) -> torch.Tensor:
        """This group's rows of logits divided by their temperatures, min_p applied (a new
        tensor). min_p in log space: p[t] < min_p * max p  <=>  x[t] < max x + log(min_p)."""
        rows = logits if self.count == logits.shape[0] else logits.index_select(0, self.index)
        scaled = rows / self.temperature[:, None]
        if self.use_min_p:  # rows without it: log(0) = -inf, nothing is below
            cut = scaled.amax(dim=-1, keepdim=True).add_(self.log_min_p[:, None])
            scaled.masked_fill_(scaled < cut, float("-inf"))
        return scaled

    def log_exponential(self, token_ids: torch.Tensor) -> torch.Tensor:
        return _log_exponential(self.a[:, None], self.m[:, None], token_ids)


def _finish(best: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Tokens where the row's best score is finite, else _FAILED. A row's best score is NaN if
    any logit is NaN, +inf if one overflowed, -inf if all are -inf: exactly the rows whose
    softmax is not finite (filtering only masks to -inf and always keeps the row's max; the
    noise is finite)."""
    return torch.where(torch.isfinite(best), tokens, _FAILED)


def _sample_greedy(logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """Argmax (the first one on ties), one max reduction."""
    if len(rows) != logits.shape[0]:
        logits = logits.index_select(0, torch.tensor(rows, dtype=torch.int64).to(logits.device))
    best, tokens = logits.max(dim=-1)
    return _finish(best, tokens)


def _sample_unsorted(logits: torch.Tensor, group: _Rows) -> torch.Tensor:
    """Rows without top-p: temperature, then top-k by its k-th value (torch.topk of the
    group's largest k, no sort), then Gumbel-max over the whole vocabulary in token order."""
    scaled = group.scaled(logits)
    if group.max_top_k:
        top = torch.topk(scaled, group.max_top_k, dim=-1).values  # descending
        kth = top.gather(1, (group.top_k.clamp(max=group.max_top_k) - 1)[:, None])
        kth = kth.masked_fill_((group.top_k >= group.vocab)[:, None], float("-inf"))  # k off
        scaled.masked_fill_(scaled < kth, float("-inf"))
    token_ids = torch.arange(logits.shape[1], dtype=torch.int64, device=logits.device)
    best, tokens = scaled.sub_(group.log_exponential(token_ids)).max(dim=-1)
    return _finish(best, tokens)


def _sample_unsorted_kernel(logits: torch.Tensor, rows: list[int], requests: list[Request],
                            vocab: int) -> torch.Tensor:
    """`_sample_unsorted` by the Triton kernel (kernels.sampling): the same tokens (see there
    for the ulp of log1p/log). One int32 host -> device tensor of parameters; when a row uses
    top-k, torch.topk of the rows' raw logits (else torch.amax when one uses min_p); the
    kernel."""
    from kernels.sampling import ROW, gumbel_sample, pack_rows

    values = _row_values(rows, requests, vocab)
    params = pack_rows([(v.row, v.seed_lo, v.seed_hi, v.position, v.temperature, v.log_min_p,
                         v.top_k - 1 if v.top_k < vocab else -1) for v in values],
                       logits.device)
    max_top_k = _max_top_k(values, vocab)
    top = None
    if max_top_k or any(v.log_min_p > float("-inf") for v in values):
        group = logits if len(rows) == logits.shape[0] else logits.index_select(0, params[:, ROW])
        top = (torch.topk(group, max_top_k, dim=-1).values if max_top_k
               else group.amax(dim=-1, keepdim=True))
    return gumbel_sample(logits, params, top)


def _sample_sorted(logits: torch.Tensor, group: _Rows) -> torch.Tensor:
    """Rows with top-p: one stable descending sort; top-k and top-p masks in sorted order;
    Gumbel-max on the sorted row with each sorted token id's own noise (no scatter back)."""
    ordered, order = torch.sort(group.scaled(logits), dim=-1, descending=True, stable=True)
    if group.max_top_k:
        kth = ordered.gather(1, (group.top_k - 1)[:, None])  # k off: the row's minimum
        ordered.masked_fill_(ordered < kth, float("-inf"))
    probs = torch.softmax(ordered, dim=-1)
    drop = probs.cumsum(dim=-1).sub_(probs) > group.top_p[:, None]  # keeps the crossing token
    best, where = ordered.masked_fill_(drop, float("-inf")) \
        .sub_(group.log_exponential(order)).max(dim=-1)
    return _finish(best, order.gather(1, where[:, None]).squeeze(1))


def _kernel_by_default(device: torch.device) -> bool:
    return device.type == "cuda" and _triton_installed()


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


class Sampled(NamedTuple):
    """One sampling call's result, a row each: the token (or why the row failed), and its
    TokenLogprobs for rows whose request asked (`sampling.logprobs` set), else None."""

    tokens: list[int | SamplingError]
    logprobs: list[TokenLogprobs | None]


def sample(logits: torch.Tensor, requests: list[Request],
           eos_token_ids: AbstractSet[int] = frozenset(), *,
           kernel: bool | None = None) -> list[int | SamplingError]:
    """The tokens of `sample_with_logprobs` (see there)."""
    return sample_with_logprobs(logits, requests, eos_token_ids, kernel=kernel).tokens


def sample_with_logprobs(logits: torch.Tensor, requests: list[Request],
                         eos_token_ids: AbstractSet[int] = frozenset(), *,
                         kernel: bool | None = None) -> Sampled:
    """One token per row of logits ([N, vocab], float32, any device); row i belongs to
    requests[i] and its token is for position requests[i].num_tokens. `eos_token_ids` are the
    model's, masked with stop_token_ids until a request has min_tokens output tokens. The
    logits are not modified. Rows whose request asked for logprobs also get them (raw
    log-softmax of these logits, see "Logprobs" above).

    A row whose distribution is not finite (NaN logits, an overflow to +inf, every logit -inf;
    greedy rows included), or whose logit_bias names a token outside the vocabulary, gives a
    SamplingError in its place (and no logprobs): the other rows are unaffected. Rows are
    grouped on the host (greedy; no top-p; top-p) and each group is sampled with batched ops;
    one device -> host transfer per call brings every token (and the logprobs) back.

    kernel: sample the rows without top-p with the Triton kernel (same tokens, fewer passes);
    None: when the logits are on CUDA and triton is installed. True off CUDA needs Triton's
    interpreter (TRITON_INTERPRET=1 before kernels.sampling is imported; the tests)."""
    if logits.dim() != 2 or logits.shape[0] != len(requests):
        raise ValueError(f"logits {tuple(logits.shape)} do not match {len(requests)} requests")
    result = Sampled([0] * len(requests), [None] * len(requests))
    if not requests:
        return result
    logits = raw = logits.float()
    vocab, device = logits.shape[1], logits.device
    constrained = grammar_rows(requests)
    if constrained:
        logits = mask_grammar_rows(logits, requests, constrained)
    greedy, unsorted, sorted_, processed = [], [], [], []
    for row, request in enumerate(requests):
        params = request.sampling
        if uses_processors(request, eos_token_ids):
            error = bias_error(request, vocab)
            if error is not None:
                result.tokens[row] = SamplingError(error)
                continue
            processed.append(row)
        if params.greedy:
            greedy.append(row)
        elif params.top_p < 1.0:
            sorted_.append(row)
        else:
            unsorted.append(row)
    if processed:
        logits = LogitsProcessors(processed, requests, vocab, eos_token_ids, device).apply(logits)
    parts = []
    if greedy:
        parts.append(_sample_greedy(logits, greedy))
    if unsorted and (kernel if kernel is not None else _kernel_by_default(device)):
        parts.append(_sample_unsorted_kernel(logits, unsorted, requests, vocab))
    elif unsorted:
        parts.append(_sample_unsorted(logits, _Rows(unsorted, requests, vocab, device)))
    if sorted_:
        parts.append(_sample_sorted(logits, _Rows(sorted_, requests, vocab, device)))
    order = greedy + unsorted + sorted_
    if not parts:
        return result
    tokens = parts[0] if len(parts) == 1 else torch.cat(parts)
    asking = _LogprobRows(order, requests)
    if not asking.rows:
        values = tokens.tolist()  # the one transfer
    else:
        values, logprobs = asking.unpack(torch.cat(
            [tokens.double(), asking.compute(raw, tokens).flatten()]).tolist())
        for row, entry in zip(asking.rows, logprobs):
            result.logprobs[row] = entry if entry.token_id != _FAILED else None
    for row, value in zip(order, values):
        result.tokens[row] = int(value) if value != _FAILED else SamplingError(SAMPLING_FAILED)
    return result


class _LogprobRows:
    """The sampled rows whose request asked for logprobs, and how many top entries each wants.
    Built on the host from the requests alone: no device work when none asked."""

    def __init__(self, order: list[int], requests: list[Request]):
        asking = [(i, row, requests[row].sampling.logprobs) for i, row in enumerate(order)
                  if requests[row].sampling.logprobs is not None]
        self.positions = [i for i, _, _ in asking]  # where each row's token is in `order`
        self.rows = [row for _, row, _ in asking]
        self.num_top = [n for _, _, n in asking]
        self.max_top = max(self.num_top, default=0)

    def compute(self, raw: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """[R, 2 + 2 * max_top] float64 on the logits' device, per asking row: its token, the
        token's logprob, the top logprobs (descending, ties by ascending id), the top ids."""
        index = torch.tensor([self.rows, self.positions], dtype=torch.int64).to(raw.device)
        logprobs = torch.log_softmax(raw.index_select(0, index[0]), dim=-1)  # [R, V]
        return _logprob_columns(logprobs, tokens.index_select(0, index[1]), self.max_top)

    def unpack(self, values: list[float]) -> tuple[list[float], list[TokenLogprobs]]:
        """Splits the one transfer: the tokens (as floats, in `order`), then each asking row's
        TokenLogprobs."""
        width = 2 + 2 * self.max_top
        start = len(values) - width * len(self.rows)
        entries = [_unpack_entry(values[start + i * width:start + (i + 1) * width],
                                 self.max_top, n) for i, n in enumerate(self.num_top)]
        return values[:start], entries


def _logprob_columns(logprobs: torch.Tensor, chosen: torch.Tensor, max_top: int) -> torch.Tensor:
    """[R, 2 + 2 * max_top] float64: per row of logprobs ([R, V]), the chosen token (-1: a
    failed row, its values dropped later), its logprob, the top logprobs (descending, ties by
    ascending id), the top ids."""
    chosen_logprob = logprobs.gather(1, chosen.clamp(min=0)[:, None])
    columns = [chosen[:, None].double(), chosen_logprob.double()]
    if max_top:
        top_values, top_ids = torch.topk(logprobs, max_top, dim=-1)
        top_ids, by_id = top_ids.sort(dim=-1, stable=True)  # ties: ascending id ...
        top_values, by_value = top_values.gather(1, by_id).sort(dim=-1, descending=True,
                                                                stable=True)
        columns += [top_values.double(), top_ids.gather(1, by_value).double()]  # ... kept
    return torch.cat(columns, dim=1)


def _unpack_entry(row: list[float], max_top: int, num_top: int) -> TokenLogprobs:
    """One row of `_logprob_columns`, with its first num_top top entries."""
    top, ids = row[2:2 + max_top], row[2 + max_top:]
    return TokenLogprobs(int(row[0]), row[1], tuple(int(t) for t in ids[:num_top]),
                         tuple(top[:num_top]))


def prompt_logprobs(logits: torch.Tensor, next_token_ids: torch.Tensor,
                    num_top: int) -> list[TokenLogprobs]:
    """Prompt logprobs: per row of logits ([N, vocab], the logits at prompt positions p), the
    raw log-softmax read at next_token_ids[i] (the prompt token at p + 1, int64 on the logits'
    device) and the num_top most likely tokens (ordered as the sampled tokens' logprobs). One
    device -> host transfer."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    values = _logprob_columns(logprobs, next_token_ids, num_top).tolist()
    return [_unpack_entry(row, num_top, num_top) for row in values]
