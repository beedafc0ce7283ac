"""Blocks of the paged KV cache <-> bounded KvBlockSegment payloads.

A segment is one block's K and V for a run of layers: kv_cache[layer_start:layer_end, block_id],
shape [num_layers, 2, block_size, num_kv_heads, head_dim], raw little-endian bytes. Blocks bigger
than a message are split by layer; messages carry segments up to a byte limit.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import torch

from engine.errors import InvalidRequestError
from engine.kv_cache import KVLayout

DEFAULT_MAX_MESSAGE_BYTES = 1 << 20

Segment = tuple[int, int, int, int]  # (block_index, block_id, layer_start, num_layers)


def layers_per_segment(layout: KVLayout, max_bytes: int) -> int:
    return max(1, min(layout.num_layers, max_bytes // layout.bytes_per_block_layer))


def plan_messages(layout: KVLayout, blocks: Sequence[tuple[int, int]],
                  max_bytes: int) -> list[list[Segment]]:
    """Groups (block_index, block_id) pairs' segments into messages of at most max_bytes payload
    (at least one layer of one block each)."""
    step = layers_per_segment(layout, max_bytes)
    messages: list[list[Segment]] = [[]]
    size = 0
    for block_index, block_id in blocks:
        for start in range(0, layout.num_layers, step):
            layers = min(step, layout.num_layers - start)
            num_bytes = layers * layout.bytes_per_block_layer
            if messages[-1] and size + num_bytes > max_bytes:
                messages.append([])
                size = 0
            messages[-1].append((block_index, block_id, start, layers))
            size += num_bytes
    return [m for m in messages if m]


def segment_layers(layout: KVLayout, segment) -> range:
    """The segment's layers, checked against the layout before anything is sized by them (a
    peer's header is untrusted). Raises InvalidRequestError if they are empty or out of range."""
    end = segment.layer_start + segment.num_layers
    if segment.num_layers == 0 or end > layout.num_layers:
        raise InvalidRequestError(f"segment layers [{segment.layer_start}, {end}) outside "
                                  f"[0, {layout.num_layers})")
    return range(segment.layer_start, end)


def write_segment(kv_cache: torch.Tensor, layout: KVLayout, block_id: int, segment) -> None:
    """Copies a segment (anything with block_index, layer_start, num_layers, data) into
    kv_cache[layers, block_id]. Raises InvalidRequestError if it is malformed."""
    end = segment_layers(layout, segment).stop
    data = segment.data  # read once: on a protobuf message every access copies
    expected = segment.num_layers * layout.bytes_per_block_layer
    if len(data) != expected:
        raise InvalidRequestError(f"segment of block {segment.block_index} has {len(data)} "
                                  f"bytes, expected {expected}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # read-only source buffer; we only read from it
        raw = torch.frombuffer(data, dtype=torch.uint8)
    target = kv_cache[segment.layer_start:end, block_id].view(torch.uint8)
    target.copy_(raw.view(target.shape))
