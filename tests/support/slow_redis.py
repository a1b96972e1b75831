"""A TCP proxy in front of the machine's Redis that can hold back or swallow its replies."""

from __future__ import annotations

import asyncio

from tests.conftest import REDIS


class SlowRedis:
    """A TCP proxy to the machine's Redis that can hold back its replies: requests reach Redis
    at once, so a client that stops waiting leaves behind what Redis did for it."""

    def __init__(self) -> None:
        self.reply_delay = 0.0
        self.url = ""
        self._server: asyncio.Server | None = None
        self._clients: list[asyncio.StreamWriter] = []
        self._muted: set[asyncio.StreamWriter] = set()
        self._upstreams: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"redis://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/0"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in (*self._clients, *self._upstreams):
            writer.close()

    def swallow_replies(self) -> None:
        """Replies on the connections open now never reach their client."""
        self._muted.update(self._clients)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        redis_r, redis_w = await asyncio.open_connection(*REDIS)
        self._clients.append(client_w)
        self._upstreams.append(redis_w)
        await asyncio.gather(self._pipe(client_r, redis_w), self._pipe(redis_r, client_w, True))

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, replies: bool = False
    ) -> None:
        try:
            while data := await reader.read(65536):
                if replies and writer in self._muted:
                    continue
                if replies:
                    await asyncio.sleep(self.reply_delay)
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()
