"""KV transfer throughput of the gRPC/TCP path on loopback, next to a raw socket copy of the same
bytes, sender and receiver in separate processes.

    python -m tests.benchmarks.bench_kv_transfer [--blocks 128] [--repeats 5]

Layout defaults to Llama-3.1-8B's (32 layers, 8 KV heads, head dim 128, bf16, 16-token blocks:
2 MiB a block, 128 KiB a token).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import socket
import statistics
import time

import torch

LAYOUT = dict(dtype="bfloat16", block_size=16, num_layers=32, num_kv_heads=8, head_dim=128)


def _receiver(port_queue, num_blocks: int) -> None:
    from engine.grpc_server import GrpcServer
    from engine.kv_cache import KVLayout, allocate_kv_cache
    from kvtransfer.lease import LeaseTable
    from kvtransfer.receiver import KvTransferServicer, add_kv_transfer_servicer
    from kvtransfer.wire import BlocksView

    class LeasingServicer(KvTransferServicer):
        """Opens a lease for every transfer id it is sent (the decode engine's job elsewhere)."""

        async def PushBlocks(self, request_iterator, context):
            async def with_lease():
                async for message in request_iterator:
                    if not isinstance(message, BlocksView) and message.HasField("begin"):
                        self.leases.create(message.begin.transfer_id, list(range(num_blocks)),
                                           message.begin.num_tokens, 60)
                    yield message
            result = await super().PushBlocks(with_lease(), context)
            return result

    async def main():
        layout = KVLayout(**LAYOUT)
        leases = LeaseTable(layout, allocate_kv_cache(layout, num_blocks, "cpu"))
        server = GrpcServer("127.0.0.1", 0)
        server.add(add_kv_transfer_servicer, LeasingServicer(leases), ["tandem.v1.KvTransfer"])
        await server.start()
        port_queue.put(server.port)
        await server.server.wait_for_termination()

    asyncio.run(main())


async def _grpc_runs(port: int, num_blocks: int, repeats: int,
                     message_bytes: int) -> list[float]:
    from engine.kv_cache import KVLayout, allocate_kv_cache
    from kvtransfer.sender import FirstToken, GrpcKvTransport, KvDestination, OutgoingTransfer

    layout = KVLayout(**LAYOUT)
    cache = allocate_kv_cache(layout, num_blocks, "cpu")
    cache.view(torch.int16).random_(-30000, 30000)
    transport = GrpcKvTransport(cache, layout, "bench", max_message_bytes=message_bytes)
    seconds = []
    for run in range(repeats + 1):
        transfer = OutgoingTransfer(num_blocks * layout.block_size)
        transfer.on_progress(list(range(num_blocks)), FirstToken(1))
        started = time.perf_counter()
        report = await transport.push(KvDestination(f"run-{run}", f"127.0.0.1:{port}", layout),
                                      transfer, 120)
        assert report.bytes_sent == num_blocks * layout.bytes_per_block
        if run:  # the first run warms up the channel
            seconds.append(time.perf_counter() - started)
    await transport.close()
    return seconds


def _opaque_sink(port_queue) -> None:
    """grpc.aio client-streaming of opaque bytes: what gRPC in Python can move at best."""
    import grpc

    async def main():
        async def sink(iterator, context):
            async for _ in iterator:
                pass
            return b""

        server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "bench.Sink", {"Push": grpc.stream_unary_rpc_method_handler(sink)}),))
        port_queue.put(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


async def _opaque_runs(port: int, total: int, message_bytes: int, repeats: int) -> list[float]:
    import grpc

    payload = bytes(message_bytes)
    seconds = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        push = channel.stream_unary("/bench.Sink/Push")
        for run in range(repeats + 1):
            started = time.perf_counter()
            call = push()
            for _ in range(total // message_bytes):
                await call.write(payload)
            await call.done_writing()
            await call
            if run:
                seconds.append(time.perf_counter() - started)
    return seconds


def _socket_sink(port_queue, total: int, repeats: int) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port_queue.put(server.getsockname()[1])
        buffer = bytearray(total)
        view = memoryview(buffer)
        for _ in range(repeats + 1):
            conn, _ = server.accept()
            with conn:
                got = 0
                while got < total:
                    got += conn.recv_into(view[got:], total - got)
                conn.sendall(b"k")


def _socket_runs(port: int, payload: bytes, repeats: int) -> list[float]:
    seconds = []
    for run in range(repeats + 1):
        started = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port)) as conn:
            conn.sendall(payload)
            conn.recv(1)
        if run:
            seconds.append(time.perf_counter() - started)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--message-mib", type=float, default=1.0,
                        help="payload bytes per message, both gRPC rows (default 1 MiB)")
    args = parser.parse_args()
    from engine.kv_cache import KVLayout

    layout = KVLayout(**LAYOUT)
    total = args.blocks * layout.bytes_per_block
    message_bytes = int(args.message_mib * 2**20)
    ctx = mp.get_context("spawn")
    ports = ctx.Queue()
    receiver = ctx.Process(target=_receiver, args=(ports, args.blocks), daemon=True)
    receiver.start()
    grpc_s = asyncio.run(_grpc_runs(ports.get(timeout=120), args.blocks, args.repeats,
                                    message_bytes))
    receiver.terminate()
    sink = ctx.Process(target=_opaque_sink, args=(ports,), daemon=True)
    sink.start()
    opaque_s = asyncio.run(_opaque_runs(ports.get(timeout=60), total, message_bytes, args.repeats))
    sink.terminate()
    sink = ctx.Process(target=_socket_sink, args=(ports, total, args.repeats), daemon=True)
    sink.start()
    payload = torch.empty(total, dtype=torch.uint8).random_().numpy().tobytes()
    sock_s = _socket_runs(ports.get(timeout=60), payload, args.repeats)
    sink.join(timeout=30)
    grpc_mbs = total / statistics.median(grpc_s) / 1e6
    sock_mbs = total / statistics.median(sock_s) / 1e6
    opaque_mbs = total / statistics.median(opaque_s) / 1e6
    print(f"payload {total / 2**20:.0f} MiB ({args.blocks} blocks x {layout.bytes_per_block // 1024} KiB), "
          f"median of {args.repeats}")
    print(f"gRPC KvTransfer : {grpc_mbs:8.0f} MB/s")
    print(f"grpc.aio opaque : {opaque_mbs:8.0f} MB/s  ({args.message_mib:g} MiB messages of plain bytes)")
    print(f"raw TCP socket  : {sock_mbs:8.0f} MB/s")
    print(f"KvTransfer / raw socket     : {grpc_mbs / sock_mbs:6.2f}")
    print(f"KvTransfer / grpc.aio opaque: {grpc_mbs / opaque_mbs:6.2f}")


if __name__ == "__main__":
    main()
