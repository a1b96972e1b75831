"""A TCP fault proxy to put between a service and the broker, Redis or an inference server.

It runs its own event loop in a daemon thread, so it keeps forwarding while a test blocks (on a
subprocess, a `wait_http`) and never depends on the test's loop. The knobs are plain attributes
read on every chunk, so a test flips them at any moment:

- `latency`: seconds added before each forwarded chunk, both ways;
- `blackhole`: hold every byte (connections stay open and silent, new ones are accepted and
  hang): what a frozen or partitioned peer looks like;
- `refuse`: new connections are reset at once (a port nobody listens on);
- `close_after`: forward this many bytes downstream on each new connection, then drop it
  (a peer dying mid-answer);
- `reset_all()`: send a TCP RST on every open connection now; `reset(n)` on the n-th
  connection opened (from 0), if it is still open: one of a service's two broker connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from dataclasses import dataclass, field


@dataclass(eq=False)  # identity: links live in a set
class _Link:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    sent_down: int = 0
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


def _rst(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0), not a polite FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultProxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.latency = 0.0
        self.blackhole = False
        self.refuse = False
        self.close_after: int | None = None
        self.port = 0
        self.connections_seen = 0
        self._links: set[_Link] = set()
        self._opened: list[_Link] = []  # every link, in the order they were accepted
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)
        return self

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    def heal(self) -> None:
        """Back to a transparent pipe (open connections keep going)."""
        self.latency = 0.0
        self.blackhole = False
        self.refuse = False
        self.close_after = None

    def reset_all(self) -> None:
        asyncio.run_coroutine_threadsafe(self._reset_all(), self._loop).result(10)

    async def _reset_all(self) -> None:
        for link in list(self._links):
            self._drop(link)

    def reset(self, n: int) -> None:
        async def reset_one() -> None:
            if n < len(self._opened) and self._opened[n] in self._links:
                self._drop(self._opened[n])

        asyncio.run_coroutine_threadsafe(reset_one(), self._loop).result(10)

    def close(self) -> None:
        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            await self._reset_all()

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    # --- forwarding ---------------------------------------------------------------------------
    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections_seen += 1
        if self.refuse:
            _rst(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            _rst(writer)
            return
        link = _Link(writer, up_writer)
        self._links.add(link)
        self._opened.append(link)
        link.tasks = [
            asyncio.create_task(self._pipe(reader, up_writer, link, down=False)),
            asyncio.create_task(self._pipe(up_reader, writer, link, down=True)),
        ]
        await asyncio.gather(*link.tasks, return_exceptions=True)
        self._links.discard(link)
        for end in (writer, up_writer):
            with contextlib.suppress(OSError, RuntimeError):
                end.close()

    async def _pipe(
        self,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        link: _Link,
        *,
        down: bool,
    ) -> None:
        limit = self.close_after
        try:
            while True:
                data = await src.read(65536)
                if not data:
                    break
                # The knob is flipped from the test's thread: poll it (an Event is per loop).
                while self.blackhole:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
                if self.latency > 0:
                    await asyncio.sleep(self.latency)
                if down and limit is not None:
                    room = limit - link.sent_down
                    if room < len(data):
                        dst.write(data[: max(room, 0)])
                        with contextlib.suppress(OSError):
                            await dst.drain()
                        self._drop(link)
                        return
                    link.sent_down += len(data)
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.IncompleteReadError):
            self._drop(link)
            return
        # One side finished cleanly: pass the FIN on.
        with contextlib.suppress(OSError, RuntimeError):
            if dst.can_write_eof():
                dst.write_eof()

    def _drop(self, link: _Link) -> None:
        _rst(link.client)
        _rst(link.upstream)
        self._links.discard(link)
