"""Producing replies: one final message, or a stream of coalesced chunk messages and an end.

Used alike by the dispatcher (dummy, cache hits, providers) and agents. The first chunk of a
stream goes out at once (time to first token is what users feel); later chunks are gathered for
a short window and sent as one message, so a fast stream does not cost a message per token.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence

from shared.amqp import Broker
from shared.completed import CompletedBatcher
from shared.errors import (
    AnswerTooLargeError,
    BrokerUnavailableError,
    InternalError,
    ReplyQueueGoneError,
    RouterError,
    ServiceUnavailableError,
    UnroutableError,
    to_openai_error,
)
from shared.http_headers import CACHE as CACHE_HEADER
from shared.messages import (
    MAX_CACHED_BODY,
    MAX_REPLY_BYTES,
    Completed,
    Envelope,
    Job,
    Reply,
    ReplyKind,
    decode_job,
    encode_reply,
)
from shared.topology import Topology

log = logging.getLogger(__name__)

Publish = Callable[[Job, Reply], Awaitable[None]]


def new_attempt() -> str:
    return uuid.uuid4().hex[:12]


# Seconds between tries of a reply that found no queue, before the queue counts as gone (~2 s).
UNROUTABLE_RETRIES = (0.05, 0.15, 0.3, 0.5, 1.0)
# Tries of a stream's later message when the publishing connection is lost (see `__call__`).
MID_STREAM_TRIES = 3
STREAM_KINDS = frozenset((ReplyKind.CHUNK, ReplyKind.END, ReplyKind.ERROR))


def confirm_timeout(broker: Broker, job: Job) -> float:
    """How long a publish done for a job (its hand-off, its answer) waits for the confirm.

    The job's own deadline, not `publish_timeout`: a memory alarm blocks a publishing
    connection without closing it, and what was sent is routed once the alarm clears. A
    handler that gave up sooner would requeue a job whose hand-off or answer is on its way, and
    the job would run twice. A lost connection still fails the wait at once.
    """
    return max(broker.publish_timeout, job.remaining(time.time()))


def with_cache_header(job: Job, reply: Reply) -> Reply:
    """The first reply of a job carries the dispatcher's cache verdict as `x-cache`."""
    if job.cache_status is None or reply.seq != 0 or CACHE_HEADER in reply.http_headers:
        return reply
    headers = {**reply.http_headers, CACHE_HEADER: job.cache_status}
    return dataclasses.replace(reply, http_headers=headers)


class ReplyPublisher:
    """Publishes replies to a job's `reply_to` queue, confirmed.

    A reply queue that is gone (its API process died) is logged and skipped: nobody waits.
    Final answers are persistent in durable modes; stream chunks never are. The first reply
    carries the job's cache verdict (`x-cache`). The answer to a job that carries a cache key
    also reaches the cache writer, so producers need no code of their own for it: once the
    reply is out, a `job.completed` event (the whole answer, or only the status of an answer
    that is not whole) joins the process's next batch of them (`shared.completed`).

    No reply body past `max_body` is published: the broker would refuse it by closing the
    channel, failing every other reply in flight on it. A final answer that large is sent as
    a 502 `answer_too_large` instead; a larger chunk (`StreamWriter` keeps its messages under
    the limit, so only one event that large) raises AnswerTooLargeError.
    """

    def __init__(
        self,
        broker: Broker,
        *,
        persistent: bool,
        completed: CompletedBatcher | None = None,
        replies_exchange: str = "",
        unroutable_retries: tuple[float, ...] = UNROUTABLE_RETRIES,
        max_body: int = MAX_REPLY_BYTES,
    ) -> None:
        self._broker = broker
        self.max_body = max_body
        self._unroutable_retries = unroutable_retries
        self._persistent = persistent
        self._completed = completed
        self._replies_exchange = replies_exchange

    @classmethod
    def for_topology(
        cls, broker: Broker, topology: Topology, *, max_body: int = MAX_REPLY_BYTES
    ) -> ReplyPublisher:
        """Replies through the replies exchange, feeding the cache writer."""

        async def publish_completed(env: Envelope) -> None:
            await broker.publish(env, "", exchange=topology.completed_exchange, mandatory=False)

        return cls(
            broker,
            persistent=topology.is_persistent,
            completed=CompletedBatcher(publish_completed),
            replies_exchange=topology.replies_exchange,
            max_body=max_body,
        )

    async def __call__(self, job: Job, reply: Reply) -> None:
        if len(reply.body) > self.max_body:
            reply = self._too_large(job, reply)
        reply = with_cache_header(job, reply)
        persistent = self._persistent and reply.kind in (ReplyKind.FINAL, ReplyKind.ERROR)
        env = encode_reply(reply)
        # Mid-stream the client holds part of the answer, and the job will not run again: a
        # message the broker did not take because the publishing connection dropped (it is
        # back within milliseconds) goes again once it is, under the same number, which the
        # API drops if the first copy did arrive. Given up at once, the stream's error could
        # not be published either, and its client waited out its idle timeout.
        tries = MID_STREAM_TRIES if reply.seq > 0 and reply.kind in STREAM_KINDS else 1
        for tries_left in range(tries - 1, -1, -1):
            try:
                await self._send(job, env, persistent=persistent)
                break
            except BrokerUnavailableError as e:
                # Not a confirm that timed out (a memory alarm): the broker has the message,
                # or will once the alarm clears, and publishing it again would only wait again.
                lost = not isinstance(e.__cause__, TimeoutError)
                wait = self._broker.publish_timeout
                if not (tries_left and lost and await self._broker.publishing(wait)):
                    raise
            log.info("reply %d of %s goes again: the broker is back", reply.seq, job.request_id)
        if job.cache_key is not None and reply.kind in (ReplyKind.FINAL, ReplyKind.ERROR):
            self._add_completed(job.cache_key, job.request_id, reply)

    async def _send(self, job: Job, env: Envelope, *, persistent: bool) -> None:
        for delay in (*self._unroutable_retries, None):
            try:
                await self._broker.publish(
                    env,
                    job.reply_to,
                    exchange=self._replies_exchange,
                    persistent=persistent,
                    timeout=confirm_timeout(self._broker, job),
                )
                break
            except UnroutableError as e:
                if delay is None:
                    raise ReplyQueueGoneError(f"reply queue of {job.request_id} is gone") from e
                # A reply queue being re-declared (after a deletion) is bound to the replies
                # exchange a moment after it exists again: unroutable for that moment.
                await asyncio.sleep(delay)

    def _too_large(self, job: Job, reply: Reply) -> Reply:
        """The 502 sent in place of a final answer past `max_body`, with the answer's headers
        (the upstream's request id and rate limits); raises for any other reply."""
        too_large = AnswerTooLargeError.past(len(reply.body), self.max_body)
        if reply.kind is not ReplyKind.FINAL:
            raise too_large
        return error_reply(
            job, too_large, attempt=reply.attempt, seq=reply.seq, http_headers=reply.http_headers
        )

    def _add_completed(self, cache_key: str, request_id: str, reply: Reply) -> None:
        """A 200 FINAL carries the body (the cache writer still checks it is complete); any
        other answer an empty body and its status, which releases the single-flight lock if
        this job holds it (the request id is the lock's owner)."""
        if self._completed is None:
            return
        whole = reply.kind is ReplyKind.FINAL and reply.status == 200
        if whole and len(reply.body) <= MAX_CACHED_BODY:
            self._completed.add(Completed(cache_key, reply.body, request_id=request_id))
        else:
            # Not kept (an error, or too large to cache): only the news that it ended.
            status = reply.status if reply.status != 200 else 500
            self._completed.add(Completed(cache_key, status=status, request_id=request_id))

    async def flush(self) -> None:
        """Publish the held `job.completed` events: before the broker connection closes."""
        if self._completed is not None:
            await self._completed.flush()

    async def final(
        self, job: Job, body: bytes, *, attempt: str, http_headers: dict[str, str] | None = None
    ) -> int:
        """Publish a final answer; returns the status sent (502 for one past `max_body`)."""
        reply = Reply(
            ReplyKind.FINAL, job.request_id, attempt, body=body, http_headers=http_headers or {}
        )
        await self(job, reply)
        return 200 if len(body) <= self.max_body else AnswerTooLargeError.status

    async def error(
        self,
        job: Job,
        exc: BaseException,
        *,
        attempt: str,
        seq: int = 0,
        http_headers: dict[str, str] | None = None,
    ) -> None:
        await self(job, error_reply(job, exc, attempt=attempt, seq=seq, http_headers=http_headers))

    async def give_up(self, env: Envelope, _: Exception) -> None:
        """`Broker.consume`'s hook for a job its handler failed for good (a bug, or input
        nothing can handle): its client gets a 500 now, not a 504 at its deadline, and a
        single-flight lock it held is released."""
        job = decode_job(env)
        await self.error(job, InternalError(job.request_id), attempt=new_attempt())


def error_reply(
    job: Job,
    exc: BaseException,
    *,
    attempt: str,
    seq: int = 0,
    http_headers: dict[str, str] | None = None,
) -> Reply:
    """The error reply for `exc`; `http_headers` (an upstream answer's: its request id, rate
    limits) go along, under the error's own."""
    status, body, headers = to_openai_error(exc, request_id=job.request_id)
    return Reply(
        ReplyKind.ERROR,
        job.request_id,
        attempt,
        body=body,
        seq=seq,
        status=status,
        http_headers={**(http_headers or {}), **{k: str(v) for k, v in headers.items()}},
    )


class StreamWriter:
    """Turns SSE events into numbered chunk messages for one attempt at one job.

    `send()` takes framed events (`data: ...\\n\\n`). The first is published before `send()`
    returns (so the caller can ack the job once it is confirmed), and so is the next (the
    first token behind a role chunk); after that at most one message goes out per `window`
    seconds: an event after a quiet spell (or in the window's last quarter) is published at
    once, a burst is gathered until the window since the last message has passed. No message
    holds more than `max_bytes` of events (unless one event is larger, which the publisher
    refuses). `end()` and `fail()` flush what is buffered and close the stream; a publish
    failure in the background surfaces on the next call. `fail()` after a failed publish drops
    what is buffered and tries the error alone: the channel may be back, and the client then
    ends at once instead of waiting out its idle timeout.
    """

    def __init__(
        self,
        job: Job,
        publish: Publish,
        *,
        attempt: str,
        window: float = 0.005,
        http_headers: dict[str, str] | None = None,
        max_bytes: int = MAX_REPLY_BYTES,
    ) -> None:
        self.job = job
        self.attempt = attempt
        self._publish = publish
        self._window = window
        self._max_bytes = max_bytes
        self._http_headers = http_headers or {}
        self._seq = 0
        self._buffer: list[bytes] = []
        self._flusher: asyncio.Task[None] | None = None
        self._last_publish = float("-inf")
        self._lock = asyncio.Lock()
        self._failure: BaseException | None = None
        self._publish_failed = False
        self.closed = False  # no event is taken any more
        self._ended = False  # the closing message went out (or none is to go)
        # A chunk reached the broker (its publish returned, so it was confirmed): the client
        # may hold part of the answer, and the job must not run again (ack it, however it ends).
        # A first chunk whose publish failed reached nobody: the job may go back to its queue.
        self.output_confirmed = False

    @property
    def started(self) -> bool:
        return self._seq > 0

    def send(self, event: bytes) -> Awaitable[None]:
        # No coroutine of its own: a frame per event on the stream's hot path, for nothing.
        return self.send_all((event,))

    async def send_all(self, events: Sequence[bytes]) -> None:
        """`send()` for events that arrived together: they leave together where they fit in
        one message, and each stays whole."""
        self._raise_failure()
        self._buffer.extend(events)
        if self._flusher is not None:
            return  # a flush is already due: this event rides along
        # At most one message per window: an event after a quiet spell (the first one, or the
        # first token after the role chunk) goes out at once; a burst waits out the window.
        # Not the window's last quarter, though: a timer that short gathers next to nothing
        # and costs a wakeup of its own (a stream paced at the window's rate, 200 tokens/s
        # for the default 5 ms, woke the agent 45 times instead of 35; bench/RESULTS.md).
        delay = self._last_publish + self._window - asyncio.get_running_loop().time()
        if delay <= self._window / 4:
            await self._flush()
        else:
            self._flusher = asyncio.create_task(self._flush_later(delay))

    async def end(self) -> None:
        await self._close(Reply(ReplyKind.END, self.job.request_id, self.attempt))

    async def fail(self, exc: BaseException) -> None:
        await self._close(error_reply(self.job, exc, attempt=self.attempt), failing=True)

    async def abandon(self) -> None:
        """Stop without a closing message (the job was cancelled: nobody listens)."""
        self.closed = self._ended = True
        if self._flusher is not None:
            self._flusher.cancel()

    async def cut_off(self, *, by_client: bool, why: str) -> None:
        """Close a stream whose task was cancelled: by its client, or by its service (stopping,
        or its consuming connection lost; `why` says which, as the client's error message).

        Its client left, or nothing was sent yet (the job goes back to its queue): no closing
        message. A started stream cut off by its service ends with a 503 event now, so its
        client is not left waiting for its idle timeout; a broker that cannot take that event
        any more changes nothing.
        """
        if by_client or not self.started:
            await self.abandon()
            return
        try:
            await self.fail(ServiceUnavailableError(why))
        except (RouterError, OSError):
            log.debug("could not publish the closing message", exc_info=True)

    async def _close(self, last: Reply, *, failing: bool = False) -> None:
        # An `end()` whose flush or closing message failed has not ended the stream: the
        # caller's `fail()` next still tells the client.
        if self._ended:
            return
        self.closed = True
        flusher = self._flusher
        if flusher is not None:
            if not self._lock.locked():  # still waiting out the window: flush now instead
                flusher.cancel()
            await asyncio.wait({flusher})
        if failing and self._publish_failed:
            # A chunk is missing already: the client can only be told the stream failed.
            self._buffer.clear()
        else:
            self._raise_failure()
        await self._flush()
        async with self._lock:
            await self._publish_numbered(_renumbered(last, self._seq))
        self._ended = True

    async def _flush_later(self, delay: float) -> None:
        try:
            # Events sent while a publish waited for its confirm found this flusher still set
            # and rode along, but too late for its batch: they go one window later, not at the
            # next send(), which a model pausing to think may hold back for minutes.
            while True:
                await asyncio.sleep(delay)
                await self._flush()
                if not self._buffer:
                    break
                loop = asyncio.get_running_loop()
                delay = max(0.0, self._last_publish + self._window - loop.time())
        except RouterError as e:
            self._failure = e
        finally:
            self._flusher = None

    async def _flush(self) -> None:
        async with self._lock:
            while self._buffer:
                await self._publish_next()

    async def _publish_next(self) -> None:
        """Publish the buffered events that fit in one message (at least one)."""
        count = size = 0
        for event in self._buffer:
            if count and size + len(event) > self._max_bytes:
                break
            count += 1
            size += len(event)
        body = b"".join(self._buffer[:count])
        del self._buffer[:count]
        if self._seq > 0:
            # The first message (often a role-only chunk) does not open a window: the
            # first token right behind it goes out at once too. Time to first token is
            # what users feel; one extra message per stream is the price.
            self._last_publish = asyncio.get_running_loop().time()
        headers = self._http_headers if self._seq == 0 else {}
        reply = Reply(
            ReplyKind.CHUNK,
            self.job.request_id,
            self.attempt,
            body=body,
            seq=self._seq,
            http_headers=headers,
        )
        await self._publish_numbered(reply)
        self.output_confirmed = True

    async def _publish_numbered(self, reply: Reply) -> None:
        """Publish `reply`, numbered as the stream's next message. Its number is used even if
        the publish fails (the message may still arrive); a failure is remembered for `fail()`."""
        self._seq += 1
        try:
            await self._publish(self.job, reply)
        except BaseException:
            self._publish_failed = True
            raise

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure


def _renumbered(reply: Reply, seq: int) -> Reply:
    return Reply(
        reply.kind,
        reply.request_id,
        reply.attempt,
        body=reply.body,
        seq=seq,
        status=reply.status,
        http_headers=reply.http_headers,
    )
