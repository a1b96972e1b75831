"""The generic aiohttp server behind both fakes.

Contract: `build_app(config, flavour)` serves
  POST /v1/chat/completions  JSON or SSE, paced, faults applied, stats kept
  GET  /v1/models            the flavour's list
  POST /_fake/script         queue fault steps (see fakes.faults)
  POST /_fake/reset          clear the script and the stats
  GET  /_fake/stats          fakes.stats.Stats.snapshot()
Abort detection needs handler cancellation on disconnect, which `serve` and
`running` turn on; a plain `web.run_app` must pass `handler_cancellation=True`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import orjson
from aiohttp import hdrs, web

from fakes.core import (
    ApiError,
    Completion,
    Event,
    FakeConfig,
    JsonObj,
    pacing_for,
    parse_body,
    parse_chat_request,
    plan_completion,
)
from fakes.faults import FaultScript, FaultStep, parse_script
from fakes.flavour import JSON, SSE, Flavour, Reply
from fakes.stats import Stats

MAX_BODY = 64 * 2**20  # long chat histories exceed aiohttp's 1 MiB default
DEFAULT_FAILURE = "The engine failed while generating."  # an `error_after_chunks` step's
_NORMAL = FaultStep()


@dataclass(slots=True)
class FakeState:
    """Everything one fake app holds; tests may read it via `app[STATE]`."""

    config: FakeConfig
    flavour: Flavour
    script: FaultScript = field(default_factory=FaultScript)
    stats: Stats = field(default_factory=Stats)


STATE = web.AppKey("fakes_state", FakeState)


def build_app(config: FakeConfig, flavour: Flavour) -> web.Application:
    """An app serving `flavour`'s wire format with `config`'s defaults."""
    app = web.Application(client_max_size=MAX_BODY)
    app[STATE] = FakeState(config, flavour)
    app.add_routes(
        [
            web.post("/v1/chat/completions", chat_completions),
            web.get("/v1/models", list_models),
            web.post("/_fake/script", post_script),
            web.post("/_fake/reset", post_reset),
            web.get("/_fake/stats", get_stats),
            *flavour.extra_routes(),
        ]
    )
    return app


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """Serve one chat request; a cancelled handler means the client left."""
    state = request.app[STATE]
    exchange = _ChatExchange(request, state)
    state.stats.begin(request.headers.get(hdrs.AUTHORIZATION))
    try:
        return await exchange.run()
    except asyncio.CancelledError:
        state.stats.record_abort(exchange.completion_id)
        raise
    finally:
        state.stats.end()


class _ChatExchange:
    """One chat request from arrival to the last byte."""

    def __init__(self, request: web.Request, state: FakeState) -> None:
        self.request = request
        self.state = state
        self.flavour = state.flavour
        self.started = time.monotonic()
        self.completion_id: str | None = None
        self.step = _NORMAL

    async def run(self) -> web.StreamResponse:
        denied = self.flavour.check_auth(self.request)
        if denied is not None:
            return self._reply(denied)
        self.step = self.state.script.pop() or _NORMAL
        parsed = self._parse(await self.request.read())
        if self.step.delay > 0:
            await asyncio.sleep(self.step.delay)
        if self.step.status is not None:
            body = parsed if isinstance(parsed, dict) else None
            return self._reply(self._scripted(self.step, body))
        try:
            if isinstance(parsed, ApiError):
                raise parsed
            return await self._generate(parsed)
        except ApiError as exc:
            return self._reply(self.flavour.error(exc))

    def _parse(self, raw: bytes) -> JsonObj | ApiError:
        # Bodies are recorded even when a scripted fault answers the request,
        # so tests can check what the router sent upstream.
        try:
            body = parse_body(raw)
        except ApiError as exc:
            return exc
        self.state.stats.record_body(body)
        return body

    async def _generate(self, body: JsonObj) -> web.StreamResponse:
        config, flavour = self.state.config, self.flavour
        chat = parse_chat_request(
            body,
            config.models,
            model_required=flavour.model_required,
            strict_stream_options=flavour.strict_stream_options,
            usage_by_default=flavour.usage_by_default,
            context_limit=config.max_model_len if flavour.enforces_context else None,
            known_fields=flavour.known_fields,
        )
        pacing = pacing_for(config, self.request.headers)
        self.completion_id = flavour.completion_id(self.request)
        completion = plan_completion(
            chat,
            config,
            pacing,
            completion_id=self.completion_id,
            created=int(time.time()),
            new_tool_call_id=flavour.tool_call_id,
            format_arguments=flavour.format_arguments,
        )
        if pacing.latency > 0:
            await asyncio.sleep(pacing.latency)
        if not chat.stream and self.step.cut_after_chunks is not None:
            await self._drop_connection()
            self.state.stats.record_cut()
            return web.Response(status=200)  # never reaches the client
        if chat.stream:
            return await self._stream(completion, pacing.token_rate)
        return self._reply(Reply(200, flavour.json_body(completion)))

    def _scripted(self, step: FaultStep, body: JsonObj | None) -> Reply:
        model = body.get("model") if body is not None else None
        reply = self.flavour.status_error(
            step.status or 500, model if isinstance(model, str) else None
        )
        if step.body is None:
            return reply
        if isinstance(step.body, str):
            return Reply(
                reply.status, step.body.encode(), "text/plain; charset=utf-8", reply.headers
            )
        return Reply(reply.status, orjson.dumps(step.body), JSON, reply.headers)

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        # Later sources win: flavour defaults, the reply's own, then the script's.
        headers = self.flavour.response_headers(self.started)
        if extra:
            headers.update(extra)
        headers.update(self.step.headers)
        return headers

    def _reply(self, reply: Reply) -> web.Response:
        headers = self._headers(dict(reply.headers))
        if not any(k.lower() == "content-type" for k in headers):
            headers[hdrs.CONTENT_TYPE] = reply.content_type
        self.state.stats.record_completed()
        return web.Response(status=reply.status, body=reply.body, headers=headers)

    async def _stream(self, completion: Completion, token_rate: float) -> web.StreamResponse:
        response = web.StreamResponse(status=200, headers=self._headers({hdrs.CONTENT_TYPE: SSE}))
        events = self.flavour.stream_events(completion)
        cut = self.step.cut_after_chunks
        if cut is not None:
            events = events[:cut]
        failed_after = self.step.error_after_chunks
        if failed_after is not None:
            message = self.step.body if isinstance(self.step.body, str) else DEFAULT_FAILURE
            # Before the stream's own end: the error is what ends it.
            failed_after = min(failed_after, len(events) - 1)
            last = events[failed_after - 1][0] if failed_after else 0
            events = events[:failed_after]
            events += [(last, payload) for payload in self.flavour.stream_failure(message)]
        try:
            await response.prepare(self.request)
            await send_paced(response, events, token_rate)
        except ConnectionError:
            # The client left between two events (seen on write, before the
            # loop reported the lost connection).
            self.state.stats.record_abort(self.completion_id)
            return response
        if cut is not None:
            await self._drop_connection()
            self.state.stats.record_cut()
            return response
        with contextlib.suppress(ConnectionError):
            await response.write_eof()  # every event incl. [DONE] is out already
        self.state.stats.record_completed()
        return response

    async def _drop_connection(self) -> None:
        """Close the TCP connection without finishing the HTTP response."""
        transport = self.request.transport
        if transport is None:
            return
        # abort() discards unsent bytes: let the events we wrote reach the socket.
        for _ in range(100):
            if transport.get_write_buffer_size() == 0:
                break
            await asyncio.sleep(0.01)
        transport.abort()


async def send_paced(response: web.StreamResponse, events: list[Event], token_rate: float) -> None:
    """Write events; step k goes out at start + k / token_rate (all at once if 0)."""
    if token_rate <= 0:
        # Still one SSE event per token, but one write: fastest for benchmarks.
        await response.write(b"".join(payload for _, payload in events))
        return
    loop = asyncio.get_running_loop()
    start = loop.time()
    interval = 1.0 / token_rate
    i = 0
    while i < len(events):
        step = events[i][0]
        j = i
        while j < len(events) and events[j][0] == step:
            j += 1
        delay = start + step * interval - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        await response.write(b"".join(payload for _, payload in events[i:j]))
        i = j


async def list_models(request: web.Request) -> web.Response:
    """`GET /v1/models` in the flavour's shape (behind the flavour's auth)."""
    flavour = request.app[STATE].flavour
    started = time.monotonic()
    reply = flavour.check_auth(request) or Reply(200, flavour.models_body())
    headers = {**flavour.response_headers(started), **reply.headers}
    headers[hdrs.CONTENT_TYPE] = reply.content_type
    return web.Response(status=reply.status, body=reply.body, headers=headers)


async def post_script(request: web.Request) -> web.Response:
    """Queue fault steps; 400 with {"error": ...} when a step is malformed."""
    script = request.app[STATE].script
    try:
        steps = parse_script(orjson.loads(await request.read()))
    except (orjson.JSONDecodeError, ValueError) as exc:
        return _json({"error": str(exc)}, 400)
    script.extend(steps)
    return _json({"queued": len(script)})


async def post_reset(request: web.Request) -> web.Response:
    """Forget the script and the stats."""
    state = request.app[STATE]
    state.script.clear()
    state.stats.reset()
    return _json({"ok": True})


async def get_stats(request: web.Request) -> web.Response:
    return _json(request.app[STATE].stats.snapshot())


def _json(obj: object, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(obj), content_type=JSON)


async def serve(
    app: web.Application, host: str = "127.0.0.1", port: int = 0, *, shutdown_timeout: float = 1.0
) -> tuple[web.AppRunner, int]:
    """Start `app` on host:port (0 = any free port); returns the runner and the port."""
    runner = web.AppRunner(
        app, handler_cancellation=True, access_log=None, shutdown_timeout=shutdown_timeout
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner, int(runner.addresses[0][1])


@contextlib.asynccontextmanager
async def running(
    app: web.Application, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[str]:
    """Serve `app` for the duration of the block; yields its base URL (no /v1)."""
    runner, actual = await serve(app, host, port)
    try:
        yield f"http://{host}:{actual}"
    finally:
        await runner.cleanup()
