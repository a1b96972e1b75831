"""`python -m bench.floor api|dispatcher|agent`: the design's shape and nothing else.

The floor the router's c=1 latencies are judged against, measured on the same host in the same
rounds. The issue's targets were set from a bare prototype of this shape (api -> RabbitMQ ->
dispatcher -> RabbitMQ -> agent -> HTTP -> backend, the answer back over a reply queue), but
the host's speed moves every latency here by 2-3x from one session to the next. This is that
prototype, kept in the bench, so a run says how far the router is from it on the same machine.

Same durability as the router's default mode: durable queues, persistent messages, publisher
confirms on every publish, a job acked only once its next publish is confirmed, a durable reply
queue per api process (with `x-expires`) consumed with auto-ack. The same server and clients:
uvicorn on uvloop and httptools, aio-pika, aiohttp to the backend. Nothing else: no
validation, no authentication, no cache, no registry, no deadlines, retries or cancellation,
one message per chunk the backend sends. It is a measuring stick and not a router.

It is written plainly, the way the libraries' documentation shows: aio-pika's `publish` (its
three frames leave in three socket writes, where the router joins them), an ack per job at
once (the router holds them for up to 2 ms), one connection per process (the router keeps
publishing and consuming apart). So it is the design's shape without the router's features,
not the fastest possible code of that shape: under load the router beats it (bench/RESULTS.md).

`--redis-url` on the dispatcher adds the response cache in its bare shape (`floor+cache`;
`MICRO_FLOOR=1 python -m bench.micro` runs it beside the plain floor): a Redis GET of the
body's hash before each hand-off, and a `completed` message from the agent for each JSON
answer, written to Redis by the dispatcher (one message and one SET per answer: no batching,
single flight or checks).

The bench starts it (`Stack.start_floor`) in a namespace of its own, like the router's.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import aio_pika
import aiohttp
import orjson
import uvicorn
import uvloop
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from redis.asyncio import Redis

PREFETCH = 64  # jobs in flight per consumer: above the bench's highest concurrency per agent
REPLY_EXPIRES_MS = 60_000
CACHE_TTL = 3600  # seconds, as the router's default
REPLY_TIMEOUT = 30.0  # seconds a request waits for each reply message (then the client gets 500)
END = "end"  # the reply message that closes a stream
JSON_HEADERS = [(b"content-type", b"application/json")]
SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def jobs_queue(namespace: str) -> str:
    return f"{namespace}.jobs"


def agent_queue(namespace: str, model: str) -> str:
    return f"{namespace}.agent.{model}"


def completed_queue(namespace: str) -> str:
    return f"{namespace}.completed"


def persistent(body: bytes, **properties: Any) -> aio_pika.Message:
    return aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, **properties)


async def open_channel(url: str, prefetch: int = PREFETCH) -> AbstractChannel:
    connection = await aio_pika.connect_robust(url)
    channel = await connection.channel()  # publisher confirms: on (aio-pika's default)
    await channel.set_qos(prefetch_count=prefetch)
    return channel


# --- api ----------------------------------------------------------------------------------------
class FloorApi:
    """POST /v1/chat/completions -> a job; its reply (JSON, or chunks then `end`) -> the client."""

    def __init__(self, url: str, namespace: str) -> None:
        self.url = url
        self.namespace = namespace
        self.reply_queue = f"{namespace}.reply.{uuid.uuid4().hex[:12]}"
        self.waiting: dict[str, asyncio.Queue[AbstractIncomingMessage]] = {}
        self.channel: AbstractChannel | None = None

    async def start(self) -> None:
        self.channel = await open_channel(self.url)
        await self.channel.declare_queue(jobs_queue(self.namespace), durable=True)
        replies = await self.channel.declare_queue(
            self.reply_queue, durable=True, arguments={"x-expires": REPLY_EXPIRES_MS}
        )
        await replies.consume(self.on_reply, no_ack=True)

    async def on_reply(self, message: AbstractIncomingMessage) -> None:
        waiter = self.waiting.get(message.correlation_id or "")
        if waiter is not None:
            waiter.put_nowait(message)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.lifespan(receive, send)
        elif scope["type"] == "http" and scope["method"] == "POST":
            await self.complete(receive, send)
        elif scope["type"] == "http":  # GET /health: the bench waits for it
            await send({"type": "http.response.start", "status": 200, "headers": JSON_HEADERS})
            await send({"type": "http.response.body", "body": b"{}"})

    async def lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            event = await receive()
            if event["type"] == "lifespan.startup":
                await self.start()
                await send({"type": "lifespan.startup.complete"})
            elif event["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def complete(self, receive: Receive, send: Send) -> None:
        body = b""
        while True:
            event = await receive()
            body += event.get("body", b"")
            if not event.get("more_body"):
                break
        request = orjson.loads(body)
        stream = bool(request.get("stream"))
        request_id = uuid.uuid4().hex
        replies: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self.waiting[request_id] = replies
        assert self.channel is not None
        try:
            job = persistent(
                body,
                correlation_id=request_id,
                reply_to=self.reply_queue,
                headers={"model": request["model"], "stream": stream},
            )
            await self.channel.default_exchange.publish(job, jobs_queue(self.namespace))
            async with asyncio.timeout(REPLY_TIMEOUT):
                first = await replies.get()
            if not stream:
                status = int(first.headers.get("status", 200))  # type: ignore[arg-type]
                start = {"type": "http.response.start", "status": status, "headers": JSON_HEADERS}
                await send(start)
                await send({"type": "http.response.body", "body": first.body})
                return
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            message = first
            while message.type != END:
                await send({"type": "http.response.body", "body": message.body, "more_body": True})
                async with asyncio.timeout(REPLY_TIMEOUT):
                    message = await replies.get()
            await send({"type": "http.response.body", "body": b""})
        finally:
            del self.waiting[request_id]


# --- dispatcher ---------------------------------------------------------------------------------
async def run_dispatcher(url: str, namespace: str, redis_url: str | None = None) -> None:
    """Every job on to its model's agent queue; acked once that publish is confirmed.

    With `redis_url`, the response cache reduced to its bare shape: a GET of the body's hash
    before the hand-off (a JSON hit is answered from it), and a SET from each completed event.
    """
    channel = await open_channel(url)
    jobs = await channel.declare_queue(jobs_queue(namespace), durable=True)
    declared: set[str] = set()
    redis = Redis.from_url(redis_url) if redis_url else None

    async def on_job(message: AbstractIncomingMessage) -> None:
        headers = dict(message.headers)
        if redis is not None:
            key = f"{namespace}:{hashlib.sha256(message.body).hexdigest()}"
            cached = await redis.get(key)  # bytes: the client does not decode
            assert cached is None or isinstance(cached, bytes)
            if cached is not None and not headers.get("stream"):  # no SSE replay here
                answer = persistent(
                    cached, correlation_id=message.correlation_id, headers={"status": 200}
                )
                await channel.default_exchange.publish(answer, str(message.reply_to))
                await message.ack()
                return
            headers["cache_key"] = key
        queue = agent_queue(namespace, str(headers["model"]))
        if queue not in declared:
            await channel.declare_queue(queue, durable=True)
            declared.add(queue)
        job = persistent(
            message.body,
            correlation_id=message.correlation_id,
            reply_to=message.reply_to,
            headers=headers,
        )
        await channel.default_exchange.publish(job, queue)
        await message.ack()

    async def on_completed(message: AbstractIncomingMessage) -> None:
        assert redis is not None
        await redis.set(str(message.headers["cache_key"]), message.body, ex=CACHE_TTL)

    if redis is not None:
        completed = await channel.declare_queue(completed_queue(namespace), durable=True)
        await completed.consume(on_completed, no_ack=True)
    await jobs.consume(on_job)
    await asyncio.Future()  # until stopped


# --- agent --------------------------------------------------------------------------------------
async def run_agent(url: str, namespace: str, model: str, backend: str) -> None:
    """Every job of `model` to the backend as it is; the answer (or each chunk read) back."""
    channel = await open_channel(url)
    jobs = await channel.declare_queue(agent_queue(namespace, model), durable=True)
    await channel.declare_queue(completed_queue(namespace), durable=True)
    session = aiohttp.ClientSession()
    endpoint = f"{backend}/v1/chat/completions"
    headers = {"content-type": "application/json"}

    async def reply(job: AbstractIncomingMessage, body: bytes, **properties: Any) -> None:
        message = persistent(body, correlation_id=job.correlation_id, **properties)
        assert job.reply_to is not None
        await channel.default_exchange.publish(message, job.reply_to)

    async def on_job(job: AbstractIncomingMessage) -> None:
        async with session.post(endpoint, data=job.body, headers=headers) as r:
            if not job.headers.get("stream"):
                answer = await r.read()
                await reply(job, answer, headers={"status": r.status})
                key = job.headers.get("cache_key")
                if key is not None and r.status == 200:  # for the cache writer
                    event = persistent(answer, headers={"cache_key": key})
                    await channel.default_exchange.publish(event, completed_queue(namespace))
            else:
                async for chunk in r.content.iter_any():
                    await reply(job, chunk)
                await reply(job, b"", type=END)
        await job.ack()

    await jobs.consume(on_job)
    await asyncio.Future()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__)
    parser.add_argument("role", choices=("api", "dispatcher", "agent"))
    parser.add_argument("--rabbitmq-url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--port", type=int, default=0, help="api: where to listen")
    parser.add_argument("--model", help="agent: the model it serves (as the backend names it)")
    parser.add_argument("--backend", help="agent: the backend's URL, without /v1")
    parser.add_argument("--redis-url", help="dispatcher: the bare cache's Redis (none: no cache)")
    args = parser.parse_args()
    if args.role == "api":
        app = FloorApi(args.rabbitmq_url, args.namespace)
        uvicorn.run(
            app,
            host="127.0.0.1",
            port=args.port,
            loop="uvloop",
            http="httptools",
            lifespan="on",
            log_level="warning",
            access_log=False,
        )
    elif args.role == "dispatcher":
        uvloop.run(run_dispatcher(args.rabbitmq_url, args.namespace, args.redis_url))
    else:
        if not args.model or not args.backend:
            parser.error("agent needs --model and --backend")
        uvloop.run(run_agent(args.rabbitmq_url, args.namespace, args.model, args.backend))


if __name__ == "__main__":
    main()
