"""Running a long-lived service: uvloop, signals that only set a flag, a settled heap."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import socket
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import uvloop

# Python's collector makes a full pass over every object it tracks now and then: about every
# 8 s under load here, over the 65-78k objects that importing FastAPI, pydantic, aio-pika and
# redis leaves behind, each pass stopping the event loop for 25-33 ms (bench/RESULTS.md). Those
# objects live as long as the process; frozen, they are never scanned again, and a full pass
# covers only the few thousand made since. (Young passes every 10,000 allocations instead of 700
# saved a few percent of CPU more, but the dispatcher's and the agent's memory then grew by 4-5
# kB/s under load for as long as it was watched, where with 700 it stays flat.)


log = logging.getLogger(__name__)


class StartupError(Exception):
    """The service cannot start for a reason its operator must fix, which the message names
    (a registry file that cannot be opened, no Docker engine): one line and exit code 1, not a
    traceback."""


MAX_PORT = 65535


def listen(host: str, port: int) -> list[socket.socket]:
    """Listening sockets on host:port, one per address `host` names, as asyncio's servers
    (uvicorn's, aiohttp's) open them; raises OSError where it cannot listen, ValueError for a
    port outside 0-65535 (getaddrinfo would take it modulo 65536: 65600 is port 64)."""
    if not 0 <= port <= MAX_PORT:
        raise ValueError(f"port {port} is not in 0-{MAX_PORT}")
    sockets: list[socket.socket] = []
    try:
        # `host or None`: an empty host is every interface, as for asyncio's servers.
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            # As asyncio's: a restart binds past its predecessor's connections in TIME_WAIT.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen()  # the port is ours from now on; connections wait in the backlog
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def settle_heap() -> None:
    """Call once the service's code and configuration are loaded: what is alive then lives as
    long as the process, so the collector stops scanning it (`gc.freeze`)."""
    gc.collect()
    gc.freeze()


def run_service(main: Callable[[asyncio.Event], Coroutine[Any, Any, None]]) -> None:
    """Run `main(stop)` on uvloop, after `settle_heap()`; SIGTERM and SIGINT set `stop` and
    `main` shuts down. A `StartupError` ends the process with its message and exit code 1."""

    async def wrapper() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    settle_heap()
    with startup_errors_reported():
        uvloop.run(wrapper())


@contextlib.contextmanager
def startup_errors_reported() -> Iterator[None]:
    """A `StartupError` raised inside ends the process with its message and exit code 1."""
    try:
        yield
    except StartupError as e:
        log.error("cannot start: %s", e)
        raise SystemExit(1) from None
