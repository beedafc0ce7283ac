"""Benchmark workloads: prompts as random token ids and the number of tokens to generate for each
(generation ignores EOS, so every request produces exactly that many). Deterministic for a seed;
torch-free (numpy).

`random`: input and output lengths uniform on [min, max] (both ends included). The defaults,
256 requests with 100-1024 tokens in and out, are nano-vllm's bench.py workload (which draws
token ids from [0, 10000]; here they are uniform over the model's vocabulary).

`sharegpt-shaped`: lengths with ShareGPT's means, NOT ShareGPT itself (nothing is downloaded).
vLLM's sharegpt sampling (first human turn as the prompt, the reply's token count as the
output length; pairs with either side under 4 tokens, a prompt over 1024 or a total over 2048
dropped) gives about 217 prompt and 198 output tokens a request: published runs of vLLM's
serving benchmark on 1,000 ShareGPT prompts printed 217,393 input / 197,767 generated tokens
(Qwen2.5 tokenizer) and 215,196 / 198,343, and shared/ANCHORS.md's vLLM offline figures
(6,583 output tok/s at 32.4 req/s) give 203 output tokens a request. Here each length is
log-normal truncated to [4, 1024] (a simplification of vLLM's filter: outputs stop at 1024,
not at 2048 - prompt), input and output independent, with SIGMA = 1.0 (an assumed spread: no
published median or percentile fixed it) and mu solved so that the truncated mean equals the
target. So the means match ShareGPT's; the shape, the tails and the input/output correlation
are approximations.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable

if TYPE_CHECKING:
    import numpy as np

DATASETS = ("random", "sharegpt-shaped")
DEFAULT_NUM_REQUESTS = {"random": 256, "sharegpt-shaped": 1000}
RANDOM_LEN_RANGE = (100, 1024)  # nano-vllm's bench.py: randint(100, 1024) tokens in and out

SHAREGPT_MEAN_INPUT_LEN = 217.0
SHAREGPT_MEAN_OUTPUT_LEN = 198.0
SHAREGPT_LEN_RANGE = (4, 1024)
SHAREGPT_SIGMA = 1.0


@dataclass(frozen=True, slots=True)
class BenchRequest:
    prompt_token_ids: list[int]
    output_len: int  # tokens to generate (EOS ignored)


@dataclass(frozen=True)
class Workload:
    name: str
    seed: int
    requests: list[BenchRequest]

    @property
    def num_input_tokens(self) -> int:
        return sum(len(r.prompt_token_ids) for r in self.requests)

    @property
    def num_output_tokens(self) -> int:
        return sum(r.output_len for r in self.requests)

    def describe(self) -> dict[str, Any]:
        """Name, seed, request count, token totals and length statistics (for the JSON)."""
        return {"name": self.name, "seed": self.seed, "num_requests": len(self.requests),
                "num_input_tokens": self.num_input_tokens,
                "num_output_tokens": self.num_output_tokens,
                "input_len": _length_stats([len(r.prompt_token_ids) for r in self.requests]),
                "output_len": _length_stats([r.output_len for r in self.requests])}


def _length_stats(lengths: list[int]) -> dict[str, float]:
    return {"mean": statistics.fmean(lengths), "median": float(statistics.median(lengths)),
            "min": min(lengths), "max": max(lengths)}


def _rng(seed: int | list[int]) -> np.random.Generator:
    """numpy's generator, imported on first use (the CLI imports this module for its names)."""
    import numpy as np

    return np.random.default_rng(seed)


def random_workload(num_requests: int, vocab_size: int, seed: int,
                    input_len: tuple[int, int] = RANDOM_LEN_RANGE,
                    output_len: tuple[int, int] = RANDOM_LEN_RANGE) -> Workload:
    """Lengths uniform on the inclusive ranges; token ids uniform on [0, vocab_size)."""
    for low, high in (input_len, output_len):
        if not 1 <= low <= high:
            raise ValueError(f"a length range must satisfy 1 <= min <= max, got [{low}, {high}]")
    rng = _rng(seed)
    input_lens = rng.integers(input_len[0], input_len[1], size=num_requests, endpoint=True)
    output_lens = rng.integers(output_len[0], output_len[1], size=num_requests, endpoint=True)
    return Workload("random", seed, _requests(rng, input_lens, output_lens, vocab_size))


def sharegpt_shaped_workload(num_requests: int, vocab_size: int, seed: int) -> Workload:
    """Truncated log-normal lengths with ShareGPT's mean input and output lengths (module doc)."""
    rng = _rng(seed)
    input_lens = _truncated_lognormal(rng, num_requests, SHAREGPT_MEAN_INPUT_LEN)
    output_lens = _truncated_lognormal(rng, num_requests, SHAREGPT_MEAN_OUTPUT_LEN)
    return Workload("sharegpt-shaped", seed, _requests(rng, input_lens, output_lens, vocab_size))


def build_workload(name: str, num_requests: int | None, vocab_size: int, seed: int,
                   max_model_len: int, input_len: tuple[int, int] = RANDOM_LEN_RANGE,
                   output_len: tuple[int, int] = RANDOM_LEN_RANGE) -> Workload:
    """The named workload (input_len / output_len apply to `random`). Raises ValueError when its
    longest possible request (prompt + output) exceeds max_model_len, since such a request
    would stop early and generate fewer tokens than drawn."""
    num_requests = num_requests or DEFAULT_NUM_REQUESTS[name]
    if name == "random":
        longest = input_len[1] + output_len[1]
    elif name == "sharegpt-shaped":
        longest = 2 * SHAREGPT_LEN_RANGE[1]
    else:
        raise ValueError(f"unknown dataset {name!r}; choose from {DATASETS}")
    if longest > max_model_len:
        raise ValueError(f"dataset {name!r} can draw {longest}-token requests (prompt + output) "
                         f"but the model serves {max_model_len}: lower the lengths or raise "
                         "--max-model-len / the KV cache")
    if name == "random":
        return random_workload(num_requests, vocab_size, seed, input_len, output_len)
    return sharegpt_shaped_workload(num_requests, vocab_size, seed)


def warmup_requests(workload: Workload, num_requests: int, output_len: int,
                    vocab_size: int) -> list[BenchRequest]:
    """Requests shaped like the workload's first `num_requests` (same prompt lengths, at most
    `output_len` outputs) and token ids from a stream of their own ([seed, 1]), so a warm-up
    run leaves nothing in the prefix cache that a measured run could hit."""
    rng = _rng([workload.seed, 1])
    return [BenchRequest(rng.integers(0, vocab_size, size=len(r.prompt_token_ids)).tolist(),
                         min(r.output_len, output_len))
            for r in workload.requests[:num_requests]]


def _requests(rng: np.random.Generator, input_lens: Iterable[int], output_lens: Iterable[int],
              vocab_size: int) -> list[BenchRequest]:
    return [BenchRequest(rng.integers(0, vocab_size, size=int(n_in)).tolist(), int(n_out))
            for n_in, n_out in zip(input_lens, output_lens)]


def _truncated_lognormal(rng: np.random.Generator, size: int, mean: float,
                         sigma: float = SHAREGPT_SIGMA,
                         bounds: tuple[int, int] = SHAREGPT_LEN_RANGE) -> list[int]:
    """Integer lengths: log-normal(mu, sigma) conditioned on [low, high] (draws outside are
    redrawn), mu chosen so that the conditioned mean is `mean`, then rounded."""
    low, high = bounds
    mu = _fit_mu(mean, sigma, low, high)
    values: list[float] = []
    while len(values) < size:
        draws = rng.lognormal(mu, sigma, size=2 * size)
        values += draws[(draws >= low) & (draws <= high)].tolist()
    return [min(max(round(v), low), high) for v in values[:size]]


def _fit_mu(mean: float, sigma: float, low: float, high: float) -> float:
    """Bisection for mu: the mean of log-normal(mu, sigma) truncated to [low, high] rises with
    mu, from about `low` to about `high`."""
    lo, hi = math.log(low) - 5 * sigma, math.log(high) + 5 * sigma
    for _ in range(100):
        mid = (lo + hi) / 2
        if _truncated_lognormal_mean(mid, sigma, low, high) < mean:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _truncated_lognormal_mean(mu: float, sigma: float, low: float, high: float) -> float:
    """E[X | low <= X <= high] for ln X ~ N(mu, sigma^2):
    exp(mu + sigma^2/2) * [Phi(b - sigma) - Phi(a - sigma)] / [Phi(b) - Phi(a)],
    a = (ln low - mu) / sigma, b = (ln high - mu) / sigma."""
    a, b = (math.log(low) - mu) / sigma, (math.log(high) - mu) / sigma
    mass = _phi(b) - _phi(a)
    if mass <= 0.0:
        return low if a > 0 else high  # all the mass beyond one bound
    return math.exp(mu + sigma ** 2 / 2) * (_phi(b - sigma) - _phi(a - sigma)) / mass


def _phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))
