"""A fault-injecting TCP proxy: put it between two Tandem components (gateway -> decode,
decode -> prefill, prefill -> decode's KV port) and delay, stall or cut what flows through it.

    proxy = FaultProxy("127.0.0.1:8100")      # forwards 127.0.0.1:<proxy.port> -> 8100
    proxy.delay_s = 0.05                      # every chunk, both ways, 50 ms late
    proxy.stall()                             # stop forwarding (connections stay open)
    proxy.resume()
    proxy.cut()                               # reset every open connection now
    proxy.cut_after_bytes = 4096              # reset a connection once it carried 4 KiB
    proxy.close()

It runs its own event loop on a daemon thread, so tests and scripts drive it synchronously.
gRPC runs over HTTP/2 on one TCP connection per channel, so a cut ends every call on it at once
(UNAVAILABLE), a stall makes calls wait for their deadlines, and a delay slows them.

As a command, for chaos-testing a deployment by hand:

    python -m tests.faults --listen 9100 --target prefill-host:8100 --delay-ms 20 \\
        [--stall-after-s 30] [--cut-every-s 60]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import threading
import time

CHUNK_BYTES = 1 << 16


class FaultProxy:
    """Forwards connections on 127.0.0.1:`port` to `target` ("host:port"), with faults."""

    def __init__(self, target: str, listen_port: int = 0, listen_host: str = "127.0.0.1"):
        self.target_host, target_port = target.rsplit(":", 1)
        self.target_port = int(target_port)
        self.delay_s = 0.0
        self.cut_after_bytes: int | None = None
        self.num_connections = 0
        self._flowing = None  # asyncio.Event, set while forwarding (made on the proxy's loop)
        self._writers: set[asyncio.StreamWriter] = set()
        self._connections: set[asyncio.Task] = set()  # the _accept tasks still running
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._server = self._run(self._start(listen_host, listen_port))
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    # control (any thread)
    def stall(self) -> None:
        """Stops forwarding in both directions; bytes wait in the proxy (and TCP buffers)."""
        self._loop.call_soon_threadsafe(self._flowing.clear)

    def resume(self) -> None:
        self._loop.call_soon_threadsafe(self._flowing.set)

    def cut(self) -> None:
        """Resets every open connection (both sides see the connection drop)."""
        self._run(self._cut_all())

    def close(self) -> None:
        self._run(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()

    # the proxy's own loop
    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=30)

    async def _start(self, host: str, port: int) -> asyncio.AbstractServer:
        self._flowing = asyncio.Event()
        self._flowing.set()
        return await asyncio.start_server(self._accept, host, port)

    async def _accept(self, client_reader, client_writer) -> None:
        self.num_connections += 1
        task = asyncio.current_task()
        self._connections.add(task)
        try:
            await self._forward(client_reader, client_writer)
        finally:
            self._connections.discard(task)

    async def _forward(self, client_reader, client_writer) -> None:
        try:
            target_reader, target_writer = await asyncio.open_connection(self.target_host,
                                                                         self.target_port)
        except OSError:
            _reset(client_writer)
            return
        self._writers |= {client_writer, target_writer}
        carried = [0]
        await asyncio.gather(self._pump(client_reader, target_writer, client_writer, carried),
                             self._pump(target_reader, client_writer, target_writer, carried),
                             return_exceptions=True)
        for writer in (client_writer, target_writer):
            self._writers.discard(writer)
            writer.close()

    async def _pump(self, reader, writer, other, carried: list[int]) -> None:
        """Copies reader -> writer chunk by chunk, applying the faults; on the end of either
        side closes both."""
        try:
            while data := await reader.read(CHUNK_BYTES):
                await self._flowing.wait()
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                carried[0] += len(data)
                if self.cut_after_bytes is not None and carried[0] > self.cut_after_bytes:
                    _reset(writer)
                    _reset(other)
                    return
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            if writer.can_write_eof():
                try:
                    writer.write_eof()
                except OSError:
                    pass

    async def _cut_all(self) -> None:
        for writer in list(self._writers):
            _reset(writer)

    async def _stop(self) -> None:
        """Stops accepting, resets every connection and waits for their tasks to end (so that
        none is left pending when the loop stops)."""
        self._server.close()
        await self._cut_all()
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Closes with RST (SO_LINGER 0), as a crashed or partitioned peer would look."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        except OSError:
            pass
    writer.transport.abort()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", type=int, required=True, help="port to listen on")
    parser.add_argument("--target", required=True, help="HOST:PORT to forward to")
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--stall-after-s", type=float, default=None,
                        help="stop forwarding after this long (until killed)")
    parser.add_argument("--cut-every-s", type=float, default=None,
                        help="reset every connection this often")
    args = parser.parse_args()
    proxy = FaultProxy(args.target, args.listen, "0.0.0.0")
    proxy.delay_s = args.delay_ms / 1000
    print(f"forwarding :{proxy.port} -> {args.target}", flush=True)
    started = time.monotonic()
    try:
        while True:
            time.sleep(args.cut_every_s or 1.0)
            if args.cut_every_s:
                proxy.cut()
            if args.stall_after_s is not None and time.monotonic() - started > args.stall_after_s:
                proxy.stall()
    except KeyboardInterrupt:
        proxy.close()


if __name__ == "__main__":
    main()
