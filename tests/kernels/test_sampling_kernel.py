"""The Gumbel-max sampling kernel (kernels.sampling) against engine.sampler's torch path: the
same token for every row (temperature, top-k, min_p, both; seeds across the uint64 range;
float32 and float16 logits, bfloat16 on CUDA), -1 for the rows `_finish` fails, the lowest id
on ties, rows picked from a larger (strided) logits tensor, any number of vocabulary splits.
Then the sampler with the kernel: a mixed batch (greedy, top-p, logprobs, penalties, bias)
gives the same tokens and logprobs with and without it, and a seeded draw does not depend on
the batch.

Without a GPU the kernel runs in Triton's interpreter, whose log1p/log are not torch's (an ulp
apart, see kernels/sampling.py): tokens can differ only when a row's two best scores lie within
an ulp, which the fixed inputs here do not have; nor does it have approximate math, so every
variant is also compiled for an H100 (no GPU needed) and its PTX checked for exact division. On
CUDA the inputs are fresh each run (the generator seed is in the failure message), and the
cases at Llama 3's vocabulary run too.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from engine.request import Request  # noqa: E402
from engine.sampler import SamplingError, sample, sample_with_logprobs, split_seed  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from kernels.sampling import gumbel_sample, pack_rows  # noqa: E402

ON_CUDA = torch.cuda.is_available()
DTYPES = (torch.float32, torch.float16) + ((torch.bfloat16,) if ON_CUDA else ())
VOCAB = 2500  # three tiles of 1024, the last partial
SEEDS = [0, 1, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1]
needs_cuda = pytest.mark.skipif(not ON_CUDA, reason="needs CUDA")


@pytest.fixture
def generator() -> torch.Generator:
    """Fixed on the CPU (the interpreter's ulp, see the module docstring); fresh on CUDA."""
    return torch.Generator().manual_seed(random.SystemRandom().getrandbits(32) if ON_CUDA else 0)


def request(seed: int | None = None, position: int = 5, output: list[int] = (),
            **sampling) -> Request:
    params = SamplingParams(max_tokens=4, seed=seed, **sampling)
    prompt = list(itertools.islice(itertools.cycle(range(1, 1000)), position - len(output)))
    return Request("r", prompt, params, list(output))


def random_requests(rng: random.Random, count: int) -> list[Request]:
    """Seeded rows without top-p: temperatures 0.3..2, top-k on about a third, min_p on about
    a third, both on some; seeds from SEEDS and random ones; positions up to 131072."""
    requests = []
    for _ in range(count):
        sampling = dict(temperature=rng.uniform(0.3, 2.0))
        if rng.random() < 0.35:
            sampling["top_k"] = rng.choice([1, 2, 7, 50, 400])
        if rng.random() < 0.35:
            sampling["min_p"] = rng.choice([0.01, 0.1, 0.5])
        requests.append(request(seed=rng.choice(SEEDS + [rng.getrandbits(64)]),
                                position=rng.choice([1, rng.randrange(2, 5000), 131072]),
                                **sampling))
    return requests


def kernel_tokens(logits: torch.Tensor, requests: list[Request], rows: list[int] | None = None,
                  num_splits: int | None = None) -> list[int]:
    """gumbel_sample of logits' `rows` (default: all, in order) for these (seeded) requests."""
    rows = list(range(len(requests))) if rows is None else rows
    vocab = logits.shape[1]
    top_ks = [r.sampling.top_k if 0 < r.sampling.top_k < vocab else 0 for r in requests]
    params = pack_rows(
        [(row, *split_seed(r.sampling.seed), r.num_tokens, r.sampling.temperature,
          math.log(r.sampling.min_p) if r.sampling.min_p else float("-inf"), k - 1)
         for row, r, k in zip(rows, requests, top_ks)], logits.device)
    top = None
    if max(top_ks) or any(r.sampling.min_p for r in requests):
        top = torch.topk(logits[rows], max(max(top_ks), 1), dim=-1).values
    return gumbel_sample(logits, params, top, num_splits).tolist()


def torch_tokens(logits: torch.Tensor, requests: list[Request]) -> list[int]:
    """The sampler's torch path, failures as -1 (the kernel's encoding)."""
    return [-1 if isinstance(t, SamplingError) else t
            for t in sample(logits.float(), requests, kernel=False)]


# --- the kernel against the torch path ------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_splits", [1, 2, None])
def test_kernel_tokens_equal_the_torch_path(kernel_device, generator, dtype, num_splits):
    rng = random.Random(generator.initial_seed())
    requests = random_requests(rng, 12)
    logits = (torch.randn(12, VOCAB, generator=generator) * 3).to(kernel_device, dtype)
    logits[3, :VOCAB // 2] = float("-inf")  # masked tokens (a grammar, min_tokens)
    expected = torch_tokens(logits, requests)
    assert kernel_tokens(logits, requests, num_splits=num_splits) == expected, \
        generator.initial_seed()
    assert all(0 <= t < VOCAB for t in expected)


def test_top_k_and_min_p_with_ties_at_the_cut(kernel_device, generator):
    """Coarse logits (many exact ties, at the k-th value too), peaked rows where fewer than k
    tokens survive min_p, and rows of neighbouring floats (3 + n ulp) that the division by T
    partly merges: the kernel's k-th value (divided after torch.topk) must cut where the
    torch path's (torch.topk after the division) does."""
    rng = random.Random(generator.initial_seed() + 1)
    logits = (torch.randn(16, VOCAB, generator=generator) * 4).round_().div_(2)
    logits[::4, :8] += 20.0  # peaked: min_p keeps a handful
    logits[1::2] = 3.0 + torch.randint(0, 40, (8, VOCAB), generator=generator) * 2.0**-22
    requests = [request(seed=rng.getrandbits(64), position=rng.randrange(1, 999),
                        temperature=rng.choice([0.3, 0.7, 1.0, 1.9]),
                        top_k=rng.choice([0, 3, 10, 64]), min_p=rng.choice([0.0, 0.05, 0.3]))
                for _ in range(16)]
    logits = logits.to(kernel_device)
    assert kernel_tokens(logits, requests, num_splits=2) == torch_tokens(logits, requests), \
        generator.initial_seed()


@pytest.mark.parametrize("temperature", [0.3, 0.7, 1.3, 1.9])
def test_a_cut_at_the_maximum_is_exact(kernel_device, generator, temperature):
    """top_k=1 and min_p=1 cut at the row's own max / T, among neighbouring floats (b + n ulp,
    which the division partly merges): the tokens kept, and so the draw, depend on that value
    to the last bit (a multiply by 1/T instead of the division would keep other tokens)."""
    rng = random.Random(generator.initial_seed() + 5)
    base = 2.0 + 2 * torch.rand(32, 1, generator=generator)  # in [2, 4): one ulp is 2**-22
    logits = base + torch.randint(0, 40, (32, VOCAB), generator=generator) * 2.0**-22
    requests = [request(seed=rng.getrandbits(64), temperature=temperature,
                        **(dict(top_k=1) if i % 2 else dict(min_p=1.0))) for i in range(32)]
    logits = logits.to(kernel_device)
    expected = torch_tokens(logits, requests)
    assert kernel_tokens(logits, requests) == expected, generator.initial_seed()
    scaled = logits.cpu() / temperature
    assert all(scaled[i, t] == scaled[i].max() for i, t in enumerate(expected))


def test_rows_that_cannot_be_sampled_give_minus_one(kernel_device, generator):
    logits = torch.randn(9, VOCAB, generator=generator)
    logits[0] = float("nan")
    logits[1, 2000] = float("nan")  # one NaN is enough, in the last tile
    logits[2, 5] = float("inf")
    logits[3] = float("-inf")
    logits[4] = float("-inf")
    logits[4, 1777] = 0.0  # one finite logit: that token
    logits[5, 100] = float("nan")  # with top-k and min_p: still failed
    logits[6, 100] = float("inf")
    logits[8] = float("-inf")
    requests = [request(seed=i, temperature=0.8) for i in range(9)]
    requests[5] = request(seed=5, top_k=3, min_p=0.1)
    requests[6] = request(seed=6, top_k=3, min_p=0.1)
    requests[7] = request(seed=7, temperature=float("nan"))  # unvalidated
    requests[8] = request(seed=8, min_p=0.2, top_k=5)
    logits = logits.to(kernel_device)
    expected = [-1, -1, -1, -1, 1777, -1, -1, -1, -1]
    assert torch_tokens(logits, requests) == expected
    for num_splits in (1, 3):
        assert kernel_tokens(logits, requests, num_splits=num_splits) == expected


@pytest.mark.parametrize("num_splits", [1, 2, 3])
def test_ties_give_the_lowest_token(kernel_device, num_splits):
    """Logits so large that the noise vanishes in their rounding: the tied tokens share the best
    score. Ties across lanes, tiles (700 + 1024) and splits; the lowest id wins."""
    logits = torch.zeros(4, VOCAB)
    tied = [[2400, 700, 1724, 1500], [1724, 700], [1024, 2047, 2499], [300, 301]]
    for row, tokens in enumerate(tied):
        logits[row, tokens] = 1e30
    requests = [request(seed=1), request(seed=2, top_k=2), request(seed=3, min_p=0.5),
                request(seed=4, temperature=0.5, top_k=1)]
    logits = logits.to(kernel_device)
    expected = [min(tokens) for tokens in tied]
    assert torch_tokens(logits, requests) == expected
    assert kernel_tokens(logits, requests, num_splits=num_splits) == expected


def test_rows_picked_from_a_larger_strided_tensor(kernel_device, generator):
    wide = torch.randn(20, VOCAB + 100, generator=generator).to(kernel_device)
    logits = wide[:, :VOCAB]  # row stride VOCAB + 100
    rows = [17, 3, 3, 9, 0]  # any rows, a row twice
    requests = random_requests(random.Random(generator.initial_seed() + 2), len(rows))
    expected = torch_tokens(logits[rows], requests)
    assert kernel_tokens(logits, requests, rows) == expected
    assert kernel_tokens(logits, requests, rows, num_splits=3) == expected


def test_no_rows(kernel_device):
    logits = torch.zeros(2, VOCAB, device=kernel_device)
    params = pack_rows([], kernel_device)
    assert gumbel_sample(logits, params).shape == (0,)


# --- the sampler with the kernel ----------------------------------------------------------

def test_the_sampler_gives_the_same_tokens_with_and_without_the_kernel(kernel_device,
                                                                       generator):
    rng = random.Random(generator.initial_seed() + 3)
    requests = random_requests(rng, 6) + [
        request(temperature=0.0),
        request(seed=None, temperature=0.9),  # unseeded: the same fresh seed both times
        request(seed=None, top_k=20),
        request(seed=11, top_p=0.9),
        request(seed=12, top_k=30, top_p=0.8, min_p=0.05),
        request(seed=13, logprobs=3),
        request(seed=14, top_k=5, logprobs=0),
        request(temperature=0.0, logprobs=2),
        request(seed=15, output=[7, 7, 8], repetition_penalty=1.3, frequency_penalty=0.5,
                presence_penalty=0.2),
        request(seed=16, logit_bias=((3, 5.0), (40, -100.0)), min_p=0.1),
        request(seed=17, temperature=1.5, top_k=3, output=[1, 2], presence_penalty=1.0),
        request(seed=18, logit_bias=((VOCAB + 5, 1.0),)),  # out of the vocabulary: fails
    ]
    logits = (torch.randn(len(requests), VOCAB, generator=generator) * 2).to(kernel_device)
    logits[2] = float("nan")
    results = []
    for kernel in (True, False):
        random.seed(5)
        results.append(sample_with_logprobs(logits, requests, kernel=kernel))
    with_kernel, without = results
    assert [str(t) for t in with_kernel.tokens] == [str(t) for t in without.tokens], \
        generator.initial_seed()
    assert with_kernel.logprobs == without.logprobs
    assert isinstance(with_kernel.tokens[2], SamplingError)
    assert isinstance(with_kernel.tokens[-1], SamplingError)
    assert sum(isinstance(t, int) for t in with_kernel.tokens) == len(requests) - 2


OTHERS = [dict(temperature=0.0), dict(temperature=1.0), dict(temperature=0.5, top_k=7),
          dict(temperature=1.3, top_p=0.8), dict(temperature=0.9, min_p=0.1),
          dict(temperature=2.0, top_k=1, min_p=0.05)]


@pytest.mark.parametrize("params", [dict(temperature=1.0), dict(temperature=0.4, top_k=40),
                                    dict(temperature=0.7, min_p=0.1),
                                    dict(temperature=1.2, min_p=0.05, top_k=100)])
def test_a_seeded_draw_does_not_depend_on_the_batch(kernel_device, generator, params):
    rng = random.Random(generator.initial_seed() + 4)
    target = request(seed=rng.getrandbits(64), position=rng.randrange(1, 300), **params)
    row = (torch.randn(VOCAB, generator=generator) * 3).to(kernel_device)
    alone = sample(row[None], [target], kernel=True)
    assert alone == sample(row[None], [target], kernel=False)
    others = [request(seed=rng.choice([None, rng.getrandbits(64)]),
                      position=rng.randrange(1, 300), **rng.choice(OTHERS)) for _ in range(32)]
    logits = (torch.randn(33, VOCAB, generator=generator) * 3).to(kernel_device)
    logits[rng.randrange(33)] = float("nan")  # even a failing neighbour changes nothing
    at = rng.randrange(33)
    logits[at] = row
    batch = others[:at] + [target] + others[at:]
    assert sample(logits, batch, kernel=True)[at] == alone[0]
    assert sample(logits.flip(0), batch[::-1], kernel=True)[32 - at] == alone[0]


# --- compiled for a GPU, also where there is none ----------------------------------------------

COMPILE_FOR_SM90 = """
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels import sampling

pointers = {"logits_ptr": "*fp32", "params_ptr": "*i32", "top_ptr": "*fp32", "out_ptr": "*i64",
            "best_ptr": "*fp32", "token_ptr": "*i32"}
scalars = ["stride_row", "stride_top", "vocab", "chunk", "num_splits"]
flags = ["HAS_TOP", "SPLIT", "LIBDEVICE", "BLOCK"]
signature = pointers | {name: "i32" for name in scalars} | {name: "constexpr" for name in flags}
ptx = {}
for has_top in (False, True):
    for split in (False, True):
        source = ASTSource(fn=sampling._gumbel_kernel, signature=signature,
                           constexprs={"HAS_TOP": has_top, "SPLIT": split, "LIBDEVICE": True,
                                       "BLOCK": 1024})
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
        ptx[f"{has_top} {split}"] = compiled.asm["ptx"]
reduce = ASTSource(fn=sampling._reduce_splits_kernel, constexprs={"BLOCK": 64},
                   signature={"best_ptr": "*fp32", "token_ptr": "*i32", "out_ptr": "*i64",
                              "num_splits": "i32", "BLOCK": "constexpr"})
ptx["reduce"] = triton.compile(reduce, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
json.dump(ptx, sys.stdout)
"""


def test_the_kernel_compiles_for_an_h100_with_exact_division():
    """The interpreter runs what the GPU compiler may reject, and it has no approximate math:
    compile every variant for sm_90 (in a process without TRITON_INTERPRET; Triton's compiler
    needs no GPU) and check that the divisions are IEEE round-to-nearest (div.rn, not
    div.full/div.approx, which Triton's plain / gives) and no log is the approximate lg2."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE_FOR_SM90], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for variant, ptx in json.loads(done.stdout).items():
        if variant != "reduce":
            assert "div.rn.f32" in ptx, variant
        for approximate in ("div.full.f32", "div.approx", "lg2.approx", "ex2.approx"):
            assert approximate not in ptx, (variant, approximate)


# --- CUDA: Llama 3's vocabulary, batch 1 and 64, the default splits --------------------------

@needs_cuda
@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("dtype", DTYPES)
def test_llama3_vocabulary_on_cuda(generator, batch, dtype):
    vocab = 128256
    requests = random_requests(random.Random(generator.initial_seed()), batch)
    logits = (torch.randn(batch, vocab, generator=generator) * 4).to("cuda", dtype)
    expected = torch_tokens(logits, requests)
    assert kernel_tokens(logits, requests) == expected, generator.initial_seed()
    assert sample(logits.float(), requests) == expected  # the default on CUDA: the kernel
