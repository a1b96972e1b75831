"""Command line shared by `python -m fakes.vllm` and `python -m fakes.openai`.

Contract: `build_parser` defines the flags, `config_from_args` maps them to a
`FakeConfig`, and `run` serves an app until SIGINT/SIGTERM, printing
"<name> listening on http://host:port" once the socket is bound (so scripts
can wait for that line; with --port 0 it shows the port picked).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

from aiohttp import web

from fakes.core import FakeConfig
from fakes.server import serve


def build_parser(
    prog: str, *, port: int, models: str, api_key: str | None = None
) -> argparse.ArgumentParser:
    """Flags of one fake; `api_key` adds --api-key with that default."""
    parser = argparse.ArgumentParser(prog=prog, description=f"Fake upstream LLM server ({prog}).")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument(
        "--port", type=_port, default=port, help=f"bind port (default {port}; 0: any free port)"
    )
    parser.add_argument(
        "--models", default=models, help=f"comma-separated served models ({models})"
    )
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before the first byte")
    parser.add_argument("--tokens", type=int, default=16, help="completion tokens per choice")
    parser.add_argument("--token-rate", type=float, default=0.0, help="tokens/s (0 = instant)")
    parser.add_argument("--reply", default=None, help="fixed reply text (overrides --tokens)")
    parser.add_argument(
        "--echo", action="store_true", help="reply with the last message's text (overrides both)"
    )
    if api_key is not None:
        shown = api_key or "none: no key needed"
        parser.add_argument("--api-key", default=api_key, help=f"required Bearer key ({shown})")
    return parser


def _port(text: str) -> int:
    """A port for --port: out of range, the OS would take it modulo 65536 (65600 is 64)."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (0-65535; 0: any free port)")
    return port


def config_from_args(args: argparse.Namespace) -> FakeConfig:
    """The `FakeConfig` the parsed flags describe."""
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models:
        raise SystemExit("--models needs at least one model name")
    return FakeConfig(
        models=models,
        latency=args.latency,
        tokens=args.tokens,
        token_rate=args.token_rate,
        reply=args.reply,
        echo=args.echo,
        api_key=getattr(args, "api_key", None) or None,  # "" disables the check
    )


def run(app: web.Application, host: str, port: int, name: str) -> None:
    """Serve until interrupted, on uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a project dependency
        asyncio.run(_serve_forever(app, host, port, name))
    else:
        uvloop.run(_serve_forever(app, host, port, name))


async def _serve_forever(app: web.Application, host: str, port: int, name: str) -> None:
    try:
        runner, actual = await serve(app, host, port, shutdown_timeout=5.0)
    except OSError as e:  # a port in use: one line, as the services say it, not a traceback
        reason = e.strerror or str(e)
        message = f"{name}: cannot listen on {host}:{port}: {reason} (choose another --port)"
        print(message, file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):  # not on Windows
            loop.add_signal_handler(sig, stop.set)
    print(f"{name} listening on http://{host}:{actual}", flush=True, file=sys.stdout)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
