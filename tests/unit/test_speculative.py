"""Speculative decoding's model-free parts (decode_service/speculative.py): n-gram prompt lookup,
and verification that is lossless (the sampled distribution is the target's: a chi-square test
on a tiny vocabulary) and reproducible (greedy and seeded requests give exactly the tokens of
decoding without speculation, whatever the drafts)."""

from __future__ import annotations

from pathlib import Path

import hashlib
import random

import numpy as np
import pytest
import torch

from decode_service.speculative import (MAX_PROBE_INTERVAL, PROBE_EVERY, NgramProposer,
                                        SpeculationGovernor,
                                        SpeculativeConfig, draft_length, propose_ngram)
from engine.speculative import verify
from engine.request import Request
from engine.sampler import sample
from engine.sampling_params import SamplingParams

# chi-square critical values at p = 0.001, by degrees of freedom (as tests/unit/test_sampler.py)
CHI2_CRIT = {4: 18.47, 8: 26.12}


# proposer
@pytest.mark.parametrize("tokens,k,expected", [
    ([1, 2, 3, 9, 1, 2, 3], 3, [9, 1, 2]),        # the 3-gram [1, 2, 3] recurs
    ([5, 1, 2, 7, 8, 1, 2], 2, [7, 8]),           # [1, 2] recurs (no 3-gram does)
    ([4, 1, 6, 1, 5, 1], 4, [5, 1]),              # most recent occurrence of [1]; cut at the end
    ([1, 2, 3, 4], 3, []),                        # nothing recurs
    ([7], 2, []),
])
def test_ngram_proposes_what_followed_the_longest_recurring_suffix(tokens, k, expected):
    assert propose_ngram(np.asarray(tokens), k, min_n=1, max_n=3) == expected


def test_ngram_proposer_reads_prompt_and_output_and_respects_min_n():
    request = Request("r", [3, 4, 5, 6], SamplingParams(max_tokens=8),
                      output_token_ids=[9, 3, 4])
    assert NgramProposer(1, 3).propose_one(request, 2) == [5, 6]
    assert NgramProposer(3, 3).propose_one(request, 2) == []  # [9, 3, 4] never occurred before
    assert NgramProposer(1, 3).propose([request, request], [0, 2]) == [[], [5, 6]]
    with pytest.raises(ValueError):
        NgramProposer(0, 2)


# a deterministic toy target: logits are a function of the context
VOCAB = 12


def toy_logits(context: list[int]) -> torch.Tensor:
    digest = hashlib.sha256(np.asarray(context, np.int64).tobytes()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    return torch.randn(VOCAB, generator=generator) * 2.0


def decode_plain(request: Request, num_tokens: int) -> list[int]:
    while request.num_output_tokens < num_tokens:
        logits = toy_logits(request.prompt_token_ids + request.output_token_ids)[None]
        request.output_token_ids.append(sample(logits, [request])[0])
    return request.output_token_ids


def decode_speculative(request: Request, num_tokens: int, propose) -> tuple[list[int], int]:
    """(output, steps): each step verifies the proposer's drafts on the toy target."""
    steps = 0
    while request.num_output_tokens < num_tokens:
        draft = propose(request)
        context = request.prompt_token_ids + request.output_token_ids
        logits = torch.stack([toy_logits(context + draft[:j]) for j in range(len(draft) + 1)])
        [taken] = verify(logits, [request], [draft])
        request.output_token_ids.extend(taken[:num_tokens - request.num_output_tokens])
        steps += 1
    return request.output_token_ids, steps


SAMPLINGS = [
    {"temperature": 0.0},
    {"temperature": 0.9, "seed": 7},
    {"temperature": 1.3, "seed": 11, "top_k": 5, "top_p": 0.9},
    {"temperature": 0.8, "seed": 3, "min_p": 0.05, "presence_penalty": 0.5,
     "repetition_penalty": 1.3},
]


@pytest.mark.parametrize("sampling", SAMPLINGS)
@pytest.mark.parametrize("proposer", ["oracle", "ngram", "random"])
def test_speculation_never_changes_greedy_or_seeded_output(sampling, proposer):
    prompt = [1, 2, 3, 1, 2, 3, 4]
    expected = decode_plain(Request("a", prompt, SamplingParams(max_tokens=40, **sampling)), 40)
    rng = random.Random(5)
    ngram = NgramProposer(1, 3)

    def propose(request: Request) -> list[int]:
        k = rng.randint(1, 6)
        if proposer == "oracle":  # the true continuation: every draft is accepted
            return expected[request.num_output_tokens:request.num_output_tokens + k]
        if proposer == "ngram":
            return ngram.propose_one(request, k)
        return [rng.randrange(VOCAB) for _ in range(k)]

    request = Request("b", prompt, SamplingParams(max_tokens=40, **sampling))
    output, steps = decode_speculative(request, 40, propose)
    assert output == expected
    if proposer == "oracle":
        assert steps < 40 / 2  # several tokens a step (k is 1 to 6, all accepted)


def test_a_batch_of_requests_with_different_k_each_get_their_own_tokens():
    requests = [Request(f"r{i}", [i + 1, i + 2], SamplingParams(max_tokens=8, temperature=1.0,
                                                                  seed=i)) for i in range(4)]
    drafts = [[], [3], [4, 5], [6, 7, 8]]
    rows = [toy_logits(r.prompt_token_ids + d[:j]) for r, d in zip(requests, drafts)
            for j in range(len(d) + 1)]
    together = verify(torch.stack(rows), requests, drafts)
    for request, draft, taken in zip(requests, drafts, together):
        context = request.prompt_token_ids
        alone = verify(torch.stack([toy_logits(context + draft[:j]) for j in range(len(draft) + 1)]),
                       [request], [draft])[0]
        assert taken == alone and 1 <= len(taken) <= len(draft) + 1
    with pytest.raises(ValueError, match="rows of logits"):
        verify(torch.stack(rows[:-1]), requests, drafts)


def test_the_sampled_distribution_is_the_targets():
    """Two drafts on a 5-token vocabulary, 20,000 seeded requests: the first token is
    distributed as p1, and after an accepted first draft the second as p2, jointly: chi-square
    over the 9 outcomes below the p = 0.001 critical value (df 8), for a draft the target likes
    and one it does not."""
    p1_logits = torch.tensor([1.0, 0.2, -0.5, 0.7, 0.0])
    p2_logits = torch.tensor([-1.0, 0.5, 0.3, 0.0, 1.2])
    p1, p2 = torch.softmax(p1_logits, 0), torch.softmax(p2_logits, 0)
    num = 20_000
    for d1, d2 in [(0, 4), (2, 1)]:
        requests = [Request(f"r{s}", [9], SamplingParams(max_tokens=4, temperature=1.0, seed=s))
                    for s in range(num)]
        logits = torch.stack([p1_logits, p2_logits, torch.zeros(5)] * num)
        results = verify(logits, requests, [[d1, d2]] * num)
        counts: dict[tuple[int, ...], int] = {}
        for taken in results:
            key = (taken[0],) if taken[0] != d1 else (d1, taken[1])
            counts[key] = counts.get(key, 0) + 1
        expected = {(t,): float(p1[t]) for t in range(5) if t != d1}
        expected.update({(d1, t): float(p1[d1] * p2[t]) for t in range(5)})
        chi2 = sum((counts.get(key, 0) - num * prob) ** 2 / (num * prob)
                   for key, prob in expected.items())
        assert chi2 < CHI2_CRIT[8], (d1, d2, chi2, counts)
        accepted = sum(1 for taken in results if taken[0] == d1) / num
        assert abs(accepted - float(p1[d1])) < 4 * (float(p1[d1]) / num) ** 0.5  # rate p1(d1)


# how many drafts
@pytest.mark.parametrize("drafted,accepted,batch,since,expected", [
    (0, 0, 1, 0, 4),        # a new request, alone: alpha 1/2, worth it while 0.5^j > 0.05
    (0, 0, 32, 0, 2),       # at batch 32 (cost 1/8): two drafts
    (40, 38, 128, 0, 6),    # a high acceptance pays even at half the saturation (capped at 6)
    (40, 20, 128, 0, 0),    # alpha ~ 1/2 at half the saturation: not worth one draft
    (0, 0, 256, 0, 0),      # at saturation nobody drafts
    (0, 0, 1000, 99, 0),    # ... not even a probe
    (40, 0, 1, 3, 0),       # a request whose drafts never land stops drafting
    (40, 0, 1, PROBE_EVERY, 1),  # ... and probes with one now and then
])
def test_draft_length_follows_acceptance_and_load(drafted, accepted, batch, since, expected):
    assert draft_length(6, drafted, accepted, batch, 256, since) == expected


def test_speculative_config_checks_its_fields():
    assert isinstance(SpeculativeConfig("ngram", 3).ngram_proposer(), NgramProposer)
    assert SpeculativeConfig("draft", 3, draft_model=Path("d")).draft_model == Path("d")
    for bad in ({"method": "draft"}, {"method": "eagle"}, {"draft_model": Path("d")},
                {"num_tokens": 0}, {"saturation_tokens": 0}):
        with pytest.raises(ValueError):
            SpeculativeConfig(**{"method": "ngram", "num_tokens": 3, **bad})


def run_governor(spec_rate: float, plain_rate: float, steps: int = 320, batch: int = 4):
    """The modes a governor picks over `steps` steps when drafting yields spec_rate tokens/s
    and plain decoding plain_rate."""
    governor, modes = SpeculationGovernor(), []
    for _ in range(steps):
        speculated = governor.allow(batch)
        modes.append(speculated)
        governor.observe(batch, speculated, 10, 10 / (spec_rate if speculated else plain_rate))
    return governor, modes


def test_the_governor_keeps_speculation_off_where_it_is_slower():
    governor, modes = run_governor(spec_rate=300.0, plain_rate=1000.0, steps=2000)
    assert modes[:PROBE_EVERY] == [True] * PROBE_EVERY  # drafting is tried first
    probes = [i for i, m in enumerate(modes) if m and i >= PROBE_EVERY]
    gaps = [b - a for a, b in zip(probes, probes[1:])]
    assert gaps == sorted(gaps) and gaps[-1] == MAX_PROBE_INTERVAL  # backing off, then capped
    assert sum(modes[1000:]) <= 1000 // MAX_PROBE_INTERVAL + 1
    assert governor.rates(4) == {True: pytest.approx(300.0), False: pytest.approx(1000.0)}


def test_the_governor_keeps_speculation_on_where_it_pays():
    _, modes = run_governor(spec_rate=1500.0, plain_rate=1000.0, steps=2000)
    assert len(modes[1000:]) - sum(modes[1000:]) <= 1000 // MAX_PROBE_INTERVAL + 1


def test_the_governor_follows_a_change_of_the_winner():
    governor, modes = SpeculationGovernor(), []
    for step in range(3000):
        spec_rate = 300.0 if step < 1500 else 3000.0  # the text became repetitive, say
        speculated = governor.allow(4)
        modes.append(speculated)
        governor.observe(4, speculated, 10, 10 / (spec_rate if speculated else 1000.0))
    assert sum(modes[1000:1500]) <= 2 and sum(modes[2600:]) >= 390


def test_the_governor_judges_each_batch_size_group_apart():
    governor = SpeculationGovernor()
    for _ in range(2 * PROBE_EVERY + 1):  # the next decision is not a probe
        for batch, (spec, plain) in ((1, (2000.0, 1000.0)), (64, (500.0, 1000.0))):
            speculated = governor.allow(batch)
            governor.observe(batch, speculated, 10, 10 / (spec if speculated else plain))
    assert governor.allow(1) and not governor.allow(64)
    assert governor.group(33) == governor.group(63) != governor.group(64) != governor.group(1)


def test_the_governor_logs_when_a_groups_winner_changes(caplog):
    with caplog.at_level("INFO", logger="decode"):
        run_governor(spec_rate=300.0, plain_rate=1000.0, steps=200, batch=8)
    lines = [r.getMessage() for r in caplog.records if "speculation" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("speculation off (probes only) for batches "
                                                   "of 8-15: 300 tok/s with drafts, 1000 without")
