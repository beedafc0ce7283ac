"""The batched sampler: the counter hash is pinned (it is part of the cross-tier contract), uniform
and exact; a seeded draw depends on (seed, position) alone, never on the batch; the empirical
distribution matches softmax(logits / T) after top-k / top-p; filtered tokens are never drawn;
greedy is argmax; a row that cannot be sampled fails alone."""

from __future__ import annotations

import math
import random

import pytest
import torch

from engine.request import Request
from engine.sampler import (KEY_IV_A, KEY_IV_B, MASK32, SamplingError, _mix32_, counter_hash,
                            mix32, sample, token_hash, uniform)
from engine.sampling_params import SamplingParams

# h(seed, position, t) for t in TOKENS, computed once with the sampler as specified in its
# docstring. A prefill and a decode tier must agree on these: if this test fails, the sampler's
# random stream changed, which is a contract change (tiers of different versions would no longer
# reproduce each other's seeded outputs).
TOKENS = [0, 1, 2, 50000, 128255]
PINNED = {
    (0, 0): [1106484830, 3065996394, 2324835341, 1817418742, 2338720248],
    (1, 0): [191656671, 1380759942, 4110019362, 4235428141, 1673713340],
    (0, 1): [2968491419, 4108961146, 3153401845, 1709252332, 3691695176],
    (2**64 - 1, 7): [1304852274, 124049537, 1519196897, 2277518495, 511380563],
    (123456789, 4096): [2966252054, 1260192524, 3227564520, 1255504574, 2873587743],
    (2**63, 2**32 - 1): [2799569087, 4000373747, 3990103433, 2115203080, 626327431],
}

# chi-square critical values at p = 0.001, by degrees of freedom
CHI2_CRIT = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}


def request(seed: int | None = None, position: int = 5, **sampling) -> Request:
    params = SamplingParams(max_tokens=4, seed=seed, **sampling)
    prompt = list(range(1, position + 1))  # num_tokens == position
    return Request("r", prompt, params)


# --- an independent reference, from the docstring, on Python ints --------------------------

def ref_mix32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def ref_hash(seed: int, position: int, token: int) -> int:
    s0, s1, p = seed & MASK32, (seed >> 32) & MASK32, position & MASK32
    lanes = []
    for iv in (KEY_IV_A, KEY_IV_B):
        x = ref_mix32(iv ^ s0)
        x = ref_mix32(x ^ s1)
        lanes.append(ref_mix32(x ^ p))
    a, m = lanes[0], lanes[1] | 1
    return ref_mix32((a + m * token) & MASK32)


def ref_filter(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The former per-row filter (the semantics the batched one must keep)."""
    logits = logits / params.temperature
    if 0 < params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(-1) - probs > params.top_p
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


# --- the hash ------------------------------------------------------------------------------

def test_hash_outputs_are_pinned():
    tokens = torch.tensor(TOKENS)
    for (seed, position), expected in PINNED.items():
        assert counter_hash(seed, position, tokens).tolist() == expected, (seed, position)
        assert [ref_hash(seed, position, t) for t in TOKENS] == expected, (seed, position)


def test_hash_on_tensors_equals_the_python_int_reference():
    rng = random.Random(0)
    seeds = [0, 1, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1] + [rng.getrandbits(64)
                                                                      for _ in range(8)]
    tokens = [0, 1, 2, 255, 256, 65535, 65536, 131071, 2**31 - 1]
    for seed in seeds:
        position = rng.randrange(2**32)
        got = counter_hash(seed, position, torch.tensor(tokens)).tolist()
        assert got == [ref_hash(seed, position, t) for t in tokens], seed
    edge = [0, 1, 2**16, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1]
    values = torch.tensor(edge + [rng.getrandbits(32) for _ in range(1000)])
    expected = [ref_mix32(v) for v in values.tolist()]
    assert mix32(values).tolist() == expected
    assert _mix32_(values.clone()).tolist() == expected  # the in-place one used on [N, vocab]
    assert [mix32(v) for v in values.tolist()] == expected  # same function on Python ints


def test_a_seed_folds_into_two_lanes_mod_2_64():
    tokens = torch.arange(64)
    assert torch.equal(counter_hash(-1, 3, tokens), counter_hash(2**64 - 1, 3, tokens))
    # the high lane matters: seeds equal in their low 32 bits give different streams
    assert not torch.equal(counter_hash(5, 3, tokens), counter_hash(5 + 2**32, 3, tokens))
    assert not torch.equal(counter_hash(5, 3, tokens), counter_hash(5 + 2**63, 3, tokens))


def test_the_hash_is_uniform_enough():
    tokens = torch.arange(16384)
    rows = [(seed, position) for seed in (0, 1, 2**40 + 3, 2**64 - 1) for position in range(16)]
    h = torch.stack([counter_hash(s, p, tokens) for s, p in rows])  # [64, 16384]: ~1M counters
    u = uniform(h).double()
    n = u.numel()
    assert 0.0 < u.min() and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 5 * math.sqrt(1 / 12 / n)
    assert abs(u.var() - 1 / 12) < 5 * math.sqrt(1 / 180 / n)  # var of (U - 1/2)^2 is 1/180
    counts = torch.bincount((u * 256).long().flatten(), minlength=256).double()
    chi2 = ((counts - n / 256) ** 2 / (n / 256)).sum()
    assert chi2 < 330, chi2  # df 255, p ~ 0.001
    bits = torch.stack([(h >> b) & 1 for b in range(32)]).double().mean(dim=(1, 2))
    assert (bits - 0.5).abs().max() < 5 * math.sqrt(0.25 / n)
    # neighbours (next token, next position, a seed one bit away) are uncorrelated
    centred = u - 0.5
    limit = 5 / math.sqrt(n / 2)

    def corr(x: torch.Tensor, y: torch.Tensor) -> float:
        return float((x * y).mean() / math.sqrt(float((x * x).mean() * (y * y).mean())))

    assert abs(corr(centred[:, 1:], centred[:, :-1])) < limit
    assert abs(corr(centred[1:], centred[:-1])) < limit
    for bit in (0, 31, 32, 63):
        other = torch.stack([counter_hash(s ^ (1 << bit), p, tokens) for s, p in rows])
        assert abs(corr(centred, uniform(other).double() - 0.5)) < limit, bit
    # and the Gumbel noise has the Gumbel's mean (Euler's gamma) and variance (pi^2 / 6)
    gumbel = -torch.log(-torch.log1p(-u))
    assert abs(gumbel.mean() - 0.5772157) < 5 * math.sqrt(math.pi**2 / 6 / n)
    assert abs(gumbel.var() - math.pi**2 / 6) < 0.02


def test_a_row_never_repeats_a_hash():
    h = counter_hash(42, 9, torch.arange(200_000))
    assert h.unique().numel() == h.numel()


# --- reproducibility -----------------------------------------------------------------------

OTHERS = [dict(temperature=0.0), dict(temperature=1.0), dict(temperature=0.5, top_k=7),
          dict(temperature=1.3, top_p=0.8), dict(temperature=0.9, top_k=20, top_p=0.5),
          dict(temperature=2.0, top_k=1), dict(temperature=1e-7)]


@pytest.mark.parametrize("params", [dict(temperature=1.0), dict(temperature=0.3),
                                    dict(temperature=0.8, top_k=40),
                                    dict(temperature=1.0, top_p=0.9),
                                    dict(temperature=1.2, top_k=100, top_p=0.95)])
def test_a_seeded_draw_does_not_depend_on_the_batch(params):
    vocab = 1000
    rng = random.Random(1)
    gen = torch.Generator().manual_seed(1)
    for trial in range(6):
        target = request(seed=rng.getrandbits(64), position=rng.randrange(1, 300), **params)
        row = torch.randn(vocab, generator=gen) * 3
        alone = sample(row[None], [target])
        others = [request(seed=rng.choice([None, rng.getrandbits(64)]),
                          position=rng.randrange(1, 300), **rng.choice(OTHERS))
                  for _ in range(32)]
        logits = torch.randn(33, vocab, generator=gen) * 3
        logits[rng.randrange(33)] = float("nan")  # even a failing neighbour changes nothing
        at = rng.randrange(33)
        logits[at] = row
        batch = others[:at] + [target] + others[at:]
        tokens = sample(logits, batch)
        assert tokens[at] == alone[0], (trial, params)
        # and in reverse order
        assert sample(logits.flip(0), batch[::-1])[32 - at] == alone[0]


def test_the_same_request_twice_in_a_batch_draws_the_same_token():
    row = torch.randn(500) * 2
    tokens = sample(row.expand(8, 500), [request(seed=77, position=12, top_p=0.9)] * 8)
    assert len(set(tokens)) == 1


def test_different_seeds_give_different_tokens():
    flat = torch.zeros(50, 100)
    tokens = sample(flat, [request(seed=seed) for seed in range(50)])
    # 50 draws from 100 equally likely tokens: ~39.5 distinct expected
    assert len(set(tokens)) >= 30, tokens


def test_the_position_changes_the_draw():
    flat = torch.zeros(50, 100)
    tokens = sample(flat, [request(seed=3, position=p) for p in range(1, 51)])
    assert len(set(tokens)) >= 30, tokens
    same_position = sample(flat, [request(seed=3, position=9)] * 50)
    assert len(set(same_position)) == 1


def test_unseeded_requests_draw_afresh_each_call():
    random.seed(0)
    flat = torch.zeros(50, 100)
    first = sample(flat, [request(seed=None) for _ in range(50)])
    second = sample(flat, [request(seed=None) for _ in range(50)])
    assert len(set(first)) >= 30 and first != second


def test_seeds_across_the_uint64_range_sample():
    logits = torch.zeros(4, 100)
    seeds = [0, 2**63 - 1, 2**63, 2**64 - 1]
    tokens = sample(logits, [request(seed=s) for s in seeds])
    assert all(isinstance(t, int) and 0 <= t < 100 for t in tokens)


# --- the distribution ----------------------------------------------------------------------

LOGITS8 = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])


@pytest.mark.parametrize("params", [dict(temperature=1.0), dict(temperature=0.7),
                                    dict(temperature=2.5), dict(temperature=1.0, top_k=3),
                                    dict(temperature=1.0, top_p=0.8),
                                    dict(temperature=0.6, top_k=5, top_p=0.7),
                                    dict(temperature=1.0, top_p=0.3)])
@pytest.mark.parametrize("vary", ["seed", "position"])
def test_the_empirical_distribution_matches_softmax(params, vary):
    """4000 draws in one call (fixed seeds, so deterministic): the counts pass a chi-square test
    against softmax(filter(logits)) at p = 0.001, and every frequency is within 4.5 standard
    deviations (sqrt(p (1 - p) / n)) of its probability; filtered tokens are never drawn."""
    n = 4000
    if vary == "seed":
        requests = [request(seed=1000 + i, position=17, **params) for i in range(n)]
    else:
        requests = [request(seed=99, position=1 + i, **params) for i in range(n)]
    tokens = sample(LOGITS8.expand(n, 8).contiguous(), requests)
    counts = torch.bincount(torch.tensor(tokens), minlength=8).double()
    probs = torch.softmax(ref_filter(LOGITS8, SamplingParams(4, **params)), dim=-1).double()
    kept = probs > 0
    assert (counts[~kept] == 0).all(), (counts, probs)
    expected = probs[kept] * n
    chi2 = float(((counts[kept] - expected) ** 2 / expected).sum())
    df = int(kept.sum()) - 1
    if df:
        assert chi2 < CHI2_CRIT[df], (chi2, counts.tolist(), (probs * n).tolist())
    sigma = (probs * (1 - probs) / n).sqrt()
    assert ((counts / n - probs).abs() <= 4.5 * sigma + 1e-12).all()


def test_top_k_keeps_ties_at_the_kth_value():
    logits = torch.tensor([3.0, 1.0, 1.0, 1.0, 0.0, -1.0])
    n = 3000
    tokens = sample(logits.expand(n, 6).contiguous(),
                    [request(seed=i, top_k=2, temperature=0.5) for i in range(n)])
    assert set(tokens) == {0, 1, 2, 3}  # the three tied at the 2nd value are all kept


@pytest.mark.parametrize("params", [dict(top_k=5), dict(top_k=1, temperature=3.0),
                                    dict(top_p=0.5), dict(top_p=0.05, temperature=2.0),
                                    dict(top_k=30, top_p=0.6, temperature=0.8)])
def test_filtered_tokens_are_never_drawn(params):
    vocab, n = 1000, 200
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(n, vocab, generator=gen) * 2
    logits[:, 7] = logits[:, 3]  # some exact ties
    requests = [request(seed=i, position=3 + i, **params) for i in range(n)]
    tokens = sample(logits, requests)
    for row, (token, req) in enumerate(zip(tokens, requests)):
        allowed = torch.isfinite(ref_filter(logits[row], req.sampling))
        assert allowed[token], (row, token, params)


def test_the_noise_uses_the_sorted_token_ids_consistently():
    # a top-p of ~1 keeps every token: the sorted path must then draw like the unsorted path
    # would with the same scores (same noise per token id), apart from a tie it cannot have here
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(64, 300, generator=gen)
    sorted_path = sample(logits, [request(seed=i, top_p=0.999999) for i in range(64)])
    probs = torch.softmax(logits, dim=-1)
    plain = sample(logits, [request(seed=i) for i in range(64)])
    for row in range(64):
        kept = torch.isfinite(ref_filter(logits[row], SamplingParams(4, top_p=0.999999)))
        if kept.all():
            assert sorted_path[row] == plain[row], row
        elif kept[plain[row]]:  # the plain draw survived the cut: the sorted one is the same
            assert sorted_path[row] == plain[row], (row, float(probs[row, plain[row]]))


# --- greedy and failures -------------------------------------------------------------------

def test_greedy_and_tiny_temperatures_are_argmax():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 50, generator=gen)
    logits[2, 10] = logits[2, 20] = 9.0  # a tie: the first wins
    requests = [request(temperature=0.0), request(temperature=1e-6, seed=3),
                request(temperature=0.0, top_k=3, top_p=0.2), request(temperature=1.0, seed=1),
                request(temperature=1e-40), request(temperature=0.0, seed=8)]
    tokens = sample(logits, requests)
    argmax = logits.argmax(dim=-1).tolist()
    assert tokens[2] == 10
    assert [tokens[i] for i in (0, 1, 2, 4, 5)] == [argmax[i] for i in (0, 1, 2, 4, 5)]


def test_rows_that_cannot_be_sampled_fail_alone():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(9, 40, generator=gen)
    logits[1] = float("nan")
    logits[3, 5] = float("inf")
    logits[5] = float("-inf")
    logits[7, 2] = float("nan")  # one NaN is enough
    requests = [request(seed=1), request(seed=2), request(seed=3, top_p=0.9),
                request(seed=4, top_k=3), request(seed=5, top_k=4, top_p=0.5),
                request(seed=6), request(temperature=0.0), request(temperature=0.0),
                request(seed=9, temperature=float("nan"))]  # unvalidated: fails
    tokens = sample(logits, requests)
    failed = [i for i, t in enumerate(tokens) if isinstance(t, SamplingError)]
    assert failed == [1, 3, 5, 7, 8]
    for i in (0, 2, 4, 6):
        assert tokens[i] == sample(logits[i:i + 1], [requests[i]])[0]
    masked = logits[4].clone()
    masked[:30] = float("-inf")  # -inf logits (masked tokens) are fine while one is finite
    assert isinstance(sample(masked[None], [request(seed=1)])[0], int)


def test_input_checks():
    assert sample(torch.zeros(0, 10), []) == []
    with pytest.raises(ValueError):
        sample(torch.zeros(2, 10), [request(seed=1)])


def test_token_hash_broadcasts_over_rows():
    a = torch.tensor([[5], [7]])
    m = torch.tensor([[3], [9]])
    t = torch.arange(4)
    h = token_hash(a, m, t)
    assert h.shape == (2, 4)
    assert h[1].tolist() == [ref_mix32((7 + 9 * i) & MASK32) for i in range(4)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_agrees_with_cpu():
    tokens = torch.arange(128256)
    for seed, position in [(0, 0), (2**64 - 1, 7), (987654321, 4096)]:
        assert torch.equal(counter_hash(seed, position, tokens.cuda()).cpu(),
                           counter_hash(seed, position, tokens))
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(64, 32000, generator=gen) * 3
    kinds = [dict(temperature=0.0), dict(temperature=0.8), dict(temperature=1.0, top_k=50),
             dict(temperature=0.7, top_p=0.9), dict(temperature=1.0, top_k=40, top_p=0.95)]
    requests = [request(seed=i, position=10 + i, **kinds[i % len(kinds)]) for i in range(64)]
    assert sample(logits.cuda(), requests) == sample(logits, requests)
