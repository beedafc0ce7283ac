"""The paged KV cache: its layout and its allocation from a memory budget.

One tensor per instance holds every layer's blocks:

    kv_cache: [num_layers, num_blocks, 2, block_size, num_kv_heads, head_dim]
                   |           |       |       |
                   |           |       |       '-- token slot within the block
                   |           |       '---------- 0 = K, 1 = V
                   |           '------------------ physical block id (from the BlockPool)
                   '------------------------------ kv_cache[l] is layer l's cache for attention

    a sequence of 37 tokens with block_size 16 and block table [7, 2, 9]:

        tokens 0-15  -> block 7, slots 0-15
        tokens 16-31 -> block 2, slots 0-15
        tokens 32-36 -> block 9, slots 0-4   (slots 5-15 unused until decode appends)

    flat slot of token t = block_table[t // block_size] * block_size + t % block_size

A block's bytes for the KV transfer are kv_cache[:, block_id] (every layer, K and V).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from protos.tandem.v1 import kv_transfer_pb2

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True, slots=True)
class KVLayout:
    """What both tiers must agree on to exchange blocks."""

    dtype: str
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def bytes_per_block_layer(self) -> int:
        return 2 * self.block_size * self.num_kv_heads * self.head_dim * self.torch_dtype.itemsize

    @property
    def bytes_per_block(self) -> int:
        return self.num_layers * self.bytes_per_block_layer

    def mismatch(self, other: "KVLayout") -> str | None:
        """Human-readable difference, or None when the layouts are equal."""
        if self == other:
            return None
        return f"KV layout mismatch: ours {self} vs theirs {other}"

    def to_pb(self) -> kv_transfer_pb2.KvLayout:
        return kv_transfer_pb2.KvLayout(dtype=self.dtype, block_size=self.block_size,
                                        num_layers=self.num_layers, num_kv_heads=self.num_kv_heads,
                                        head_dim=self.head_dim)

    @classmethod
    def from_pb(cls, pb: kv_transfer_pb2.KvLayout) -> "KVLayout":
        return cls(dtype=pb.dtype, block_size=pb.block_size, num_layers=pb.num_layers,
                   num_kv_heads=pb.num_kv_heads, head_dim=pb.head_dim)


def dtype_name(dtype: torch.dtype) -> str:
    for name, value in _DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"unsupported KV cache dtype {dtype}")


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6, "mib": 2**20,
          "g": 1e9, "gb": 1e9, "gib": 2**30, "t": 1e12, "tb": 1e12, "tib": 2**40}


def parse_size(text: str) -> int:
    """'512MiB' -> 536870912. Raises ValueError on anything else."""
    match = _SIZE.match(text)
    unit = (match.group(2) or "").lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"not a memory size: {text!r} (examples: 512MiB, 2GiB, 1000000)")
    return int(float(match.group(1)) * _UNITS[unit])


def num_blocks_for_budget(layout: KVLayout, budget_bytes: int) -> int:
    num_blocks = budget_bytes // layout.bytes_per_block
    if num_blocks < 1:
        raise ValueError(f"KV cache budget {budget_bytes} B is below one block "
                         f"({layout.bytes_per_block} B)")
    return num_blocks


def allocate_kv_cache(layout: KVLayout, num_blocks: int, device: str | torch.device) -> torch.Tensor:
    """Zero-filled cache tensor in the documented layout."""
    return torch.zeros(layout.num_layers, num_blocks, 2, layout.block_size, layout.num_kv_heads,
                       layout.head_dim, dtype=layout.torch_dtype, device=device)
