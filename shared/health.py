"""A tiny HTTP server for a queue-driven service: `/health` (the process is up) and `/ready`
(connected and consuming). For orchestrators and operators; the router never calls it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

from shared.runner import StartupError

StatusFn = Callable[[], dict[str, Any]]


def create_app(status: StatusFn, is_ready: Callable[[], bool]) -> web.Application:
    async def health(_: web.Request) -> web.Response:
        return _json({"status": "ok", **status()})

    async def ready(_: web.Request) -> web.Response:
        if is_ready():
            return _json({"status": "ready", **status()})
        return _json({"status": "not ready", **status()}, status=503)

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    return app


def _json(payload: dict[str, Any], status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(payload), status=status, content_type="application/json")


async def serve(
    app: web.Application, host: str, port: int, *, setting: str
) -> tuple[web.AppRunner, int]:
    """Start serving; returns the runner (to clean up) and the port bound (for port 0).

    An address it cannot listen on (taken, or not this host's) is a `StartupError` naming
    `setting`, the variable that chose the port: one line and exit code 1, not a traceback."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        reason = e.strerror or str(e)
        raise StartupError(
            f"cannot serve /health on {host}:{port}: {reason} (choose another {setting})"
        ) from None
    return runner, int(runner.addresses[0][1])
