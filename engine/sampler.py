"""Token sampling: greedy, temperature, top-k, top-p, seeded.

A seeded request draws each token from a generator seeded by (seed, token position), so the
first token (sampled on the prefill tier) and the rest (decode tier) are reproducible no matter
which process samples them.
"""

from __future__ import annotations

import hashlib
import random

import torch

from engine.request import Request
from engine.sampling_params import SamplingParams


def _generator(seed: int | None, position: int) -> torch.Generator:
    if seed is None:
        value = random.getrandbits(63)
    else:
        digest = hashlib.blake2b(f"{seed}:{position}".encode(), digest_size=8).digest()
        value = int.from_bytes(digest, "little") & (2**63 - 1)
    return torch.Generator().manual_seed(value)


def _filter(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p on one row of float32 logits."""
    logits = logits / params.temperature
    if 0 < params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(-1) - probs > params.top_p  # keep the token that crosses top_p
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


class SamplingError(RuntimeError):
    """Sampling one request's token failed (e.g. its logits are not finite)."""


def _sample_row(logits: torch.Tensor, request: Request) -> int:
    params = request.sampling
    probs = torch.softmax(_filter(logits.float().cpu(), params), dim=-1)
    if not bool(torch.isfinite(probs).all()):
        raise SamplingError("the token distribution is not finite (overflow or NaN logits)")
    generator = _generator(params.seed, request.num_tokens)
    return int(torch.multinomial(probs, 1, generator=generator))


def sample(logits: torch.Tensor, requests: list[Request]) -> list[int | SamplingError]:
    """One token per row of logits ([N, vocab], float32); row i belongs to requests[i].

    The token is for position requests[i].num_tokens (the seed mixes it in). A row whose
    sampling fails gives a SamplingError in its place: the other rows are unaffected.
    """
    greedy = logits.argmax(dim=-1).tolist()
    tokens: list[int | SamplingError] = []
    for row, request in enumerate(requests):
        if request.sampling.greedy:
            tokens.append(greedy[row])
            continue
        try:
            tokens.append(_sample_row(logits[row], request))
        except (RuntimeError, ValueError) as exc:
            tokens.append(exc if isinstance(exc, SamplingError) else SamplingError(str(exc)))
    return tokens
