"""The GPU path through real tiers (run with --device cuda; skipped on the CPU): the Triton
backend with CUDA graphs, eager Triton and the torch reference give the same greedy tokens as
transformers (fp32), and a batch of seeded requests samples the same tokens as each alone."""

from __future__ import annotations

import threading

import pytest

from tests.reference import hf_greedy, prompt_ids

VOCAB = 2000


@pytest.fixture(autouse=True)
def _cuda_only(device):
    if not device.startswith("cuda"):
        pytest.skip("GPU path: run with --device cuda")


def tokens_of(responses) -> list[int]:
    return [t for r in responses for t in r.token_ids]


@pytest.mark.parametrize("variant", [
    {"attention_backend": "triton"},                         # CUDA graphs for decode
    {"attention_backend": "triton", "enforce_eager": True},
    {"attention_backend": "torch"},
])
def test_greedy_matches_transformers_on_each_path(tiny_models, start_tiers, variant):
    model = tiny_models["llama"]
    tiers = start_tiers(model, prefill=variant, decode=variant)
    assert bool(tiers.decode.engine.parts.runner.graphs) == (
        variant["attention_backend"] == "triton" and not variant.get("enforce_eager"))
    for seed, (length, max_tokens) in enumerate([(3, 12), (40, 20), (70, 9)]):
        prompt = prompt_ids(seed, length, VOCAB)
        assert tokens_of(tiers.generate(prompt, max_tokens, temperature=0.0)) == \
            hf_greedy(model, prompt, max_tokens)


def test_seeded_tokens_do_not_depend_on_the_batch(tiny_models, start_tiers):
    tiers = start_tiers(tiny_models["qwen3"])
    prompts = [prompt_ids(100 + i, 10 + 3 * i, VOCAB) for i in range(24)]
    alone = tokens_of(tiers.generate(prompts[0], 10, temperature=0.8, seed=5))
    results: list = [None] * len(prompts)

    def run(i: int) -> None:
        results[i] = tiers.generate(prompts[i], 10, temperature=0.8, seed=5 + i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert tokens_of(results[0]) == alone


@pytest.mark.parametrize("proposer", ["ngram", "draft-self"])
def test_verification_steps_replay_graphs_and_match_transformers(tiny_models, start_tiers,
                                                                 proposer):
    """Speculating k = 3: the target's verification steps and the draft's catch-up passes
    replay the (batch, k + 1) graphs, and greedy output equals transformers (and the eager
    path's) for 8 concurrent sequences."""
    from tests.services.test_speculative_decoding import (generate, repetitive_prompt,
                                                          speculative, tokens)

    model = tiny_models["llama"]
    tiers = start_tiers(model, speculative=speculative(tiny_models, proposer, 3))
    eager = start_tiers(model, decode={"enforce_eager": True},
                        speculative=speculative(tiny_models, proposer, 3))
    runners = [tiers.decode.engine.parts.runner]
    if proposer == "draft-self":
        runners.append(tiers.decode.engine.proposer.runner)
    replayed: list[tuple[int, int]] = []
    for runner in runners:
        assert {q for _, q in runner.graphs} == {1, 4}
        replay = runner._replay

        def counting(chunks, key, replay=replay):
            replayed.append(key)
            return replay(chunks, key)

        runner._replay = counting
    prompts = [repetitive_prompt(i) for i in range(8)]
    with_graphs = generate(tiers, prompts, 24, temperature=0.0)
    without = generate(eager, prompts, 24, temperature=0.0)
    for prompt, a, b in zip(prompts, with_graphs, without):
        assert tokens(a) == tokens(b) == hf_greedy(model, prompt, 24)
    assert sum(r[-1].timings.num_accepted_draft_tokens for r in with_graphs) > 0
    assert any(q == 4 for _, q in replayed), replayed
    assert not eager.decode.engine.parts.runner.graphs
