"""The model runner's persistent step buffers: what a step writes into them, padding for CUDA
graph batch sizes, and the captured sizes. (Graph capture and replay run on the GPU only:
tests/services with --device cuda.)"""

from __future__ import annotations

import numpy as np
import torch

from engine.model_runner import RunnerConfig, StepBuffers, graph_batch_sizes, graph_key
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledChunk

BLOCK = 4


def request(prompt_len: int, computed: int, block_ids: list[int], outputs=()) -> Request:
    r = Request(f"r{prompt_len}", list(range(100, 100 + prompt_len)), SamplingParams(max_tokens=8))
    r.output_token_ids = list(outputs)
    r.num_computed_tokens = computed
    r.block_ids = block_ids
    return r


def test_graph_batch_sizes():
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(6) == [1, 2, 4, 6]
    assert graph_batch_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert graph_batch_sizes(100) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 100]


def test_graph_key_picks_the_smallest_query_length_then_batch_that_holds_the_step():
    captured = [(b, q) for q in (1, 5) for b in (1, 2, 4, 8)]
    assert graph_key(captured, num_seqs=3, longest=1) == (4, 1)       # decode
    assert graph_key(captured, num_seqs=1, longest=1) == (1, 1)
    assert graph_key(captured, num_seqs=3, longest=5) == (4, 5)       # verification, k = 4
    assert graph_key(captured, num_seqs=8, longest=2) == (8, 5)       # fewer drafts: padded
    assert graph_key(captured, num_seqs=9, longest=1) is None         # more sequences
    assert graph_key(captured, num_seqs=2, longest=6) is None         # a longer chunk
    assert graph_key([], num_seqs=1, longest=1) is None               # eager (no graphs)


def test_fill_pads_a_verification_step_to_its_graph():
    # two sequences verifying 2 and 0 drafts (3 and 1 tokens) in a (4 sequences, 5 tokens) graph
    buffers = StepBuffers(RunnerConfig(block_size=BLOCK, max_num_seqs=4, max_num_tokens=20,
                                       max_model_len=32), torch.device("cpu"))
    a = request(6, 5, [3, 4], outputs=[60])       # tokens 0..6 (6 prompt + 1 output) + 2 drafts
    a.spec_token_ids = [61, 62]
    b = request(3, 3, [8], outputs=[70])
    buffers.fill([ScheduledChunk(a, 3), ScheduledChunk(b, 1)], BLOCK, num_seqs=4, num_tokens=20)
    seq_lens, starts = buffers.np["seqs"]
    assert seq_lens[:4].tolist() == [8, 4, 0, 0] and starts[:5].tolist() == [0, 3, 4, 4, 4]
    ids, pos, slots = buffers.np["tokens"][:, :20]
    assert ids[:4].tolist() == [105, 60, 61, 70] and pos[:4].tolist() == [5, 6, 7, 3]
    assert slots[:4].tolist() == [17, 18, 19, 35] and (slots[4:] == -1).all()
    assert (ids[4:] == 0).all()


def test_fill_writes_a_mixed_step_and_pads_it():
    buffers = StepBuffers(RunnerConfig(block_size=BLOCK, max_num_seqs=4, max_num_tokens=16,
                                       max_model_len=32), torch.device("cpu"))
    # a prompt chunk after a 4-token prefix hit (positions 4..8), and a decode token at 6
    prefill = request(9, 4, [7, 3, 5])
    decode = request(6, 6, [2, 9], outputs=[55])
    chunks = [ScheduledChunk(prefill, 5), ScheduledChunk(decode, 1)]
    widest = buffers.fill(chunks, BLOCK, num_seqs=3, num_tokens=8)
    assert widest == 3
    ids, pos, slots = buffers.np["tokens"][:, :8]
    assert ids.tolist() == [104, 105, 106, 107, 108, 55, 0, 0]
    assert pos.tolist() == [4, 5, 6, 7, 8, 6, 0, 0]
    # slot = block_ids[pos // 4] * 4 + pos % 4; padding tokens write nowhere (-1)
    assert slots.tolist() == [12, 13, 14, 15, 20, 38, -1, -1]
    seq_lens, starts = buffers.np["seqs"]
    assert seq_lens[:3].tolist() == [9, 7, 0] and starts[:4].tolist() == [0, 5, 6, 6]
    assert buffers.np["table"][0, :3].tolist() == [7, 3, 5]
    assert buffers.np["table"][1, :2].tolist() == [2, 9]
    buffers.upload(3, 8, widest)
    assert np.array_equal(buffers.dev["tokens"][:, :8].numpy(), buffers.np["tokens"][:, :8])
    meta = buffers.metadata(chunks, 3, 8, max_query_len=5, max_seq_len=9)
    assert meta.seq_lens == [9, 7, 0] and meta.query_start_loc == [0, 5, 6, 6]
    assert meta.seq_lens_t.tolist() == [9, 7, 0] and meta.block_tables.shape == (3, 8)


def test_a_smaller_step_overwrites_the_last_ones_padding():
    buffers = StepBuffers(RunnerConfig(block_size=BLOCK, max_num_seqs=4, max_num_tokens=16,
                                       max_model_len=32), torch.device("cpu"))
    big = [ScheduledChunk(request(n, n, [1, 2]), 1) for n in (4, 5, 6)]
    for r, _ in big:
        r.output_token_ids = [9]
    buffers.fill(big, BLOCK, 3, 3)
    small = big[:1]
    buffers.fill(small, BLOCK, 4, 4)
    seq_lens, starts = buffers.np["seqs"]
    assert seq_lens[:4].tolist() == [5, 0, 0, 0] and starts[:5].tolist() == [0, 1, 1, 1, 1]
    assert buffers.np["tokens"][2, :4].tolist() == [8, -1, -1, -1]


def _table(buffers: StepBuffers, rows: int, widest: int) -> list[list[int]]:
    return buffers.np["table"][:rows, :widest].tolist()


def test_block_table_rows_follow_their_chunks_across_steps():
    """Rows are rewritten only when their chunk's blocks changed: a request that gains a block,
    a row that goes to another request, a shorter step after a longer one, and a preempted
    request whose blocks were replaced by as many others must each read the current blocks."""
    buffers = StepBuffers(RunnerConfig(block_size=BLOCK, max_num_seqs=4, max_num_tokens=16,
                                       max_model_len=32), torch.device("cpu"))
    a, b, c = request(4, 4, [1, 2]), request(5, 5, [3, 4]), request(6, 6, [5, 6])
    for r in (a, b, c):
        r.output_token_ids = [9]
    assert buffers.fill([ScheduledChunk(r, 1) for r in (a, b, c)], BLOCK, 3, 3) == 2
    assert _table(buffers, 3, 2) == [[1, 2], [3, 4], [5, 6]]
    a.num_computed_tokens, a.output_token_ids = 8, [9] * 5  # position 8: its third block
    a.block_ids.append(7)
    widest = buffers.fill([ScheduledChunk(r, 1) for r in (a, b, c)], BLOCK, 3, 3)
    assert widest == 3 and _table(buffers, 3, 3)[0] == [1, 2, 7]
    assert buffers.np["tokens"][2, :3].tolist() == [7 * BLOCK, 4 * BLOCK + 1, 6 * BLOCK + 2]
    # b finished: c moves up to row 1, a shorter step
    buffers.fill([ScheduledChunk(r, 1) for r in (a, c)], BLOCK, 2, 2)
    assert _table(buffers, 2, 2) == [[1, 2], [5, 6]]
    assert buffers.np["tokens"][2, :2].tolist() == [7 * BLOCK, 6 * BLOCK + 2]
    # c preempted and recomputed into other blocks, as many as before; b's row comes back
    c.block_ids = [10, 11]
    c.num_computed_tokens = 0
    buffers.fill([ScheduledChunk(a, 1), ScheduledChunk(c, 7), ScheduledChunk(b, 1)], BLOCK, 3, 9)
    assert _table(buffers, 3, 3)[1][:2] == [10, 11] and _table(buffers, 3, 2)[2] == [3, 4]
    assert buffers.np["tokens"][2, 1:9].tolist() == [40, 41, 42, 43, 44, 45, 46, 4 * BLOCK + 1]
    assert buffers.np["seqs"][0, :3].tolist() == [9, 7, 6]
    # a's last block given back (a rejected draft's) and another taken in the same update
    a.block_ids[2] = 12
    buffers.fill([ScheduledChunk(a, 1)], BLOCK, 1, 1)
    assert _table(buffers, 1, 3) == [[1, 2, 12]] and buffers.np["tokens"][2, 0] == 12 * BLOCK


def test_request_token_ids_span_prompt_output_and_drafts():
    r = request(3, 0, [], outputs=[7, 8])
    r.spec_token_ids = [5]
    everything = [100, 101, 102, 7, 8, 5]
    for start in range(6):
        for end in range(start, 7):
            assert r.token_ids(start, end) == everything[start:end], (start, end)
