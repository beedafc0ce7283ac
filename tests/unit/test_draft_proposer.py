"""The draft-model proposer (decode_service/draft.py) on the CPU: its proposals are the draft
model's own greedy continuation (as transformers generates it), also after the target rejected
some of them (its KV rolled back) and after a long prompt caught up in several passes; its
blocks go back to its pool however a request ends; a full pool means no drafts, not an error."""

from __future__ import annotations

import pytest

from decode_service.draft import DraftModelProposer, build_draft_proposer
from engine.instance import InstanceConfig
from engine.model import ModelConfig
from engine.request import Request
from engine.sampling_params import SamplingParams
from tests.reference import hf_greedy, prompt_ids

VOCAB = 2000


def proposer_for(model_dir, num_blocks: int = 64, max_tokens: int = 2048) -> DraftModelProposer:
    config = InstanceConfig(model_dir=model_dir, served_model_name="draft", dtype="float32",
                            max_num_batched_tokens=max_tokens, max_num_seqs=8)
    vocab = ModelConfig.from_dir(model_dir).vocab_size
    return build_draft_proposer(config, model_dir, vocab, num_blocks, 512)


@pytest.fixture
def draft(tiny_models):
    return tiny_models["qwen2"]  # any tiny model: they share one tokenizer


def request(i: int, prompt: list[int]) -> Request:
    return Request(f"r{i}", prompt, SamplingParams(max_tokens=64, temperature=0.7, seed=i))


def test_proposals_are_the_drafts_greedy_continuation_across_rollbacks(draft):
    proposer = proposer_for(draft)
    requests = [request(i, prompt_ids(40 + i, 5 + 9 * i, VOCAB)) for i in range(3)]
    for step in range(4):
        ks = [1 + (step + i) % 4 for i in range(3)]
        drafts = proposer.propose(requests, ks)
        for r, k, d in zip(requests, ks, drafts):
            tokens = r.prompt_token_ids + r.output_token_ids
            assert d == hf_greedy(draft, tokens, k), (step, r.request_id)
        # the target keeps some drafts and adds a token of its own: the rest is rolled back
        for i, (r, d) in enumerate(zip(requests, drafts)):
            kept = d[:(step + i) % (len(d) + 1)]
            r.output_token_ids += kept + [(7 * step + 31 * i) % VOCAB]
    assert proposer.pool.num_free_blocks < proposer.pool.num_blocks


def counting_passes(proposer) -> list[int]:
    """Tokens of each pass the draft runs, recorded."""
    passes, real_execute = [], proposer.runner.execute

    def execute(chunks):
        passes.append(sum(n for _, n in chunks))
        return real_execute(chunks)

    proposer.runner.execute = execute
    return passes


def test_a_long_prompt_catches_up_in_several_passes(draft):
    proposer = proposer_for(draft, max_tokens=16)  # a 16-token budget a pass
    passes = counting_passes(proposer)
    long = request(0, prompt_ids(7, 30, VOCAB))  # within its window (2 x 16 tokens): all of it
    assert proposer.propose([long], [3]) == [hf_greedy(draft, long.prompt_token_ids, 3)]
    assert passes == [16, 14, 1, 1]  # two catch-up passes, then one-token passes


def test_a_mirror_far_behind_restarts_on_a_window(draft):
    """A proposal catches up at most ~two passes' worth: 2 x budget / drafting requests."""
    proposer = proposer_for(draft, max_tokens=16)
    passes = counting_passes(proposer)
    a, b = request(0, prompt_ids(7, 45, VOCAB)), request(1, prompt_ids(8, 3, VOCAB))
    # two requests drafting: a window of 16 tokens each; a's last 16 and b's 3
    assert proposer.propose([a, b], [3, 2]) == [hf_greedy(draft, a.prompt_token_ids[-16:], 3),
                                                hf_greedy(draft, b.prompt_token_ids, 2)]
    assert sum(passes[:2]) == 16 + 3
    # b gains 40 tokens without drafting (the governor had drafting off): it restarts on its
    # last 32 tokens (alone: 2 x 16), in two passes, its old blocks back in the pool first
    b.output_token_ids += prompt_ids(9, 40, VOCAB)
    passes.clear()
    tokens = b.prompt_token_ids + b.output_token_ids
    assert proposer.propose([b], [2]) == [hf_greedy(draft, tokens[-32:], 2)]
    assert passes == [16, 16, 1]
    proposer.keep_only(set())
    assert proposer.pool.num_free_blocks == proposer.pool.num_blocks


def test_blocks_return_to_the_pool_on_every_end(draft):
    proposer = proposer_for(draft)
    a, b, c = (request(i, prompt_ids(60 + i, 20, VOCAB)) for i in range(3))
    proposer.propose([a, b, c], [2, 2, 2])
    held = proposer.pool.num_blocks - proposer.pool.num_free_blocks
    assert held == 3 * 2  # 20 + 2 - 1 tokens: two 16-token blocks each
    proposer.forget("r0")  # ended (finish, abort, failure)
    proposer.forget("r0")  # twice is harmless
    proposer.keep_only({"r2"})  # r1 left the running batch (finished elsewhere, or preempted)
    assert proposer.pool.num_blocks - proposer.pool.num_free_blocks == 2
    assert set(proposer.mirrors) == {"r2"}
    proposer.keep_only(set())
    assert proposer.pool.num_free_blocks == proposer.pool.num_blocks


def test_a_full_pool_gives_no_drafts_and_recovers(draft):
    proposer = proposer_for(draft, num_blocks=3)
    big, small = request(0, prompt_ids(1, 40, VOCAB)), request(1, prompt_ids(2, 10, VOCAB))
    assert proposer.propose([big, small], [4, 4]) == [hf_greedy(draft, big.prompt_token_ids, 4), []]
    proposer.forget("r0")
    assert proposer.propose([small], [4]) == [hf_greedy(draft, small.prompt_token_ids, 4)]


def test_a_draft_with_another_vocabulary_is_refused(draft):
    config = InstanceConfig(model_dir=draft, served_model_name="draft", dtype="float32")
    with pytest.raises(ValueError, match="vocabulary"):
        build_draft_proposer(config, draft, ModelConfig.from_dir(draft).vocab_size + 1, 8, 512)
