"""The logits processors and min_p against plain per-row references written here (and
repetition_penalty against transformers' RepetitionPenaltyLogitsProcessor); greedy rows honour
them; a row gets the same token alone or in any mixed batch; seeded draws stay reproducible;
a batch without processors never builds them and the logits are never modified."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from engine import sampler
from engine.logits_processors import LogitsProcessors
from engine.request import Request
from engine.sampler import SamplingError, sample
from engine.sampling_params import SamplingParams

VOCAB = 300
EOS = frozenset({2, 4})


def request(prompt: list[int], output: list[int] = (), **sampling) -> Request:
    sampling.setdefault("max_tokens", 64)
    return Request("r", list(prompt), SamplingParams(**sampling).validate(), list(output))


def random_request(rng: random.Random, **sampling) -> Request:
    prompt = [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 40))]
    output = [rng.randrange(VOCAB // 10) for _ in range(rng.randrange(0, 30))]  # repeats
    return request(prompt, output, **sampling)


# --- references: one row at a time, as the docstrings state them --------------------------

def ref_process(row: torch.Tensor, req: Request, eos=EOS) -> torch.Tensor:
    """logit_bias, the min_tokens mask, repetition, frequency, presence: a loop over tokens."""
    x = row.clone()
    params = req.sampling
    for token, bias in params.logit_bias:
        x[token] += bias
    if req.num_output_tokens < params.min_tokens:
        for token in set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos)):
            x[token] = float("-inf")
    penalty = params.repetition_penalty
    for token in set(req.prompt_token_ids) | set(req.output_token_ids):
        x[token] = x[token] / penalty if x[token] > 0 else x[token] * penalty
    for token, count in Counter(req.output_token_ids).items():
        x[token] -= params.frequency_penalty * count
        x[token] -= params.presence_penalty
    return x


def ref_min_p(row: torch.Tensor, temperature: float, min_p: float) -> torch.Tensor:
    """vLLM's: drop tokens whose probability after temperature < min_p * the largest."""
    scaled = row / temperature
    probs = torch.softmax(scaled, dim=-1)
    return scaled.masked_fill(probs < min_p * probs.max(), float("-inf"))


def processed(logits: torch.Tensor, requests: list[Request], eos=EOS) -> torch.Tensor:
    rows = list(range(len(requests)))
    return LogitsProcessors(rows, requests, logits.shape[1], eos, logits.device).apply(logits)


# --- each processor against its reference --------------------------------------------------

PROCESSORS = [dict(presence_penalty=1.5), dict(frequency_penalty=0.7),
              dict(presence_penalty=-2.0, frequency_penalty=2.0), dict(repetition_penalty=1.8),
              dict(repetition_penalty=0.5), dict(logit_bias=((3, 100.0), (7, -100.0), (9, 0.5))),
              dict(min_tokens=40, stop_token_ids=(11,)),
              dict(min_tokens=40, ignore_eos=True, stop_token_ids=(11,)),
              dict(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25,
                   logit_bias=((5, 3.0),), min_tokens=40)]


@pytest.mark.parametrize("params", PROCESSORS)
def test_each_processor_equals_the_reference(params):
    rng = random.Random(0)
    gen = torch.Generator().manual_seed(0)
    requests = [random_request(rng, **params) for _ in range(16)]
    logits = torch.randn(16, VOCAB, generator=gen) * 4
    got = processed(logits, requests)
    for i, req in enumerate(requests):
        torch.testing.assert_close(got[i], ref_process(logits[i], req), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("penalty", [0.3, 1.2, 2.0, 10.0])
def test_repetition_penalty_equals_transformers(penalty):
    """transformers penalises every token of input_ids: the prompt and the output so far."""
    rng = random.Random(1)
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(8, VOCAB, generator=gen) * 5
    length = 30
    requests = []
    for _ in range(8):
        ids = [rng.randrange(VOCAB) for _ in range(length)]
        cut = rng.randrange(1, length)
        requests.append(request(ids[:cut], ids[cut:], repetition_penalty=penalty))
    ids = torch.tensor([r.prompt_token_ids + r.output_token_ids for r in requests])
    expected = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
    assert torch.equal(processed(logits, requests), expected)


@pytest.mark.parametrize("temperature,min_p", [(1.0, 0.05), (0.7, 0.3), (2.0, 0.9)])
def test_min_p_keeps_what_the_reference_keeps(temperature, min_p):
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(200, VOCAB, generator=gen) * 3
    requests = [request([1], seed=i, temperature=temperature, min_p=min_p) for i in range(200)]
    tokens = sample(logits, requests)
    for row, token in enumerate(tokens):
        assert torch.isfinite(ref_min_p(logits[row], temperature, min_p)[token]), row
    assert len(set(tokens)) > 1  # it still samples


def test_min_p_empirical_distribution():
    """4000 seeded draws of one row: frequencies match softmax over the min_p survivors."""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    n = 4000
    tokens = sample(logits.expand(n, 8).contiguous(),
                    [request([1], seed=i, min_p=0.2, temperature=0.9) for i in range(n)])
    counts = torch.bincount(torch.tensor(tokens), minlength=8).double() / n
    probs = torch.softmax(ref_min_p(logits, 0.9, 0.2), dim=-1).double()
    assert (counts[probs == 0] == 0).all() and (probs > 0).sum() == 3
    assert ((counts - probs).abs() <= 4.5 * (probs * (1 - probs) / n).sqrt() + 1e-12).all()


def test_min_p_one_is_greedy():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(32, VOCAB, generator=gen)
    tokens = sample(logits, [request([1], seed=i, min_p=1.0) for i in range(32)])
    assert tokens == logits.argmax(dim=-1).tolist()


# --- greedy, masks, failures ---------------------------------------------------------------

def test_greedy_rows_take_the_argmax_of_the_processed_logits():
    rng = random.Random(4)
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(len(PROCESSORS), VOCAB, generator=gen) * 4
    requests = [random_request(rng, temperature=0.0, **p) for p in PROCESSORS]
    expected = [int(ref_process(logits[i], r).argmax()) for i, r in enumerate(requests)]
    assert sample(logits, requests, EOS) == expected
    temperatures = [0.0, 0.5, 1.0, 2.0]
    forced = sample(logits[:4], [request([1], temperature=t, seed=9, logit_bias=((77, 100.0),))
                                 for t in temperatures], EOS)
    assert forced == [77] * 4  # +100 wins greedy and sampled rows alike


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    logits = torch.zeros(4, 20)
    logits[:, 2] = logits[:, 11] = 50.0  # EOS 2 and stop id 11 would win
    held = request([1], [5, 6], temperature=0, min_tokens=3, stop_token_ids=(11,))
    free = request([1], [5, 6, 7], temperature=0, min_tokens=3, stop_token_ids=(11,))
    eos_free = request([1], [5], temperature=0, min_tokens=3, ignore_eos=True,
                       stop_token_ids=(11,))
    seeded = request([1], [], seed=3, min_tokens=1, stop_token_ids=(11, 999))  # 999: no such id
    tokens = sample(logits, [held, free, eos_free, seeded], EOS)
    assert tokens[0] not in (2, 11) and tokens[1] == 2 and tokens[2] == 2
    assert tokens[3] not in (2, 11)
    assert sample(logits[:1], [held]) == [2]  # given no EOS ids, only stop ids are masked


def test_a_logit_bias_outside_the_vocabulary_fails_that_row_alone():
    logits = torch.randn(3, VOCAB)
    requests = [request([1], temperature=0), request([1], logit_bias=((VOCAB, 1.0),)),
                request([1], seed=5, presence_penalty=1.0)]
    tokens = sample(logits, requests)
    assert isinstance(tokens[1], SamplingError) and "vocabulary" in str(tokens[1])
    assert tokens[0] == sample(logits[:1], requests[:1])[0]
    assert tokens[2] == sample(logits[2:], requests[2:])[0]
    assert isinstance(sample(logits[1:2], requests[1:2])[0], SamplingError)


def test_processed_rows_that_cannot_be_sampled_fail_alone():
    logits = torch.randn(3, VOCAB)
    logits[1, 10] = float("nan")
    requests = [request([1], [3, 3], seed=s, repetition_penalty=1.5, presence_penalty=1.0)
                for s in range(3)]
    tokens = sample(logits, requests)
    assert isinstance(tokens[1], SamplingError) and isinstance(tokens[0], int)


# --- batch invariance, reproducibility, the fast path --------------------------------------

MIXED = [dict(temperature=0.0), dict(temperature=0.0, repetition_penalty=1.5),
         dict(temperature=1.0), dict(temperature=0.8, top_p=0.9),
         dict(temperature=1.0, top_k=20, min_p=0.1), dict(temperature=0.7, presence_penalty=1.0),
         dict(temperature=1.2, frequency_penalty=0.5, top_p=0.8),
         dict(temperature=1.0, logit_bias=((4, 5.0), (8, -3.0)), min_tokens=50),
         dict(temperature=0.0, logit_bias=((12, 8.0),)), dict(temperature=1.0, min_p=0.3),
         dict(temperature=0.9, repetition_penalty=0.8, top_k=5, top_p=0.95, min_p=0.05)]


def test_each_row_gets_what_it_gets_alone_in_any_mixed_batch():
    rng = random.Random(5)
    gen = torch.Generator().manual_seed(5)
    for trial in range(4):
        requests = [random_request(rng, seed=rng.getrandbits(64), **rng.choice(MIXED))
                    for _ in range(24)]
        logits = torch.randn(24, VOCAB, generator=gen) * 3
        alone = [sample(logits[i:i + 1], [r], EOS)[0] for i, r in enumerate(requests)]
        assert sample(logits, requests, EOS) == alone, trial
        order = list(range(24))
        rng.shuffle(order)
        shuffled = sample(logits[order], [requests[i] for i in order], EOS)
        assert shuffled == [alone[i] for i in order], trial


def test_seeded_processed_draws_are_reproducible_and_vary_with_the_seed():
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(1, VOCAB, generator=gen).expand(64, VOCAB).contiguous()
    params = dict(temperature=1.5, presence_penalty=0.5, repetition_penalty=1.2, min_p=0.01)
    requests = [request([1, 2, 3], [4, 4, 5], seed=i, **params) for i in range(64)]
    first = sample(logits, requests)
    assert sample(logits, requests) == first and len(set(first)) > 10


def test_without_processors_nothing_is_built_and_logits_stay_as_they_were(monkeypatch):
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(len(MIXED), VOCAB, generator=gen)
    before = logits.clone()
    requests = [request([1, 2], [3, 3], seed=i, **p) for i, p in enumerate(MIXED)]
    sample(logits, requests, EOS)
    assert torch.equal(logits, before)

    def forbidden(*args, **kwargs):
        raise AssertionError("built for a batch without processors")

    monkeypatch.setattr(sampler, "LogitsProcessors", forbidden)
    plain = [request([1, 2], [3, 3], seed=i, temperature=p.get("temperature", 1.0),
                     top_p=p.get("top_p", 1.0), top_k=p.get("top_k", 0), min_p=p.get("min_p", 0))
             for i, p in enumerate(MIXED)]
    assert all(isinstance(t, int) for t in sample(logits, plain, EOS))  # min_p needs none
    with pytest.raises(AssertionError, match="without processors"):
        sample(logits, requests, EOS)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_processors_agree_with_cpu():
    rng = random.Random(8)
    gen = torch.Generator().manual_seed(8)
    requests = [random_request(rng, seed=i, **MIXED[i % len(MIXED)]) for i in range(64)]
    logits = torch.randn(64, 32000, generator=gen) * 3
    assert torch.allclose(processed(logits.cuda(), requests).cpu(), processed(logits, requests),
                          rtol=1e-6, atol=1e-6)
    assert sample(logits.cuda(), requests, EOS) == sample(logits, requests, EOS)
