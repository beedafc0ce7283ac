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
