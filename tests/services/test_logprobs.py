"""Logprobs across the real tiers: each token's are the log_softmax of the very logits its tier
sampled from, the first token's travelling from prefill with the KV transfer
(TransferComplete.first_token_logprobs); a request preempted and recomputed on the decode tier
gets the same tokens and logprobs as on a roomy pool; a prefill instance that sends none for a
request that asked (an older version) fails that request with INTERNAL, never silently."""

from __future__ import annotations

import grpc
import pytest
import torch

from kvtransfer.sender import OutgoingTransfer
from protos.tandem.v1 import common_pb2, decode_pb2
from tests.reference import hf_logits, prompt_ids
from tests.engine_loop import recorded_logits
from tests.services.test_failures import Call

NUM_NEW_TOKENS = 40


def _request(i: int, prompt: list[int], prefill_address: str) -> decode_pb2.DecodeRequest:
    sampling = common_pb2.SamplingParams(max_tokens=NUM_NEW_TOKENS, ignore_eos=True,
                                         temperature=0.0 if i % 2 == 0 else 1.0, logprobs=2)
    if i % 2:
        sampling.seed = 500 + i
    return decode_pb2.DecodeRequest(request_id=f"r{i}", prompt_token_ids=prompt,
                                    prefill_addresses=[prefill_address], sampling=sampling)


def _run_all(tiers, prompts) -> list[tuple[list[int], list[common_pb2.TokenLogprobs]]]:
    calls = [Call(tiers, _request(i, p, tiers.prefill_address)) for i, p in enumerate(prompts)]
    for call in calls:
        call.start()
    results = []
    for call in calls:
        call.result()
        assert call.error is None, call.error
        results.append(([t for r in call.responses for t in r.token_ids],
                         [e for r in call.responses for e in r.logprobs]))
    return results


def test_each_tiers_logprobs_are_the_log_softmax_of_the_logits_it_sampled_from(
        tiny_models, start_tiers):
    # eager decode: recorded_logits observes compute_logits calls, which a CUDA graph replays
    tiers = start_tiers(tiny_models["llama"], decode={"enforce_eager": True})
    with recorded_logits(tiers.prefill.engine.parts.runner.model) as first, \
            recorded_logits(tiers.decode.engine.parts.runner.model) as rest:
        responses = tiers.generate([3, 4, 5, 6], 6, temperature=0.0, ignore_eos=True, logprobs=4)
    entries = [e for r in responses for e in r.logprobs]
    assert len(first) == 1 and len(rest) == 5 and len(entries) == 6
    expected = torch.log_softmax(torch.stack(first + rest), dim=-1)
    for row, entry in zip(expected, entries):
        values, ids = row.sort(descending=True)
        assert entry.token_id == ids[0].item()  # greedy
        assert entry.logprob == pytest.approx(values[0].item(), abs=1e-6)
        assert list(entry.top_token_ids) == ids[:4].tolist()
        assert list(entry.top_logprobs) == pytest.approx(values[:4].tolist(), abs=1e-6)


def test_preempted_requests_get_the_same_tokens_and_logprobs(tiny_models, start_tiers):
    roomy = start_tiers(tiny_models["llama"])
    tiers = start_tiers(tiny_models["llama"], decode={"num_kv_blocks": 14, "max_model_len": 128})
    prompts = [prompt_ids(40 + i, 20, 2000) for i in range(6)]
    expected = _run_all(roomy, prompts)
    pressured = _run_all(tiers, prompts)
    assert tiers.decode.engine.parts.scheduler.num_preemptions > 0, "no preemption: proves nothing"
    for (ids, entries), (want_ids, want_entries) in zip(pressured, expected):
        assert ids == want_ids and len(entries) == len(ids) == NUM_NEW_TOKENS
        for entry, want in zip(entries, want_entries):
            assert entry.token_id == want.token_id
            assert entry.logprob == pytest.approx(want.logprob, abs=1e-4)
            assert entry.top_token_ids == want.top_token_ids
            assert list(entry.top_logprobs) == pytest.approx(list(want.top_logprobs), abs=1e-4)


def as_older_prefill(monkeypatch, field: str) -> None:
    """Prefill instances send the first token without `field` (a FirstToken field), as a
    version before it did."""
    real = OutgoingTransfer.on_progress

    def older_version(self, ready, first=None, error=None, ready_event=None):
        real(self, ready, None if first is None else first._replace(**{field: None}), error,
             ready_event)

    monkeypatch.setattr(OutgoingTransfer, "on_progress", older_version)


def test_a_prefill_that_sends_no_first_token_logprobs_fails_the_request(
        tiny_models, start_tiers, monkeypatch):
    tiers = start_tiers(tiny_models["llama"])
    as_older_prefill(monkeypatch, "logprobs")
    call = Call(tiers, _request(0, [5, 6, 7], tiers.prefill_address))
    call.start()
    call.result()
    assert call.error is not None and call.error.code() == grpc.StatusCode.INTERNAL
    assert "no logprobs for the first token" in call.error.details()
    plain = decode_pb2.DecodeRequest(request_id="plain", prompt_token_ids=[5, 6, 7],
                                     prefill_addresses=[tiers.prefill_address],
                                     sampling=common_pb2.SamplingParams(max_tokens=3))
    assert len(list(tiers.stub().Generate(plain, timeout=30))) >= 1  # others are unaffected


def _prompt_logprobs(tiers, prompt: list[int]) -> list[common_pb2.TokenLogprobs]:
    responses = tiers.generate(prompt, 2, temperature=0.0, prompt_logprobs=3)
    assert not any(r.prompt_logprobs for r in responses[1:])
    return list(responses[0].prompt_logprobs)


def test_chunked_prefill_gives_every_chunks_prompt_logprobs(tiny_models, start_tiers):
    """A prompt computed 7 tokens a step (chunks crossing block boundaries) gives the same
    prompt logprobs as in one chunk, and transformers' log_softmax."""
    model_dir = tiny_models["llama"]
    prompt = prompt_ids(21, 45, 2000)
    chunked = _prompt_logprobs(start_tiers(model_dir, prefill={"max_num_batched_tokens": 7}),
                               prompt)
    whole = _prompt_logprobs(start_tiers(model_dir), prompt)
    expected = torch.log_softmax(hf_logits(model_dir, prompt)[:-1], dim=-1)
    assert [e.token_id for e in chunked] == [e.token_id for e in whole] == prompt[1:]
    for i, (a, b) in enumerate(zip(chunked, whole)):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
        assert a.logprob == pytest.approx(expected[i, prompt[i + 1]].item(), abs=1e-4)
        assert list(a.top_token_ids) == list(b.top_token_ids)
        assert list(a.top_logprobs) == pytest.approx(list(b.top_logprobs), abs=1e-5)


def test_a_prefill_that_sends_no_prompt_logprobs_fails_the_request(
        tiny_models, start_tiers, monkeypatch):
    tiers = start_tiers(tiny_models["llama"])
    as_older_prefill(monkeypatch, "prompt_logprobs")
    with pytest.raises(grpc.RpcError) as info:
        tiers.generate([5, 6, 7], 2, prompt_logprobs=1)
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "sent 0 prompt logprobs for a 3-token prompt" in info.value.details()
