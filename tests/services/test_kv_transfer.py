"""The KV transfer contract over real gRPC: the blocks decode receives are bitwise equal to the
blocks prefill computed; bad transfers fail with the right status and release their lease."""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest
import torch

from engine.errors import NotFoundError, PreconditionError
from engine.grpc_server import GrpcServer
from engine.instance import build_engine_parts
from engine.kv_cache import KVLayout, allocate_kv_cache
from engine.sampling_params import SamplingParams
from kvtransfer.lease import LeaseState, LeaseTable
from kvtransfer.receiver import KvTransferServicer, add_kv_transfer_servicer
from kvtransfer.sender import GrpcKvTransport, KvDestination
from prefill_service.engine import PrefillEngine
from protos.tandem.v1 import kv_transfer_pb2, kv_transfer_pb2_grpc
from tests.reference import prompt_ids
from tests.services.conftest import LoopThread, config_for


class RecordingTransport(GrpcKvTransport):
    """The real gRPC transport, also remembering what it read from the prefill cache."""

    sent: dict[int, torch.Tensor]

    async def push(self, destination, transfer, timeout_s):
        self.sent = {}
        inner = transfer.next_blocks

        async def next_blocks(limit):
            pairs = await inner(limit)
            for index, block_id in pairs or []:
                self.sent[index] = self.kv_cache[:, block_id].clone()
            return pairs

        transfer.next_blocks = next_blocks
        return await super().push(destination, transfer, timeout_s)


@pytest.fixture
def rig(tiny_models, device):
    loop = LoopThread()
    parts = build_engine_parts(config_for(tiny_models["llama"], max_num_batched_tokens=7,
                                          device=device), False)
    transport = RecordingTransport(parts.runner.kv_cache, parts.layout, "test-prefill",
                                   max_message_bytes=3000)  # several messages per block
    engine = PrefillEngine(parts, transport, loop.loop)
    engine.start()
    receiver_cache = allocate_kv_cache(parts.layout, 64, device)
    leases = LeaseTable(parts.layout, receiver_cache)
    server = loop.run(_serve(leases))
    yield loop, engine, leases, receiver_cache, f"127.0.0.1:{server.port}"
    loop.run(server.stop())
    loop.run(transport.close())
    engine.stop()
    loop.close()
    pool = parts.scheduler.pool
    assert pool.num_free_blocks == pool.num_blocks


def run_prefill(loop, engine, prompt, destination):
    sampling = SamplingParams(max_tokens=1, temperature=0.0)
    return loop.run(engine.prefill("r", prompt, sampling, destination, 30.0))


def test_received_blocks_are_bitwise_equal(rig):
    loop, engine, leases, receiver_cache, address = rig
    prompt = prompt_ids(0, 37, 2000)  # 2 full blocks and a partial one, in chunks of 7
    block_ids = [9, 3, 40]
    lease = loop.run(_create(leases, "t1", block_ids, len(prompt)))
    result = run_prefill(loop, engine, prompt, KvDestination("t1", address, engine.parts.layout))
    assert lease.state is LeaseState.COMPLETE and lease.first_token_id == result.first_token_id
    sent = engine.transport.sent
    assert sorted(sent) == [0, 1, 2]
    for index, block_id in enumerate(block_ids):
        received = receiver_cache[:, block_id]
        assert torch.equal(received.view(torch.uint8), sent[index].view(torch.uint8))
    assert result.bytes_sent == lease.bytes_received == 3 * engine.parts.layout.bytes_per_block


def test_layout_mismatch_is_failed_precondition(rig):
    loop, engine, leases, _, address = rig
    other = KVLayout("float32", 16, 2, 2, 99)
    with pytest.raises(PreconditionError):
        run_prefill(loop, engine, [5, 6, 7], KvDestination("t2", address, other))
    # a sender lying about its layout is refused by the receiver too
    lease = loop.run(_create(leases, "t3", [1], 3))
    status = loop.run(_push_begin(address, "t3", other))
    assert status == grpc.StatusCode.FAILED_PRECONDITION
    assert lease.state is LeaseState.FAILED


def test_unknown_or_closed_lease_is_not_found(rig):
    loop, engine, leases, _, address = rig
    with pytest.raises(NotFoundError):
        run_prefill(loop, engine, [5, 6, 7], KvDestination("nope", address, engine.parts.layout))
    lease = loop.run(_create(leases, "t4", [2], 3))
    loop.run(_close(leases, "t4"))
    assert lease.state is LeaseState.FAILED
    assert loop.run(_push_begin(address, "t4", engine.parts.layout)) == grpc.StatusCode.NOT_FOUND


def test_cancelled_prefill_releases_everything(rig):
    loop, engine, leases, _, address = rig
    prompt = prompt_ids(1, 200, 2000)  # 29 chunks of 7 tokens, 13 blocks
    lease = loop.run(_create(leases, "t5", list(range(13)), len(prompt)))
    # hold the prefill engine once block 0 is computed (after 3 chunks) until the cancel is
    # done, and cancel as soon as the receiver has written some of block 0: mid-transfer
    cancelled = threading.Event()
    steps = []
    real_execute = engine.parts.runner.execute

    def execute(chunks):
        if len(steps) == 3 and not cancelled.wait(60):  # a hang guard
            raise RuntimeError("test hang guard")
        steps.append(chunks)
        return real_execute(chunks)

    engine.parts.runner.execute = execute
    written = []  # an asyncio.Event, made on the loop, set by the receiver's first write
    real_write = leases.write

    def write(lease, batch):
        real_write(lease, batch)
        written[0].set()

    leases.write = write

    async def cancel_mid_transfer():
        written.append(asyncio.Event())
        destination = KvDestination("t5", address, engine.parts.layout)
        task = asyncio.ensure_future(engine.prefill("r", prompt, SamplingParams(max_tokens=1),
                                                    destination, 30.0))
        await asyncio.wait_for(written[0].wait(), 60)  # a hang guard
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        cancelled.set()
        async with asyncio.timeout(10):  # a hang guard: the receiver notices the broken stream
            while lease.state is LeaseState.RECEIVING:
                await asyncio.sleep(0.01)

    loop.run(cancel_mid_transfer())
    assert lease.state is LeaseState.FAILED and lease.failure
    assert 0 < lease.bytes_received < 13 * engine.parts.layout.bytes_per_block
    # the prefill tier released the request: every block free, nothing scheduled (commands run
    # in order on the engine thread, so once this marker ran, the release had run)
    released = threading.Event()
    engine.core.call(released.set)
    assert released.wait(60)
    scheduler = engine.parts.scheduler
    assert scheduler.pool.num_free_blocks == scheduler.pool.num_blocks
    assert not (scheduler.running or scheduler.waiting)


async def _serve(leases) -> GrpcServer:
    server = GrpcServer("127.0.0.1", 0)  # grpc.aio binds to the running loop
    server.add(add_kv_transfer_servicer, KvTransferServicer(leases), ["tandem.v1.KvTransfer"])
    await server.start()
    return server


async def _create(leases, transfer_id, block_ids, num_tokens):
    return leases.create(transfer_id, block_ids, num_tokens, timeout_s=30)


async def _close(leases, transfer_id):
    leases.close(transfer_id, "test")


async def _push_begin(address, transfer_id, layout) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(address) as channel:
        call = kv_transfer_pb2_grpc.KvTransferStub(channel).PushBlocks()
        await call.write(kv_transfer_pb2.KvPushMessage(begin=kv_transfer_pb2.TransferBegin(
            version=kv_transfer_pb2.KV_CONTRACT_VERSION_1, transfer_id=transfer_id,
            layout=layout.to_pb(), num_tokens=3)))
        await call.done_writing()
        try:
            await call
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK
