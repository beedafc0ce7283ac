"""Hand-framed protobuf wire format for KV payload messages, so block bytes are copied once
on each side instead of through protobuf message objects (each `.data` access on a upb message
copies the payload).

The bytes are ordinary protobuf: `encode_blocks_message` produces exactly what
`KvPushMessage(blocks=KvBlockBatch(segments=[...])).SerializeToString()` would (fields in
number order), and `decode_push_message` accepts any valid encoding of a KvPushMessage, so peers
in other languages use their generated code unchanged.

    KvPushMessage.blocks (2, LEN) -> KvBlockBatch.segments (1, LEN, repeated)
        -> KvBlockSegment: block_index (1, varint), layer_start (2, varint),
                           num_layers (3, varint), data (4, LEN)
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from engine.errors import InvalidRequestError
from engine.kv_cache import KVLayout
from protos.tandem.v1 import kv_transfer_pb2

_LEN, _VARINT = 2, 0


class SegmentView(NamedTuple):
    """A KvBlockSegment whose data is a view into the received message (no copy)."""

    block_index: int
    layer_start: int
    num_layers: int
    data: memoryview


class BlocksView(NamedTuple):
    segments: list[SegmentView]


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _segment_header(block_index: int, layer_start: int, num_layers: int, num_bytes: int) -> bytes:
    fields = b""
    for number, value in ((1, block_index), (2, layer_start), (3, num_layers)):
        if value:  # proto3 leaves zero scalars out
            fields += _varint(number << 3 | _VARINT) + _varint(value)
    return fields + _varint(4 << 3 | _LEN) + _varint(num_bytes)


def encode_blocks_message(kv_cache: torch.Tensor, layout: KVLayout,
                          segments: Sequence[tuple[int, int, int, int]]) -> bytes:
    """Serialized KvPushMessage(blocks=...) for (block_index, block_id, layer_start, num_layers)
    segments, copying each payload straight from the cache into the message buffer."""
    parts: list[tuple[bytes, int, int, int]] = []  # (segment prefix, block_id, start, layers)
    body_len = 0
    for block_index, block_id, start, layers in segments:
        header = _segment_header(block_index, start, layers, layers * layout.bytes_per_block_layer)
        segment_len = len(header) + layers * layout.bytes_per_block_layer
        prefix = _varint(1 << 3 | _LEN) + _varint(segment_len) + header
        parts.append((prefix, block_id, start, layers))
        body_len += len(prefix) + layers * layout.bytes_per_block_layer
    head = _varint(2 << 3 | _LEN) + _varint(body_len)
    buffer = bytearray(len(head) + body_len)
    buffer[:len(head)] = head
    flat = torch.frombuffer(buffer, dtype=torch.uint8)
    offset = len(head)
    for prefix, block_id, start, layers in parts:
        buffer[offset:offset + len(prefix)] = prefix
        offset += len(prefix)
        source = kv_cache[start:start + layers, block_id].view(torch.uint8)  # innermost dim is dense
        size = layers * layout.bytes_per_block_layer
        flat[offset:offset + size].view(source.shape).copy_(source)
        offset += size
    return bytes(buffer)


def _read_varint(data: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise InvalidRequestError("malformed KvPushMessage: bad varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(data: memoryview):
    """(field number, wire type, value) for each field; LEN values are memoryviews."""
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == _VARINT:
            value, pos = _read_varint(data, pos)
        elif wire_type == _LEN:
            size, pos = _read_varint(data, pos)
            if pos + size > len(data):
                raise InvalidRequestError("malformed KvPushMessage: truncated field")
            value, pos = data[pos:pos + size], pos + size
        elif wire_type in (1, 5):  # fixed64 / fixed32: skip
            step = 8 if wire_type == 1 else 4
            value, pos = None, pos + step
        else:
            raise InvalidRequestError(f"malformed KvPushMessage: wire type {wire_type}")
        yield number, wire_type, value


def _segment(data: memoryview) -> SegmentView:
    values = {1: 0, 2: 0, 3: 0}
    payload = memoryview(b"")
    for number, wire_type, value in _fields(data):
        if number in values and wire_type == _VARINT:
            values[number] = value
        elif number == 4 and wire_type == _LEN:
            payload = value
    return SegmentView(values[1], values[2], values[3], payload)


def decode_push_message(raw: bytes):
    """A BlocksView for a blocks message (payloads not copied), else a KvPushMessage."""
    data = memoryview(raw)
    blocks = None
    for number, wire_type, value in _fields(data):
        if number == 2 and wire_type == _LEN:
            blocks = value
        elif number in (1, 3, 4, 5):
            return kv_transfer_pb2.KvPushMessage.FromString(raw)
    if blocks is None:
        return kv_transfer_pb2.KvPushMessage.FromString(raw)
    return BlocksView([_segment(value) for number, wire_type, value in _fields(blocks)
                       if number == 1 and wire_type == _LEN])


def encode_push_message(message) -> bytes:
    """Request serializer: pre-encoded bytes pass through, messages are serialized."""
    return message if isinstance(message, bytes) else message.SerializeToString()
