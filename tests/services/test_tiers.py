"""Prefill and decode tiers as real gRPC servers: exactness against transformers, chunking,
prefix caching, errors, and every block back in its pool."""

from __future__ import annotations

import grpc
import pytest

from protos.tandem.v1 import common_pb2, decode_pb2
from tests.reference import hf_greedy, prompt_ids

VOCAB = 2000  # below every tiny model's vocab size


def tokens_of(responses) -> list[int]:
    return [t for r in responses for t in r.token_ids]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_greedy_matches_transformers(tiny_models, start_tiers, arch):
    tiers = start_tiers(tiny_models[arch])
    for seed, (length, max_tokens) in enumerate([(1, 5), (17, 12), (40, 20)]):
        prompt = prompt_ids(seed, length, VOCAB)
        responses = tiers.generate(prompt, max_tokens, temperature=0.0)
        assert tokens_of(responses) == hf_greedy(tiny_models[arch], prompt, max_tokens)
        last = responses[-1]
        assert last.finish_reason in (common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_LENGTH)
        assert last.usage.prompt_tokens == length
        assert last.usage.completion_tokens == len(tokens_of(responses))
        assert last.timings.transfer_bytes > 0


@pytest.mark.parametrize("chunk", [16, 7, 100000])
def test_chunk_size_does_not_change_tokens(tiny_models, start_tiers, chunk):
    model = tiny_models["llama"]
    tiers = start_tiers(model, prefill={"max_num_batched_tokens": chunk})
    prompt = prompt_ids(11, 45, VOCAB)
    assert tokens_of(tiers.generate(prompt, 10, temperature=0.0)) == hf_greedy(model, prompt, 10)


def test_prefix_cache_hit_gives_same_tokens(tiny_models, start_tiers):
    model = tiny_models["qwen2"]
    tiers = start_tiers(model)
    prompt = prompt_ids(3, 50, VOCAB)
    miss = tiers.generate(prompt, 8, temperature=0.0)
    hit = tiers.generate(prompt, 8, temperature=0.0)
    assert miss[-1].usage.cached_prompt_tokens == 0
    assert hit[-1].usage.cached_prompt_tokens == 48
    assert tokens_of(hit) == tokens_of(miss) == hf_greedy(model, prompt, 8)


def test_seeded_sampling_is_reproducible(tiny_models, start_tiers):
    tiers = start_tiers(tiny_models["llama"])
    prompt = prompt_ids(5, 20, VOCAB)
    a = tiers.generate(prompt, 12, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    b = tiers.generate(prompt, 12, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    assert tokens_of(a) == tokens_of(b)


def test_malformed_requests_are_invalid_argument(tiny_models, start_tiers):
    tiers = start_tiers(tiny_models["llama"])
    bad = [
        dict(prompt_token_ids=[], sampling=common_pb2.SamplingParams(max_tokens=4)),
        dict(prompt_token_ids=[1, 2], sampling=common_pb2.SamplingParams(max_tokens=0)),
        dict(prompt_token_ids=[10**6], sampling=common_pb2.SamplingParams(max_tokens=4)),
        dict(prompt_token_ids=[1, 2], sampling=common_pb2.SamplingParams(max_tokens=4, top_p=0.0)),
    ]
    for fields in bad:
        request = decode_pb2.DecodeRequest(request_id="bad", prefill_addresses=[tiers.prefill_address],
                                           **fields)
        with pytest.raises(grpc.RpcError) as info:
            list(tiers.stub().Generate(request, timeout=30))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, fields
    # and the tiers still serve
    assert tokens_of(tiers.generate([5, 6, 7], 3, temperature=0.0))


def test_unreachable_prefill_fails_fast_and_frees_blocks(tiny_models, start_tiers):
    tiers = start_tiers(tiny_models["llama"])
    request = decode_pb2.DecodeRequest(request_id="x", prompt_token_ids=[5, 6, 7],
                                       sampling=common_pb2.SamplingParams(max_tokens=4),
                                       prefill_addresses=["127.0.0.1:1"])
    with pytest.raises(grpc.RpcError) as info:
        list(tiers.stub().Generate(request, timeout=30))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_client_cancel_mid_stream_frees_blocks(tiny_models, start_tiers):
    tiers = start_tiers(tiny_models["llama"])
    request = decode_pb2.DecodeRequest(request_id="c", prompt_token_ids=prompt_ids(1, 30, VOCAB),
                                       sampling=common_pb2.SamplingParams(max_tokens=500, ignore_eos=True,
                                                                          temperature=0.0),
                                       prefill_addresses=[tiers.prefill_address])
    call = tiers.stub().Generate(request, timeout=60)
    next(call)
    call.cancel()
    tiers.wait_idle()


def test_transfer_overlaps_prefill_compute(tiny_models, start_tiers):
    # 30 chunks of 16 tokens: blocks must start arriving while later chunks still compute, so
    # the span from the first KV byte to completion covers most of the prefill compute time
    tiers = start_tiers(tiny_models["llama"], prefill={"max_num_batched_tokens": 16})
    last = tiers.generate(prompt_ids(9, 480, VOCAB), 2, temperature=0.0)[-1]
    assert last.timings.prefill_s > 0
    assert last.timings.transfer_s > 0.5 * last.timings.prefill_s, last.timings


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_serves_and_transfers(tiny_models, start_tiers, dtype):
    tiers = start_tiers(tiny_models["qwen3"], prefill={"dtype": dtype}, decode={"dtype": dtype})
    responses = tiers.generate(prompt_ids(6, 40, VOCAB), 8, temperature=0.0)
    assert len(tokens_of(responses)) >= 1
    assert responses[-1].timings.transfer_bytes == 3 * 16 * 2 * 2 * 2 * 32 * 2  # 3 blocks, 2 B each


def test_tiers_with_different_layouts_fail_clearly(tiny_models, start_tiers):
    tiers = start_tiers(tiny_models["llama"], prefill={"dtype": "float32"},
                        decode={"dtype": "bfloat16"})
    with pytest.raises(grpc.RpcError) as info:
        tiers.generate([5, 6, 7], 4)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "KV layout mismatch" in info.value.details()
