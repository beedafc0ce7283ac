"""The attention backend seam: the model calls `backend.forward(...)` and never sees how paged
attention is computed. The torch backend wraps `kernels.reference`; the Triton backend runs
`kernels.paged_attention` (imported on first use, so triton is only needed when it is chosen).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from typing import Protocol

import torch

from engine.ops import KernelOps, TorchOps, TritonOps
from kernels import reference


@dataclass(slots=True)
class AttentionMetadata:
    """Describes one forward step over a batch of sequences, each contributing a contiguous run of
    query tokens (a prompt chunk, one decode token, or several speculative tokens).

    slot_mapping:    [T] long, where each new token's K/V is written (block_id * block_size + offset)
    block_tables:    [B, max_blocks] int32, each sequence's physical blocks in order (0-padded)
    seq_lens:        per sequence, context length after this step (cached + new tokens)
    query_start_loc: B + 1 prefix sums of the per-sequence query lengths

    The Triton backend reads device tensors and host bounds instead of the lists:

    seq_lens_t, query_start_loc_t: the lists as int32 tensors on block_tables' device (a
                     CUDA-graph runner fills persistent buffers); None: built on first use
    max_query_len:   host bound on the query lengths (grid sizing); None: from the list
    max_seq_len:     host bound on seq_lens (a split-K hint); None: from the list
    """

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: list[int]
    query_start_loc: list[int]
    seq_lens_t: torch.Tensor | None = None
    query_start_loc_t: torch.Tensor | None = None
    max_query_len: int | None = None
    max_seq_len: int | None = None

    def __post_init__(self) -> None:
        if self.max_query_len is None:
            self.max_query_len = max((b - a for a, b in pairwise(self.query_start_loc)), default=0)
        if self.max_seq_len is None:
            self.max_seq_len = max(self.seq_lens, default=0)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    def device_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(seq_lens_t, query_start_loc_t), built from the lists on block_tables' device when
        missing and kept, so the step's other layers reuse them."""
        device = self.block_tables.device
        if self.seq_lens_t is None:
            self.seq_lens_t = torch.tensor(self.seq_lens, dtype=torch.int32, device=device)
        if self.query_start_loc_t is None:
            self.query_start_loc_t = torch.tensor(self.query_start_loc, dtype=torch.int32,
                                                  device=device)
        return self.seq_lens_t, self.query_start_loc_t


class AttentionBackend(Protocol):
    """Writes the step's new K/V into the layer's paged cache, then attends over it. `ops` are
    the model's other kernels that go with this backend (engine/ops.py)."""

    ops: KernelOps

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor,
                meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """q: [T, H, D]; k, v: [T, Hkv, D]; kv_layer: [num_blocks, 2, block_size, Hkv, D].

        Mutates kv_layer (the slots in meta.slot_mapping). Returns [T, H, D].
        """
        ...


class TorchAttentionBackend:
    """Reference backend: correct on any device, fast on none."""

    name = "torch"

    def __init__(self) -> None:
        self.ops = TorchOps()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor,
                meta: AttentionMetadata, scale: float) -> torch.Tensor:
        reference.write_kv_cache(k, v, kv_layer, meta.slot_mapping)
        return reference.paged_attention(q, kv_layer, meta.block_tables, meta.seq_lens,
                                         meta.query_start_loc, scale)


class TritonAttentionBackend:
    """Triton paged attention (CUDA; also runs on CPU tensors under TRITON_INTERPRET=1)."""

    name = "triton"

    def __init__(self) -> None:
        from kernels.cache import write_kv_cache
        from kernels.paged_attention import paged_attention
        self._write_kv_cache, self._paged_attention = write_kv_cache, paged_attention
        self.ops = TritonOps()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor,
                meta: AttentionMetadata, scale: float) -> torch.Tensor:
        self._write_kv_cache(k, v, kv_layer, meta.slot_mapping)
        seq_lens, query_start_loc = meta.device_tensors()
        return self._paged_attention(q, kv_layer, meta.block_tables, seq_lens, query_start_loc,
                                     meta.max_query_len, scale, max_seq_len=meta.max_seq_len)


_BACKENDS = {"torch": TorchAttentionBackend, "triton": TritonAttentionBackend}


def get_attention_backend(name: str = "torch") -> AttentionBackend:
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; available: {', '.join(_BACKENDS)}")
    return _BACKENDS[name]()
