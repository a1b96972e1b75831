"""`python -m bench.clients`: the agent's upstream client, httpx (aiohttp transport) vs raw aiohttp.

The numbers behind services/agent/backend.py's choice (issue 9: "httpx unless the agent's hot
path needs raw aiohttp behind a small adapter"). One process makes the same calls to the
instant fake vLLM both ways, one at a time, and reports its own CPU (utime+stime) per call:
the fake's CPU is not counted, so the figure is the client's cost alone. `CLIENTS_CALLS`
(default 3000) sets the calls per measurement.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable

import aiohttp
import httpx
import orjson
import uvloop
from httpx_aiohttp import AiohttpTransport

from bench.config import BenchConfig
from bench.stack import INSTANT_MODEL, Stack
from services.agent.backend import VllmClient


def body(stream: bool) -> bytes:
    messages = [{"role": "user", "content": "hi"}]
    return orjson.dumps(
        {"model": INSTANT_MODEL, "messages": messages, "max_tokens": 16, "stream": stream}
    )


async def cpu_us_per_call(call: Callable[[], Awaitable[object]], calls: int) -> float:
    for _ in range(calls // 10):  # warm the pool
        await call()
    started = time.process_time()
    for _ in range(calls):
        await call()
    return (time.process_time() - started) / calls * 1e6


async def main() -> None:
    calls = int(os.environ.get("CLIENTS_CALLS", "3000"))
    stack = Stack(BenchConfig.from_env(), f"clients-{time.strftime('%H%M%S')}")
    try:
        root = await stack.start_fake(INSTANT_MODEL)
        url = f"{root}/v1/chat/completions"
        json_headers = {"content-type": "application/json", "accept": "application/json"}
        sse_headers = {"content-type": "application/json", "accept": "text/event-stream"}
        json_body, sse_body = body(False), body(True)
        via_httpx = httpx.AsyncClient(transport=AiohttpTransport(), timeout=None)
        raw = VllmClient(root)

        async def httpx_json() -> object:
            return (await via_httpx.post(url, content=json_body, headers=json_headers)).content

        async def httpx_stream() -> object:
            async with via_httpx.stream("POST", url, content=sse_body, headers=sse_headers) as r:
                return [chunk async for chunk in r.aiter_bytes()]

        async def raw_json() -> object:
            return await raw.complete(json_body)

        async def raw_stream() -> object:
            async with raw.stream(sse_body) as r:
                return [chunk async for chunk in r.chunks()]

        print(f"CPU of the client process per call, {calls} calls each (us)")
        for name, call in (
            ("httpx + AiohttpTransport, JSON", httpx_json),
            ("raw aiohttp (VllmClient), JSON", raw_json),
            ("httpx + AiohttpTransport, stream", httpx_stream),
            ("raw aiohttp (VllmClient), stream", raw_stream),
        ):
            print(f"  {name:34} {await cpu_us_per_call(call, calls):7.1f}", flush=True)
        await via_httpx.aclose()
        await raw.aclose()
    except aiohttp.ClientError as e:
        raise SystemExit(f"bench.clients: {e!r}") from e
    finally:
        stack.stop()


if __name__ == "__main__":
    uvloop.run(main())
