"""The attention backend seam: the model calls `backend.forward(...)` and never sees how paged
attention is computed. The torch backend wraps `kernels.reference`; Triton kernels will be a
second backend with the same signature.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from kernels import reference


@dataclass(slots=True)
class AttentionMetadata:
    """Describes one forward step over a batch of sequences, each contributing a contiguous run of
    query tokens (a prompt chunk, one decode token, or several speculative tokens).

    slot_mapping:    [T] long, where each new token's K/V is written (block_id * block_size + offset)
    block_tables:    [B, max_blocks] int32, each sequence's physical blocks in order (0-padded)
    seq_lens:        per sequence, context length after this step (cached + new tokens)
    query_start_loc: B + 1 prefix sums of the per-sequence query lengths
    """

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: list[int]
    query_start_loc: list[int]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)


class AttentionBackend(Protocol):
    """Writes the step's new K/V into the layer's paged cache, then attends over it."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor,
                meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """q: [T, H, D]; k, v: [T, Hkv, D]; kv_layer: [num_blocks, 2, block_size, Hkv, D].

        Mutates kv_layer (the slots in meta.slot_mapping). Returns [T, H, D].
        """
        ...


class TorchAttentionBackend:
    """Reference backend: correct on any device, fast on none."""

    name = "torch"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor,
                meta: AttentionMetadata, scale: float) -> torch.Tensor:
        reference.write_kv_cache(k, v, kv_layer, meta.slot_mapping)
        return reference.paged_attention(q, kv_layer, meta.block_tables, meta.seq_lens,
                                         meta.query_start_loc, scale)


def get_attention_backend(name: str = "torch") -> AttentionBackend:
    if name == "torch":
        return TorchAttentionBackend()
    raise ValueError(f"unknown attention backend {name!r}; available: torch")
