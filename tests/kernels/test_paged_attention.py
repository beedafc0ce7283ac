"""The Triton paged-attention kernel against the torch reference (`kernels.reference`), directly
and through the model. On a machine without a GPU the kernels run under the Triton interpreter
(tests/kernels/conftest.py), so shapes stay tiny.

Tolerances: float32 atol/rtol 1e-4 (only summation order differs); float16 atol/rtol 2e-3
(one or two float16 ulps of outputs of magnitude ~1; on the GPU the P @ V product also takes
P in float16, as flash attention does).
"""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch

pytest.importorskip("triton")

from kernels import reference  # noqa: E402
from kernels.paged_attention import MAX_SPLITS, choose_num_splits, paged_attention  # noqa: E402

NUM_KV_HEADS = 2
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3}

# (query_len, seq_len) per sequence: a prompt chunk after a 9-token prefix-cache hit, a decode
# step, an empty CUDA-graph padding row, a 3-token speculative verification, a fresh prompt.
MIXED = ((32, 41), (1, 37), (0, 0), (3, 11), (6, 6))
NUM_PADDING_TOKENS = 3


class Batch(NamedTuple):
    q: torch.Tensor
    kv_layer: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: list[int]
    query_start_loc: list[int]

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.q.device
        return (torch.tensor(self.seq_lens, dtype=torch.int32, device=device),
                torch.tensor(self.query_start_loc, dtype=torch.int32, device=device))

    @property
    def num_real_tokens(self) -> int:
        return self.query_start_loc[-1]


def make_batch(lens: tuple[tuple[int, int], ...], group: int, head_dim: int, block_size: int,
               dtype: torch.dtype, device: str, seed: int) -> Batch:
    """Random q and paged K/V over shuffled, non-contiguous physical blocks. Everything the
    kernel must not read is NaN: block 0 (the table's padding), the slots past each sequence
    and the padding tokens' queries."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-seq_len // block_size) for _, seq_len in lens]
    num_blocks = 1 + sum(blocks_per_seq) + 4
    kv = torch.full((num_blocks, 2, block_size, NUM_KV_HEADS, head_dim), float("nan"))
    physical = (1 + torch.randperm(num_blocks - 1, generator=gen)).tolist()
    tables = torch.zeros(len(lens), max(blocks_per_seq), dtype=torch.int32)
    for i, ((_, seq_len), n) in enumerate(zip(lens, blocks_per_seq)):
        ids, physical = physical[:n], physical[n:]
        tables[i, :n] = torch.tensor(ids, dtype=torch.int32)
        context = torch.randn(n * block_size, 2, NUM_KV_HEADS, head_dim, generator=gen)
        context[seq_len:] = float("nan")
        kv[ids] = context.view(n, block_size, 2, NUM_KV_HEADS, head_dim).transpose(1, 2)
    starts = [0]
    for query_len, _ in lens:
        starts.append(starts[-1] + query_len)
    q = torch.randn(starts[-1] + NUM_PADDING_TOKENS, NUM_KV_HEADS * group, head_dim, generator=gen)
    q[starts[-1]:] = float("nan")
    return Batch(q.to(dtype).to(device), kv.to(dtype).to(device), tables.to(device),
                 [seq_len for _, seq_len in lens], starts)


def run_kernel(batch: Batch, num_splits: int | None, out: torch.Tensor | None = None,
               max_seq_len: int | None = None) -> torch.Tensor:
    seq_lens, query_start_loc = batch.tensors()
    max_query_len = max(b - a for a, b in zip(batch.query_start_loc, batch.query_start_loc[1:]))
    return paged_attention(batch.q, batch.kv_layer, batch.block_tables, seq_lens, query_start_loc,
                           max_query_len, batch.q.shape[-1] ** -0.5, out=out,
                           num_splits=num_splits, max_seq_len=max_seq_len)


def expected(batch: Batch) -> torch.Tensor:
    """The reference's output for the real tokens (computed on the CPU)."""
    q = batch.q.cpu()[:batch.num_real_tokens]
    return reference.paged_attention(q, batch.kv_layer.cpu(), batch.block_tables.cpu(),
                                     batch.seq_lens, batch.query_start_loc, q.shape[-1] ** -0.5)


def assert_matches(actual: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.cpu(), want, atol=tol, rtol=tol)


# Pairwise coverage of group x head_dim x block_size x dtype. Groups 2-4 take the 64-row tile
# for the 32-query chunk (group 1 the 16-row one); group 3 leaves a row of it unused (21 x 3).
@pytest.mark.parametrize("seed, group, head_dim, block_size, dtype", [
    (1, 1, 16, 8, torch.float32),
    (2, 1, 24, 16, torch.float16),
    (3, 2, 16, 16, torch.float16),
    (4, 2, 24, 8, torch.float32),
    (5, 4, 16, 8, torch.float16),
    (6, 4, 24, 16, torch.float32),
    (7, 3, 24, 8, torch.float16),
])
def test_mixed_batch_matches_reference_with_and_without_split_k(
        kernel_device, seed, group, head_dim, block_size, dtype):
    batch = make_batch(MIXED, group, head_dim, block_size, dtype, kernel_device, seed)
    want = expected(batch)
    real = batch.num_real_tokens
    outputs = []
    for num_splits in (1, 3):
        out = torch.full_like(batch.q, 7.0)
        assert run_kernel(batch, num_splits, out=out) is out
        assert_matches(out[:real], want, dtype)
        assert (out[real:] == 7.0).all()  # padding tokens: left untouched
        outputs.append(out[:real])
    assert_matches(outputs[1], outputs[0].cpu(), dtype)


def test_decode_batch_chooses_split_k_and_matches_reference(kernel_device):
    # 3 decodes x 2 KV heads fill few SMs, and an unknown max_seq_len counts as long: the
    # heuristic takes MAX_SPLITS (32), far more than the 1-2 KV tiles: most splits see no key
    lens = ((1, 100), (1, 37), (1, 70))
    assert choose_num_splits(3, NUM_KV_HEADS, 1, 16, num_sms=132) == MAX_SPLITS
    batch = make_batch(lens, 2, 16, 16, torch.float32, kernel_device, seed=11)
    out = run_kernel(batch, num_splits=None)
    assert_matches(out[:batch.num_real_tokens], expected(batch), torch.float32)
    assert (out[batch.num_real_tokens:] == 0).all()  # out=None: allocated as zeros


@pytest.mark.parametrize("num_seqs, max_query_len, max_seq_len, splits", [
    (4, 1, None, MAX_SPLITS),   # few decodes, context unknown: split as far as allowed
    (4, 1, 1000, 4),            # ... at least MIN_TOKENS_PER_SPLIT = 256 keys per split
    (4, 1, 200, 1),             # a short context does not split
    (4, 4, None, MAX_SPLITS),   # speculative verification fits one query block (BLOCK_Q 4)
    (4, 5, None, 1),            # a prompt chunk has parallelism over its query blocks
    (40, 1, None, 6),           # 80 programs: PROGRAMS_PER_SM 4 x 132 SMs // 80
    (300, 1, None, 1),          # enough programs already
])
def test_choose_num_splits(num_seqs, max_query_len, max_seq_len, splits):
    assert choose_num_splits(num_seqs, NUM_KV_HEADS, max_query_len, block_q=4, num_sms=132,
                             max_seq_len=max_seq_len) == splits


def test_model_greedy_tokens_match_torch_backend(tiny_models, kernel_device):
    # 20-token prompt in 8-token chunks over 8-token blocks, then 4 decode steps; run twice on
    # the Triton engine, so the second prompt starts with a 16-token prefix-cache hit
    from engine.sampling_params import SamplingParams
    from tests.engine_loop import build_reference, generate

    model = tiny_models["llama"]
    prompt = [(7 * i + 3) % 500 + 10 for i in range(20)]
    sampling = SamplingParams(4, temperature=0.0, ignore_eos=True)
    config = dict(device=kernel_device, block_size=8, max_num_batched_tokens=8)
    want = generate(build_reference(model, **config), prompt, sampling)
    triton_engine = build_reference(model, attention_backend="triton", **config)
    assert generate(triton_engine, prompt, sampling, "miss") == want
    assert generate(triton_engine, prompt, sampling, "hit") == want
