"""uvicorn's server, with the API's own first step of a shutdown.

On SIGTERM uvicorn stops accepting connections and waits for the open ones to finish. A request
still waiting for its answer would hold its connection until uvicorn's own deadline, and then be
cut off: its client saw the connection drop, and its job ran on for nobody. Here such requests
get `DRAIN_TIMEOUT` to be answered; those still waiting then end with a 503 (an SDK retries it,
through a load balancer on another API) and their jobs are cancelled, so the connections close
and the process exits on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import signal
import socket
import threading
from collections.abc import Callable, Iterator

import uvicorn

from shared.errors import RouterError, ServiceUnavailableError
from shared.runner import StartupError, listen

log = logging.getLogger(__name__)

# After the drain, how long the 503s may take to reach their clients before uvicorn cancels.
WRITE_GRACE = 5.0
# What uvicorn logs, as an ERROR, for a response the app left unfinished.
UNFINISHED_RESPONSE = "ASGI callable returned without completing response."


class DroppedStreamFilter(logging.Filter):
    """Drops uvicorn's ERROR for an unfinished response: the API leaves one unfinished only on
    purpose, for a stream whose client stopped reading (dropped at its deadline:
    `services.api.sse`), and logs that itself as the warning it is. As an ERROR, each such
    client paged whoever alerts on errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != UNFINISHED_RESPONSE


def listening_sockets(host: str, port: int) -> list[socket.socket]:
    """Listen on host:port as uvicorn would (a socket per address `host` names), before the API
    connects to anything: uvicorn binds only after its startup, so a port in use ended the API
    with exit code 3 and its own log line, once it had joined the broker.

    An address it cannot listen on is a `StartupError` naming the variable to change."""
    try:
        return listen(host, port)
    except OSError as e:
        setting = "API_PORT" if e.errno in (errno.EADDRINUSE, errno.EACCES) else "API_HOST"
        reason = e.strerror or str(e)
        raise StartupError(
            f"cannot serve the API on {host}:{port}: {reason} (choose another {setting})"
        ) from None


def stopping_error() -> RouterError:
    return ServiceUnavailableError(
        "The API is stopping; retry the request.",
        code="api_stopping",
        headers={"retry-after": "1"},
    )


class DrainingServer(uvicorn.Server):
    """`end_waiting(error)` ends the requests still waiting, `drain_timeout` s after shutdown
    began, and returns how many there were."""

    def __init__(
        self,
        config: uvicorn.Config,
        *,
        drain_timeout: float,
        end_waiting: Callable[[Callable[[], RouterError]], int],
    ) -> None:
        super().__init__(config)
        self.drain_timeout = drain_timeout
        self.end_waiting = end_waiting

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """As uvicorn's, but without raising the caught signal again once shut down: uvicorn
        does, so a graceful stop ended by that signal (exit -15, 143 in Docker) or, for
        SIGINT, with a KeyboardInterrupt traceback. Stopped so, the API exits 0, as the
        dispatcher and the agent do."""
        if threading.current_thread() is not threading.main_thread():
            yield  # signals reach the main thread only
            return
        stops = (signal.SIGINT, signal.SIGTERM)
        before = {sig: signal.signal(sig, self.handle_exit) for sig in stops}
        try:
            yield
        finally:
            for sig, handler in before.items():
                signal.signal(sig, handler)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        drain = asyncio.create_task(self._end_waiting_later())
        try:
            await super().shutdown(sockets)
        finally:
            drain.cancel()

    async def _end_waiting_later(self) -> None:
        await asyncio.sleep(self.drain_timeout)
        ended = self.end_waiting(stopping_error)
        if ended:
            log.info("stopping: %d requests still waiting ended with 503 api_stopping", ended)
