import pytest

from engine import block_pool
from engine.block_pool import BlockPool
from engine.errors import InvalidRequestError
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledChunk, Scheduler, SchedulerConfig

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
    assert s.pool.num_free_blocks == 16


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


def test_admission_takes_the_blocks_of_the_prompt_only_and_keeps_a_watermark():
    """Optimistic admission: a large max_tokens reserves nothing. While another request runs,
    the watermark (1% of the pool, at least one block) stays free."""
    s = make(num_blocks=4, budget=64, max_model_len=16)
    big = req("a", 8, max_tokens=8)  # 2 prompt blocks; may grow to 4
    small = req("b", 4, max_tokens=2)  # 1 block: fits, leaving the 1-block watermark
    late = req("c", 1, max_tokens=2)  # would take the watermark: waits
    for r in (big, small, late):
        s.add(r)
    out, _ = run_step(s)
    assert [r.request_id for r, _ in out.chunks] == ["a", "b"] and list(s.waiting) == [late]
    assert s.pool.num_free_blocks == 1 and s.watermark_blocks == 1
    s.finish(big, RequestStatus.FINISHED_ABORTED)
    s.free_blocks(big)
    out, _ = run_step(s)
    assert [r.request_id for r, _ in out.chunks] == ["b", "c"]


def test_pool_must_hold_one_max_model_len_sequence():
    with pytest.raises(ValueError, match="needs 16 KV blocks; the pool has 15"):
        make(num_blocks=15, max_model_len=64)
    make(num_blocks=16, max_model_len=64)


def test_a_full_pool_preempts_the_newest_request_which_resumes_where_it_was():
    """Two requests without max_tokens share a pool that holds one of them: the newer is
    preempted when the older needs a block, waits at the head, is recomputed (prompt and output
    in one chunk) once the older finishes, and goes on from the token it had reached."""
    s = make(num_blocks=16, budget=64, max_model_len=64)
    a = req("a", 10, max_tokens=54)
    b = Request("b", list(range(100, 110)), SamplingParams(max_tokens=54, temperature=0.0))
    s.add(a)
    s.add(b)
    step = 0
    while not b.num_preemptions:
        out, _ = run_step(s, {"a": step, "b": 100 + step})
        step += 1
    assert out.preempted == [b] and s.num_preemptions == 1
    assert list(s.waiting) == [b] and b.status is RequestStatus.WAITING
    assert b.block_ids == [] and b.num_computed_tokens == 0
    b_output = list(b.output_token_ids)
    assert len(b_output) == step - 1  # kept: the stream goes on from there
    assert [r for r, _ in out.chunks] == [a] and len(a.block_ids) + s.pool.num_free_blocks == 16
    while not a.status.finished:
        out, _ = run_step(s)
        assert b not in [r for r, _ in out.chunks]  # a holds the pool until it ends
    s.free_blocks(a)
    out, _ = run_step(s, {"b": 55})
    # recomputed in one chunk: prompt + output; its sample is the next token, at the same position
    assert [(r, n) for r, n in out.chunks] == [(b, 10 + len(b_output))]
    assert b.output_token_ids == b_output + [55] and b.status is RequestStatus.RUNNING


def test_preemption_takes_the_newest_first_and_never_one_already_scheduled():
    s = make(num_blocks=6, budget=64, max_model_len=24)
    reqs = [req(rid, 4, max_tokens=20) for rid in "abc"]  # one block each at admission
    for r in reqs:
        s.add(r)
    run_step(s)  # all three prefilled: 3 blocks, 3 free (watermark 1)
    for _ in range(4):
        run_step(s)  # positions 4..7: every one needs its second block at position 4
    a, b, c = reqs
    assert [len(r.block_ids) for r in reqs] == [2, 2, 2] and s.pool.num_free_blocks == 0
    out = s.schedule()  # position 8: a third block each; none free
    assert out.preempted == [c] and [r for r, _ in out.chunks] == [a, b]
    assert list(s.waiting) == [c] and s.pool.num_free_blocks == 0


def test_a_request_preempts_itself_when_it_is_the_newest():
    """KV leases (decode tier) are never preempted: the only running request gives its own
    blocks back and waits, without a chunk this step."""
    s = make(num_blocks=5, budget=64, max_model_len=16, remote=True)
    first, second = req("a", 4, max_tokens=12), req("b", 8, max_tokens=10)
    s.add(first)
    s.schedule()
    s.kv_arrived("a", 1)  # running: 5 tokens in 1 block; position 4 needs a second block
    s.add(second)
    out = s.schedule()
    assert out.chunks == [(first, 1)] and out.admitted_for_kv == [second]  # 2 + 2 blocks taken
    s.update_from_output(out, {"a": 2})
    for _ in range(7):  # positions 5..11 (a third block at 8): the pool is empty then
        s.update_from_output(s.schedule(), {"a": 3})
    assert s.pool.num_free_blocks == 0
    out = s.schedule()  # position 12 needs a fourth block; only the lease's are held by others
    assert out.preempted == [first] and out.chunks == [] and list(s.waiting) == [first]
    assert second.status is RequestStatus.WAITING_FOR_KV and s.pool.num_free_blocks == 3
    assert s.schedule().chunks == []  # its 13 tokens need 4 blocks: it waits for the lease
    s.kv_arrived("b", 1)
    out, _ = run_step(s)
    assert [r for r, _ in out.chunks] == [second] and list(s.waiting) == [first]


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


def test_prompt_blocks_are_hashed_and_registered_once_through_decode(monkeypatch):
    """The same 40-token prompt, then 19 decode steps: the hash count stays at the prompt's 10
    blocks and each is registered in the cache once, not again every decode step."""
    calls = []
    original = block_pool.hash_block_tokens
    monkeypatch.setattr(block_pool, "hash_block_tokens",
                        lambda parent, tokens: calls.append(tuple(tokens)) or original(parent, tokens))
    s = make(num_blocks=32, budget=8, max_model_len=64)
    registered = []
    real_cache_block = s.pool.cache_block
    s.pool.cache_block = lambda block_id, block_hash: (registered.append(block_id),
                                                       real_cache_block(block_id, block_hash))
    r = req("a", 40, max_tokens=20)
    s.add(r)
    num_steps = 0
    while not r.status.finished:
        run_step(s)
        num_steps += 1
    assert num_steps == 5 + 19 and r.num_output_tokens == 20  # 5 prompt chunks, 19 decode steps
    assert len(calls) == 10
    assert sorted(registered) == sorted(r.block_ids[:10])  # each prompt block once


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
    # 12 of the 16 blocks (the 4 free are the 3 cached ones and the partial one): the head
    # needs 1 new block plus the 1-block watermark and waits
    blocker = Request("x", list(range(100, 145)), SamplingParams(max_tokens=40, temperature=0.0))
    s.add(blocker)
    run_step(s)
    again = Request("b", list(range(12)) + [50, 51], SamplingParams(max_tokens=40, temperature=0.0))
    s.add(again)
    queries, free_order = s.pool.num_prefix_queries, list(s.pool._free)
    for _ in range(3):
        run_step(s)  # the blocker decodes (within its 12 blocks); the head waits
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


# speculative decoding: drafts scored after the request's tokens, verified tokens appended
def decoding(s, rid="a", prompt_len=6, max_tokens=20):
    """A request of `s` past its prefill: `prompt_len` prompt tokens computed, one output."""
    r = req(rid, prompt_len, max_tokens=max_tokens)
    s.add(r)
    while not r.output_token_ids:  # in chunks if the budget is small
        run_step(s, {rid: 50})
    assert r.num_tokens - r.num_computed_tokens == 1
    return r


def test_drafts_are_scored_after_the_last_token_and_rejected_ones_roll_back():
    s = make(num_blocks=16, budget=64, block_size=4)
    r = decoding(s)  # 7 tokens, 6 computed, 2 blocks
    r.spec_token_ids = [60, 61, 62, 63]
    out = s.schedule()
    assert out.chunks == [(r, 5)] and len(r.block_ids) == 3  # positions 6..10: a third block
    assert r.token_ids(6, 11) == [50, 60, 61, 62, 63]  # what the runner feeds
    # the first draft accepted, the second rejected: 60 then the target's own token 70
    s.update_from_output(out, {"a": [60, 70]})
    assert r.output_token_ids == [50, 60, 70] and r.num_computed_tokens == 8
    assert r.spec_token_ids == [] and r.num_tokens - r.num_computed_tokens == 1
    assert len(r.block_ids) == 3 and s.pool.num_free_blocks == 13  # 9 tokens: 3 blocks
    r.spec_token_ids = [80, 81, 82, 83, 84, 85]
    out = s.schedule()
    assert out.chunks == [(r, 7)] and len(r.block_ids) == 4  # positions 8..14
    s.update_from_output(out, {"a": [90]})  # every draft rejected
    assert r.output_token_ids == [50, 60, 70, 90] and r.num_computed_tokens == 9
    assert len(r.block_ids) == 3 and s.pool.num_free_blocks == 13  # the fourth came back


def test_all_drafts_accepted_give_a_bonus_token():
    s = make(num_blocks=16, budget=64, block_size=4)
    r = decoding(s)
    r.spec_token_ids = [60, 61]
    out = s.schedule()
    s.update_from_output(out, {"a": [60, 61, 62]})
    assert r.output_token_ids == [50, 60, 61, 62] and r.num_computed_tokens == 9


def test_drafts_are_trimmed_to_the_budget_max_tokens_and_context():
    s = make(num_blocks=16, budget=4, block_size=4, max_model_len=64)
    r = decoding(s, max_tokens=20)
    r.spec_token_ids = [60, 61, 62, 63, 64]
    assert s.schedule().chunks == [(r, 4)] and r.spec_token_ids == [60, 61, 62]  # budget 4
    s = make(num_blocks=16, budget=64, block_size=4, max_model_len=64)
    r = decoding(s, max_tokens=3)  # one output so far: a step may add 2 more
    r.spec_token_ids = [60, 61, 62]
    assert s.schedule().chunks == [(r, 2)] and r.spec_token_ids == [60]
    s = make(num_blocks=16, budget=64, block_size=4, max_model_len=10)
    r = decoding(s, prompt_len=7, max_tokens=20)  # 8 tokens of 10
    r.spec_token_ids = [60, 61, 62]
    assert s.schedule().chunks == [(r, 2)] and r.spec_token_ids == [60]


def test_a_stop_among_the_verified_tokens_drops_the_rest():
    s = make(num_blocks=16, budget=64, block_size=4)
    r = decoding(s)
    r.spec_token_ids = [60, EOS, 61]
    out = s.schedule()
    finished = s.update_from_output(out, {"a": [60, EOS, 61, 62]})
    assert finished == [r] and r.status is RequestStatus.FINISHED_STOPPED
    assert r.output_token_ids == [50, 60, EOS]
    with pytest.raises(ValueError, match="verified"):
        r2 = decoding(s, "b")
        r2.spec_token_ids = [1]
        s.update_from_output(s.schedule(), {"b": [1, 2, 3]})


def test_drafts_of_a_request_still_prefilling_or_preempted_are_dropped():
    s = make(num_blocks=16, budget=4, block_size=4)
    r = req("a", 10, max_tokens=5)
    s.add(r)
    run_step(s)  # its first chunk
    r.spec_token_ids = [1, 2]
    out = s.schedule()  # its second chunk: no drafts
    assert out.chunks == [(r, 4)] and r.spec_token_ids == []
    s = make(num_blocks=4, budget=64, block_size=4, max_model_len=16)
    a, b = decoding(s, "a", prompt_len=4), decoding(s, "b", prompt_len=4)
    assert (len(a.block_ids), len(b.block_ids), s.pool.num_free_blocks) == (2, 1, 1)
    a.spec_token_ids = [4, 5, 6]  # positions 5..8: a third block, the last free one
    b.spec_token_ids = [1, 2, 3]  # positions 4..7: a second block; none left, b gives way
    out = s.schedule()
    assert out.preempted == [b] and b.spec_token_ids == [] and out.chunks == [(a, 4)]


def test_the_tokens_dropped_after_a_stop_leave_sampled_too():
    """What the decode tier emits is what was appended: the verified tokens after a stop are
    removed from `sampled` as well."""
    s = make(num_blocks=16, budget=64, block_size=4)
    r = decoding(s)
    r.spec_token_ids = [60, EOS, 61]
    sampled = {"a": [60, EOS, 61, 62]}
    s.update_from_output(s.schedule(), sampled)
    assert sampled == {"a": [60, EOS]} and r.output_token_ids == [50, 60, EOS]


def _forked(s, prompt_len, num_forks):
    """A remote-KV request with forks, admitted and its KV arrived: (parent, forks)."""
    parent = req("p", prompt_len, max_tokens=8)
    forks = [req(f"p/{i}", prompt_len, max_tokens=8) for i in range(1, num_forks + 1)]
    parent.forks = list(forks)
    s.add(parent)
    out, _ = run_step(s)
    assert out.admitted_for_kv == [parent]
    s.kv_arrived("p", 7)
    return parent, forks


@pytest.mark.parametrize("prompt_len, num_shared", [(10, 2), (8, 1), (9, 2)])
def test_forks_share_the_blocks_before_the_last_prompt_token(prompt_len, num_shared):
    s = make(budget=64, remote=True)
    parent, forks = _forked(s, prompt_len, 2)
    assert s.running == [parent, *forks]
    for fork in forks:
        assert fork.block_ids == parent.block_ids[:num_shared]
        assert fork.num_computed_tokens == num_shared * 4
    assert all(s.pool.ref_count(b) == 3 for b in parent.block_ids[:num_shared])
    out, _ = run_step(s)
    # each fork computes the rest of the prompt into a block of its own, then samples
    assert [n for _, n in out.chunks] == [1] + [prompt_len - num_shared * 4] * 2
    for fork in forks:
        assert fork.output_token_ids == [7]
        assert fork.block_ids[-1] not in parent.block_ids
    for r in (parent, *forks):
        s.finish(r, RequestStatus.FINISHED_ABORTED)
        s.free_blocks(r)
    assert s.pool.num_free_blocks == 16


def test_admission_counts_forks_as_seats_and_blocks():
    s = make(num_blocks=16, budget=64, remote=True)
    other = req("o", 4 * 8 - 1)  # 8 blocks; the watermark keeps 1 more free
    s.add(other)
    run_step(s)
    parent = req("p", 10)
    parent.forks = [req(f"p/{i}", 10) for i in range(1, 6)]  # 3 blocks + 5: 8 > 16 - 8 - 1
    s.add(parent)
    out, _ = run_step(s)
    assert out.admitted_for_kv == []
    s.finish(other, RequestStatus.FINISHED_ABORTED)
    s.free_blocks(other)
    out, _ = run_step(s)
    assert out.admitted_for_kv == [parent]
    assert s._num_active() == 6


def test_a_fork_preempted_before_its_first_token_is_recomputed_locally():
    s = make(num_blocks=16, budget=64, remote=True)  # a 64-token sequence fills the pool
    parent, (fork,) = _forked(s, 10, 1)
    s._preempt(s.running.pop())
    s.waiting.appendleft(fork)
    out, _ = run_step(s)
    assert fork.status is RequestStatus.RUNNING and not out.admitted_for_kv
    assert ScheduledChunk(fork, 10) in out.chunks and fork.output_token_ids == [7]
