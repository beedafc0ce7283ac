import pytest

from engine import block_pool
from engine.block_pool import BlockPool
from engine.errors import InvalidRequestError
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig

EOS = 99


def make(num_blocks=16, budget=8, block_size=4, max_model_len=64, remote=False):
    config = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=8, block_size=block_size,
                             max_model_len=max_model_len, kv_from_remote=remote)
    return Scheduler(config, BlockPool(num_blocks), frozenset({EOS}))


def req(rid, n, max_tokens=4, **kw):
    return Request(rid, list(range(n)), SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw))


def run_step(s, tokens=None):
    out = s.schedule()
    sampled = {r.request_id: (tokens or {}).get(r.request_id, 7) for r, n in out.chunks
               if r.num_computed_tokens + n == r.num_tokens}
    return out, s.update_from_output(out, sampled)


def test_chunked_prefill_respects_budget_and_finishes():
    s = make(budget=8)
    r = req("a", 19, max_tokens=1)
    s.add(r)
    sizes = []
    while True:
        out, finished = run_step(s)
        sizes.append([n for _, n in out.chunks])
        if finished:
            break
    assert sizes == [[8], [8], [3]]
    assert r.status is RequestStatus.FINISHED_LENGTH and r.output_token_ids == [7]
    s.free_blocks(r)
    assert s.pool.num_free_blocks == 16 and s.num_reserved_blocks == 0


def test_budget_shared_across_requests_running_first():
    s = make(budget=8)
    a, b = req("a", 6, max_tokens=1), req("b", 6, max_tokens=1)
    s.add(a)
    s.add(b)
    out, _ = run_step(s)
    assert [(r.request_id, n) for r, n in out.chunks] == [("a", 6), ("b", 2)]
    out, _ = run_step(s)
    assert [(r.request_id, n) for r, n in out.chunks] == [("b", 4)]


def test_prefix_hit_skips_computation_but_recomputes_last_token():
    s = make(budget=64)
    first = req("a", 12, max_tokens=1)
    s.add(first)
    run_step(s)
    s.free_blocks(first)
    again = req("b", 12, max_tokens=1)
    s.add(again)
    out, _ = run_step(s)
    # 3 full blocks cached; the last one is recomputed so the step has logits
    assert again.num_cached_tokens == 8 and out.chunks[0].num_tokens == 4
    longer = req("c", 14, max_tokens=1)
    s.add(longer)
    out, _ = run_step(s)
    assert longer.num_cached_tokens == 12 and out.chunks[0].num_tokens == 2


def test_decode_stops_on_eos_stop_token_and_length():
    s = make(budget=64)
    a, b, c = req("a", 3, max_tokens=10), req("b", 3, max_tokens=10, stop_token_ids=(5,)), req("c", 3, max_tokens=2)
    for r in (a, b, c):
        s.add(r)
    run_step(s, {"a": 1, "b": 1, "c": 1})
    _, finished = run_step(s, {"a": EOS, "b": 5, "c": 1})
    assert {r.request_id: r.status for r in finished} == {
        "a": RequestStatus.FINISHED_STOPPED, "b": RequestStatus.FINISHED_STOPPED,
        "c": RequestStatus.FINISHED_LENGTH}


def test_ignore_eos_and_context_length():
    s = make(budget=64, max_model_len=6)
    r = req("a", 4, max_tokens=10, ignore_eos=True)
    s.add(r)
    run_step(s, {"a": EOS})
    _, finished = run_step(s, {"a": EOS})
    assert finished == [r] and r.status is RequestStatus.FINISHED_LENGTH and r.num_tokens == 6


def test_admission_waits_for_reserved_blocks():
    s = make(num_blocks=4, budget=64, max_model_len=16)
    big = req("a", 8, max_tokens=8)  # worst case ceil(15/4) = 4 blocks
    small = req("b", 2, max_tokens=2)
    s.add(big)
    s.add(small)
    out, _ = run_step(s)
    assert [r.request_id for r, _ in out.chunks] == ["a"]  # b waits: a reserved the pool
    assert s.pool.num_free_blocks == 2 and s.num_reserved_blocks == 2
    s.finish(big, RequestStatus.FINISHED_ABORTED)
    s.free_blocks(big)
    out, _ = run_step(s)
    assert [r.request_id for r, _ in out.chunks] == ["b"]


def test_pool_must_hold_one_max_model_len_sequence():
    with pytest.raises(ValueError, match="needs 16 KV blocks; the pool has 15"):
        make(num_blocks=15, max_model_len=64)
    make(num_blocks=16, max_model_len=64)


def test_a_request_without_max_tokens_waits_and_is_never_refused():
    """max_tokens filling the context reserves a whole max_model_len sequence: the second such
    request waits for the first and then runs (it used to be refused when that exceeded the pool)."""
    s = make(num_blocks=16, budget=64, max_model_len=64)
    a, b = req("a", 10, max_tokens=54), req("b", 10, max_tokens=54)
    s.add(a)
    s.add(b)
    out, _ = run_step(s)
    assert [r.request_id for r, _ in out.chunks] == ["a"] and list(s.waiting) == [b]
    assert s.num_available_blocks == 0  # a's prompt + growth: the whole pool
    s.finish(a, RequestStatus.FINISHED_ABORTED)
    s.free_blocks(a)
    out, _ = run_step(s)
    assert [r.request_id for r, _ in out.chunks] == ["b"] and b.status is RequestStatus.RUNNING


def test_available_blocks_exclude_reservations():
    s = make(num_blocks=16, budget=64)
    r = req("a", 5, max_tokens=8)  # 12 tokens at most: 2 prompt blocks taken, 1 reserved
    s.add(r)
    run_step(s)
    assert s.pool.num_free_blocks == 14 and s.num_reserved_blocks == 1
    assert s.num_available_blocks == 13


def test_each_prompt_block_is_hashed_once(monkeypatch):
    """Chunked prefill of a 40-token prompt hashes each of its 10 full blocks once, not the
    whole chain again every step."""
    calls = []
    original = block_pool.hash_block_tokens
    monkeypatch.setattr(block_pool, "hash_block_tokens",
                        lambda parent, tokens: calls.append(tuple(tokens)) or original(parent, tokens))
    s = make(num_blocks=32, budget=8, max_model_len=64)
    r = req("a", 40, max_tokens=1)
    s.add(r)
    while not r.status.finished:
        run_step(s)
    assert len(calls) == 10
    assert all(s.pool._block_hash[b] is not None for b in r.block_ids[:10])


def test_a_waiting_head_is_not_recounted_or_reordered():
    """A request waiting at the head for blocks looks the cache up without counting a query or
    touching the LRU order; it is counted once, when admitted."""
    s = make(num_blocks=16, budget=64, max_model_len=64)
    first = req("a", 12, max_tokens=1)
    s.add(first)
    run_step(s)
    s.free_blocks(first)  # 3 cached blocks, free
    other = req("y", 3, max_tokens=1)  # a partial block, freed after them: behind them in LRU
    s.add(other)
    run_step(s)
    s.free_blocks(other)
    blocker = req("x", 4, max_tokens=45)  # reserves 12 of the 16 blocks
    s.add(blocker)
    run_step(s)
    again = Request("b", list(range(12)) + [50, 51], SamplingParams(max_tokens=40, temperature=0.0))
    s.add(again)
    queries, free_order = s.pool.num_prefix_queries, list(s.pool._free)
    for _ in range(3):
        run_step(s)  # the blocker decodes (taking blocks from the front); the head waits
        assert again in s.waiting
    still_free = [b for b in free_order if b in s.pool._free]
    assert s.pool.num_prefix_queries == queries
    assert [b for b in s.pool._free if b in free_order] == still_free
    s.finish(blocker, RequestStatus.FINISHED_ABORTED)
    s.free_blocks(blocker)
    run_step(s)
    assert again.status is RequestStatus.RUNNING and again.num_cached_tokens == 12
    assert s.pool.num_prefix_queries == queries + 3 and s.pool.num_prefix_hits >= 3


def test_remote_kv_admission_then_arrival():
    s = make(budget=64, remote=True)
    r = req("a", 5, max_tokens=3)
    s.add(r)
    out = s.schedule()
    assert out.admitted_for_kv == [r] and not out.chunks
    assert r.status is RequestStatus.WAITING_FOR_KV and len(r.block_ids) == 2
    assert s.kv_arrived("a", 1) is r
    out, _ = run_step(s)
    assert [(q.request_id, n) for q, n in out.chunks] == [("a", 1)]
    assert r.num_computed_tokens == 6 and r.output_token_ids == [1, 7]
    assert s.kv_arrived("missing", 1) is None


def test_min_tokens_holds_eos_and_stop_tokens_back():
    """As vLLM: the first min_tokens tokens never end a request; token min_tokens + 1 can. An
    EOS or stop token before that stays in the output as an ordinary token."""
    s = make(budget=64)
    eos = req("eos", 3, max_tokens=10, min_tokens=2)
    stop = req("stop", 3, max_tokens=10, min_tokens=2, stop_token_ids=(5,))
    for r in (eos, stop):
        s.add(r)
    for _ in range(2):
        _, finished = run_step(s, {"eos": EOS, "stop": 5})
        assert finished == []
    _, finished = run_step(s, {"eos": EOS, "stop": 5})
    assert finished == [eos, stop]
    assert eos.output_token_ids == [EOS] * 3 and stop.output_token_ids == [5] * 3
    assert {r.status for r in finished} == {RequestStatus.FINISHED_STOPPED}


def test_min_tokens_up_to_max_tokens_ends_by_length():
    s = make(budget=64)
    r = req("a", 3, max_tokens=2, min_tokens=2)
    s.add(r)
    run_step(s, {"a": EOS})
    _, finished = run_step(s, {"a": EOS})
    assert finished == [r] and r.status is RequestStatus.FINISHED_LENGTH


def test_min_tokens_is_validated_and_round_trips():
    sp = SamplingParams(max_tokens=8, min_tokens=3)
    assert SamplingParams.from_pb(sp.to_pb()) == sp.validate()
    assert not SamplingParams(max_tokens=8).to_pb().HasField("min_tokens")
    for bad in (SamplingParams(max_tokens=2, min_tokens=3),
                SamplingParams(max_tokens=2, min_tokens=-1)):
        with pytest.raises(InvalidRequestError, match="min_tokens"):
            bad.validate()
