"""An in-process inference server on loopback for the agent's unit tests.

The agent calls its server with raw aiohttp (services/agent/backend.py), which has no mock
transport: tests run a real `aiohttp.web` server on 127.0.0.1 whose every request goes to a
test-supplied route. The server cancels a handler whose client went away, so a route can
observe that the agent closed the connection (which is how vLLM learns of an abort).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.test_utils import TestServer

Route = Callable[[web.Request], Awaitable[web.StreamResponse]]


class UpstreamServer:
    """`url` answers every request with `route(request)`, once `start()` returned."""

    def __init__(self, route: Route) -> None:
        self.route = route
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._server = TestServer(app, host="127.0.0.1", handler_cancellation=True)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        return await self.route(request)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.port}/v1"

    async def start(self) -> UpstreamServer:
        await self._server.start_server()
        return self

    async def close(self) -> None:
        await self._server.close()


def closed_port_url() -> str:
    """A loopback URL nothing listens on (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def answer(status: int, body: bytes) -> Route:
    async def route(_: web.Request) -> web.StreamResponse:
        return web.Response(status=status, body=body, content_type="application/json")

    return route


def sse(*parts: bytes, fail: bool = False, hang: asyncio.Event | None = None) -> Route:
    """Write `parts` as an event stream; then wait until the client leaves (`hang`, set when
    it did), and/or break the connection off mid-body (`fail`)."""

    async def route(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for part in parts:
            await response.write(part)
        if hang is not None:
            try:
                await asyncio.Event().wait()
            finally:
                hang.set()  # the agent closed the connection
        if fail:
            assert request.transport is not None
            request.transport.abort()  # a reset after output
        return response

    return route


async def drop(request: web.Request) -> web.StreamResponse:
    """Close the connection before any answer (a server that died on the request)."""
    assert request.transport is not None
    request.transport.abort()
    return web.Response()
