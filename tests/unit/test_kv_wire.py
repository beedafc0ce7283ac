"""The hand-framed KV messages are ordinary protobuf: byte-identical to what protobuf itself
serializes, and any valid protobuf encoding decodes."""

from __future__ import annotations

import pytest
import torch

from engine.errors import InvalidRequestError
from engine.kv_cache import KVLayout, allocate_kv_cache
from kvtransfer.segments import plan_messages, write_segment
from kvtransfer.wire import BlocksView, decode_push_message, encode_blocks_message
from protos.tandem.v1 import kv_transfer_pb2 as pb

LAYOUT = KVLayout("bfloat16", 4, 3, 2, 8)


@pytest.fixture
def cache():
    kv = allocate_kv_cache(LAYOUT, 6, "cpu")
    kv.view(torch.int16).random_(-30000, 30000)
    return kv


def reference(cache, segments):
    return pb.KvPushMessage(blocks=pb.KvBlockBatch(segments=[
        pb.KvBlockSegment(block_index=i, layer_start=s, num_layers=n,
                          data=cache[s:s + n, b].contiguous().view(torch.uint8).numpy().tobytes())
        for i, b, s, n in segments]))


def test_encoding_is_byte_identical_to_protobuf(cache):
    segments = [(0, 5, 0, 2), (0, 5, 2, 1), (1, 0, 0, 3), (300, 2, 1, 2)]
    assert encode_blocks_message(cache, LAYOUT, segments) == reference(cache, segments).SerializeToString()


def test_decoding_any_encoding_and_writing_round_trips(cache):
    segments = [(0, 5, 0, 3), (1, 2, 0, 3)]
    view = decode_push_message(reference(cache, segments).SerializeToString())
    assert isinstance(view, BlocksView)
    target = allocate_kv_cache(LAYOUT, 6, "cpu")
    for segment, block_id in zip(view.segments, (1, 4)):
        write_segment(target, LAYOUT, block_id, segment)
    assert torch.equal(target[:, 1].view(torch.int16), cache[:, 5].view(torch.int16))
    assert torch.equal(target[:, 4].view(torch.int16), cache[:, 2].view(torch.int16))


def test_other_messages_decode_as_protobuf():
    message = pb.KvPushMessage(complete=pb.TransferComplete(first_token_id=7, num_segments=3))
    assert decode_push_message(message.SerializeToString()) == message


@pytest.mark.parametrize("raw", [b"\x12\x05\x0a\x10", b"\x12\xff", b"\x12\x02\x0a\x80"])
def test_malformed_bytes_are_invalid_argument(raw):
    with pytest.raises(InvalidRequestError):
        view = decode_push_message(raw)
        for segment in view.segments:
            write_segment(allocate_kv_cache(LAYOUT, 1, "cpu"), LAYOUT, 0, segment)


def test_plan_splits_by_layer_and_bounds_messages():
    per_layer = LAYOUT.bytes_per_block_layer
    plan = plan_messages(LAYOUT, [(0, 4), (1, 9)], max_bytes=2 * per_layer)
    assert plan == [[(0, 4, 0, 2)], [(0, 4, 2, 1)], [(1, 9, 0, 2)], [(1, 9, 2, 1)]]
    assert plan_messages(LAYOUT, [(0, 4), (1, 9)], max_bytes=10 * per_layer) == [
        [(0, 4, 0, 3), (1, 9, 0, 3)]]
    assert all(sum(n for *_, n in m) * per_layer <= 2 * per_layer for m in plan)
    covered = sorted((i, s + k) for m in plan for i, _, s, n in m for k in range(n))
    assert covered == [(b, layer) for b in (0, 1) for layer in range(3)]


def test_a_segment_header_is_checked_before_anything_is_sized_by_it(cache):
    """A peer's num_layers is untrusted: a huge one is refused without building its range."""
    import tracemalloc

    from kvtransfer.lease import LeaseTable
    from kvtransfer.wire import SegmentView

    leases = LeaseTable(LAYOUT, cache)
    lease = leases.create("t", [1, 2], num_tokens=8, timeout_s=30)
    leases.begin(pb.TransferBegin(version=pb.KV_CONTRACT_VERSION_1, transfer_id="t",
                                  layout=LAYOUT.to_pb(), num_tokens=8))
    hostile = BlocksView([SegmentView(0, 0, 10**7, memoryview(b""))])
    tracemalloc.start()
    try:
        with pytest.raises(InvalidRequestError, match="outside"):
            leases.write(lease, hostile)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20  # a set of 10**7 layer numbers would take hundreds of MB


def test_lease_writes_do_not_wait_for_the_engines_kernels():
    """On CUDA a lease writes on its own stream: a segment lands while the default stream is
    still busy with a long kernel (a decode step in flight), instead of queueing behind it."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from kvtransfer.lease import LeaseTable

    source = allocate_kv_cache(LAYOUT, 6, "cpu")
    source.view(torch.int16).random_(-30000, 30000)
    target = allocate_kv_cache(LAYOUT, 6, "cuda")
    table = LeaseTable(LAYOUT, target)
    lease = table.create("t", [4, 1], num_tokens=8, timeout_s=60)
    table.begin(pb.TransferBegin(version=pb.KV_CONTRACT_VERSION_1, transfer_id="t",
                                 layout=LAYOUT.to_pb(), num_tokens=8))
    # a first write loads the copy kernels (CUDA loads modules lazily, and a module load waits
    # for the device): in a server the first transfers do it, long before this one
    table.write(lease, decode_push_message(encode_blocks_message(source, LAYOUT, [(1, 5, 0, 3)])))
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # ~1 s of GPU time on the default stream
    table.write(lease, decode_push_message(encode_blocks_message(source, LAYOUT, [(0, 3, 0, 3)])))
    assert not torch.cuda.current_stream().query(), "the long kernel ended first: inconclusive"
    with torch.cuda.stream(table.stream):
        bits = target.view(torch.int16).cpu()  # random bits: compared as integers (NaNs)
    assert torch.equal(bits[:, 4], source.view(torch.int16)[:, 3])
    assert torch.equal(bits[:, 1], source.view(torch.int16)[:, 5])
    torch.cuda.synchronize()


def test_sender_reads_wait_for_their_step_only():
    """On CUDA the sender reads blocks on its own stream after the event of the step that
    computed them: later kernels on the engine's stream (the next prefill) do not delay it."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from kvtransfer.sender import GrpcKvTransport

    source = allocate_kv_cache(LAYOUT, 6, "cuda")
    source.view(torch.int16).random_(-30000, 30000)
    transport = GrpcKvTransport(source, LAYOUT, "prefill-test")
    ready = torch.cuda.Event()
    ready.record()  # the step that computed the blocks
    torch.cuda._sleep(2_000_000_000)  # ~1 s: the next step, queued after it
    message = transport._encode([(0, 3, 0, 3), (1, 5, 0, 3)], ready)
    assert not torch.cuda.current_stream().query(), "the long kernel ended first: inconclusive"
    torch.cuda.synchronize()
    assert message == encode_blocks_message(source.cpu(), LAYOUT, [(0, 3, 0, 3), (1, 5, 0, 3)])
