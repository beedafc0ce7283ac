"""Speculative decoding's verification rule: which of a request's draft tokens it keeps, given
the target model's logits at its last token and at each draft (engine/model_runner.py scores
them; decode_service/speculative.py proposes them).

Verification (lossless, and reproducible with seeds)
---------------------------------------------------
The target scores the request's next token and its k drafts in one forward pass: row j of the
logits is the distribution of the token after the request's tokens plus drafts[:j]. Each row is
sampled by the ordinary sampler (`engine.sampler.sample`) as if the drafts before it had been
accepted: same temperature, top-k/top-p/min-p, penalties (over output + drafts[:j]), logit_bias,
min_tokens mask, and the same counter-based noise keyed on (seed, position). Draft j is accepted
while it equals the token sampled at its position; the first sampled token that differs (or the
one after the last draft, the "bonus") ends the step. So a step yields 1 to k+1 tokens.

For a point-mass draft d with target distribution p this IS the standard rejection-sampling
rule: the sampled token t ~ p equals d with probability p(d) = min(1, p(d)/q(d)) (q(d) = 1), and
on rejection t is distributed as p conditioned on t != d, which is the normalised positive part
of p - q. Greedy is its special case (t is the argmax). Because every token comes from the same
(seed, position) stream the sampler uses without speculation, a seeded request produces exactly
the tokens it produces without speculation, whatever was proposed: speculation changes speed,
never output. (A proposer with a full draft distribution q would need the general rule with
its own uniform draw; none exists here yet.)
"""

from __future__ import annotations

from typing import AbstractSet, Sequence

import torch

from engine.request import Request
from engine.sampler import SamplingError, sample


def verify(logits: torch.Tensor, requests: Sequence[Request], drafts: Sequence[Sequence[int]],
           eos_token_ids: AbstractSet[int] = frozenset()) -> list[list[int] | SamplingError]:
    """The tokens each request takes this step (see the module docstring): the accepted drafts
    then one sampled token, 1 to len(draft) + 1 of them. logits: [sum(len(d) + 1), vocab], the
    rows of request i contiguous, row j scoring the token after its tokens plus drafts[i][:j].
    A request whose rows cannot be sampled gets the SamplingError instead."""
    rows: list[Request] = []
    for request, draft in zip(requests, drafts, strict=True):
        for j in range(len(draft) + 1):
            rows.append(_with_drafts(request, draft[:j]) if j else request)
    if logits.shape[0] != len(rows):
        raise ValueError(f"{logits.shape[0]} rows of logits for {len(rows)} scored positions")
    sampled = sample(logits, rows, eos_token_ids)
    results: list[list[int] | SamplingError] = []
    row = 0
    for draft in drafts:
        mine = sampled[row:row + len(draft) + 1]
        row += len(draft) + 1
        results.append(_accept(draft, mine))
    return results


def _accept(draft: Sequence[int],
            sampled: Sequence[int | SamplingError]) -> list[int] | SamplingError:
    taken: list[int] = []
    for j, token in enumerate(sampled):
        if isinstance(token, SamplingError):
            return token
        taken.append(token)
        if j == len(draft) or token != draft[j]:
            break
    return taken


def _with_drafts(request: Request, draft: Sequence[int]) -> Request:
    """A stand-in for `request` with `draft` appended to its output (the sampler reads the
    position, the output so far and the sampling parameters)."""
    return Request(request.request_id, request.prompt_token_ids, request.sampling,
                   output_token_ids=request.output_token_ids + list(draft))
