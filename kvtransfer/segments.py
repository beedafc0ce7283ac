"""Blocks of the paged KV cache <-> KvBlockSegment messages of bounded size.

A segment is one block's K and V for a run of layers: kv_cache[layer_start:layer_end, block_id],
shape [num_layers, 2, block_size, num_kv_heads, head_dim], raw little-endian bytes.
"""

from __future__ import annotations

import warnings
from typing import Iterator, Sequence

import torch

from engine.errors import InvalidRequestError
from engine.kv_cache import KVLayout
from protos.tandem.v1 import kv_transfer_pb2

DEFAULT_MAX_MESSAGE_BYTES = 1 << 20


def layers_per_segment(layout: KVLayout, max_bytes: int) -> int:
    return max(1, min(layout.num_layers, max_bytes // layout.bytes_per_block_layer))


def read_segments(kv_cache: torch.Tensor, layout: KVLayout, blocks: Sequence[tuple[int, int]],
                  max_bytes: int) -> list[kv_transfer_pb2.KvBlockSegment]:
    """Segments for (block_index, block_id) pairs, each at most max(max_bytes, one layer)."""
    step = layers_per_segment(layout, max_bytes)
    segments = []
    for block_index, block_id in blocks:
        for start in range(0, layout.num_layers, step):
            end = min(start + step, layout.num_layers)
            data = kv_cache[start:end, block_id].contiguous().view(torch.uint8).cpu()
            segments.append(kv_transfer_pb2.KvBlockSegment(
                block_index=block_index, layer_start=start, num_layers=end - start,
                data=data.numpy().tobytes()))
    return segments


def batch_segments(segments: list[kv_transfer_pb2.KvBlockSegment],
                   max_bytes: int) -> Iterator[kv_transfer_pb2.KvBlockBatch]:
    """Groups segments into batches of at most max_bytes payload (a lone larger one goes alone)."""
    batch: list[kv_transfer_pb2.KvBlockSegment] = []
    size = 0
    for segment in segments:
        if batch and size + len(segment.data) > max_bytes:
            yield kv_transfer_pb2.KvBlockBatch(segments=batch)
            batch, size = [], 0
        batch.append(segment)
        size += len(segment.data)
    if batch:
        yield kv_transfer_pb2.KvBlockBatch(segments=batch)


def write_segment(kv_cache: torch.Tensor, layout: KVLayout, block_id: int,
                  segment: kv_transfer_pb2.KvBlockSegment) -> None:
    """Copies a segment into kv_cache[layers, block_id]. Raises InvalidRequestError if malformed."""
    end = segment.layer_start + segment.num_layers
    if segment.num_layers == 0 or end > layout.num_layers:
        raise InvalidRequestError(f"segment layers [{segment.layer_start}, {end}) outside "
                                  f"[0, {layout.num_layers})")
    expected = segment.num_layers * layout.bytes_per_block_layer
    if len(segment.data) != expected:
        raise InvalidRequestError(f"segment of block {segment.block_index} has "
                                  f"{len(segment.data)} bytes, expected {expected}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # read-only source buffer; we only read from it
        raw = torch.frombuffer(segment.data, dtype=torch.uint8)
    target = kv_cache[segment.layer_start:end, block_id]
    target.copy_(raw.view(layout.torch_dtype).view(target.shape))
