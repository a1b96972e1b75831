"""Reply correlation: matching messages on this process's reply queue to waiting requests.

One reply queue per API process; a `dict[correlation_id, PendingCall]` whose entries are removed
by their owner when the request ends. Stray and late replies are logged and dropped, never
raised. The first attempt a call hears from wins; another attempt's messages are dropped, or,
once output has reached the client, end the stream with an error (that attempt's own, if it
answered one).

A stream chunk for a call that has ended means a backend is generating for nobody: a job run
again after its agent lost its consuming connection mid-stream (its delivery unacked), or one
a restarted agent took from the queue after its client left, when the cancel had no consumer
to reach. `on_orphan` is told once per such call (the bus publishes a cancel), for calls ended
within the last `forget_after` seconds (at most `MAX_ENDED` of them are remembered).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable

from shared.errors import UpstreamError, UpstreamHTTPError
from shared.messages import Reply, ReplyKind
from shared.reply_trust import ReplyTrust

log = logging.getLogger(__name__)


class StreamOrderError(UpstreamError):
    """A stream lost a chunk message (a gap in sequence numbers) or restarted mid-way."""


class PendingCall:
    """The replies of one request, in arrival order, filtered by attempt and sequence."""

    __slots__ = ("_queue", "attempt", "model", "next_seq", "output_started", "request_id")

    def __init__(self, request_id: str, model: str = "") -> None:
        self.request_id = request_id
        self.model = model
        self.attempt: str | None = None
        self.next_seq = 0
        self.output_started = False
        self._queue: asyncio.Queue[Reply | BaseException] = asyncio.Queue()

    def deliver(self, reply: Reply) -> None:
        if self.attempt is None:
            self.attempt = reply.attempt
        elif reply.attempt != self.attempt:
            if self.output_started and reply.kind is ReplyKind.ERROR:
                # Nothing restarted: the job came back and failed (expired, say). Its own error.
                self._queue.put_nowait(UpstreamHTTPError(reply.status, reply.body))
            elif self.output_started:
                self._queue.put_nowait(
                    StreamOrderError("The backend restarted the stream after output was sent.")
                )
            else:
                log.info("dropping reply of attempt %s for %s", reply.attempt, self.request_id)
            return
        if reply.kind in (ReplyKind.CHUNK, ReplyKind.END):
            if reply.seq < self.next_seq:
                log.info("dropping duplicate chunk %d of %s", reply.seq, self.request_id)
                return
            if reply.seq > self.next_seq:
                self._queue.put_nowait(
                    StreamOrderError(f"Stream chunk {self.next_seq} was lost in transit.")
                )
                return
            self.next_seq += 1
        self._queue.put_nowait(reply)

    def fail(self, exc: BaseException) -> None:
        self._queue.put_nowait(exc)

    async def next(self, timeout: float) -> Reply:
        """The next reply; raises TimeoutError after `timeout` s, or the error delivered."""
        if timeout <= 0:
            raise TimeoutError
        async with asyncio.timeout(timeout):
            item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item


MAX_ENDED = 16_384  # ended calls remembered for `on_orphan`: about 1 MiB


class ReplyRouter:
    """All calls of this process that wait for a reply, by correlation id."""

    def __init__(
        self,
        trust: ReplyTrust | None = None,
        *,
        on_orphan: Callable[[str, str], None] | None = None,
        forget_after: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.trust = trust or ReplyTrust()
        self._calls: dict[str, PendingCall] = {}
        self._results: dict[str, asyncio.Future[bytes]] = {}
        self.on_orphan = on_orphan
        self.forget_after = forget_after
        self.clock = clock
        self._ended: OrderedDict[str, tuple[str, float]] = OrderedDict()  # id: (model, when)

    def __len__(self) -> int:
        return len(self._calls) + len(self._results)

    def open(self, request_id: str, model: str = "") -> PendingCall:
        call = PendingCall(request_id, model)
        self._calls[request_id] = call
        return call

    def close(self, request_id: str) -> None:
        call = self._calls.pop(request_id, None)
        if call is None or self.on_orphan is None:
            return
        now = self.clock()
        self._ended[request_id] = (call.model, now)
        while self._ended:
            _, (_, ended_at) = next(iter(self._ended.items()))
            if len(self._ended) <= MAX_ENDED and now - ended_at <= self.forget_after:
                break
            self._ended.popitem(last=False)

    def dispatch(self, reply: Reply, sender: str | None = None) -> bool:
        """Hand a reply to its call; False (and a log line) for a stray or late one, or one
        whose broker user (`sender`) may not answer for the call's model (`REPLY_USERS`)."""
        call = self._calls.get(reply.request_id)
        if call is None:
            log.debug("stray %s reply for %s dropped", reply.kind, reply.request_id)
            if reply.kind is ReplyKind.CHUNK:
                self._orphaned(reply.request_id, sender)
            return False
        if not self.trust.may_answer(sender, call.model):
            log.warning(
                "reply for %s (model %s) from broker user %r dropped: not allowed to answer it",
                reply.request_id,
                call.model,
                sender,
            )
            return False
        call.deliver(reply)
        return True

    def _orphaned(self, request_id: str, sender: str | None) -> None:
        ended = self._ended.get(request_id)
        if ended is None or self.on_orphan is None:
            return
        model, ended_at = ended
        if not self.trust.may_answer(sender, model):
            return  # nor may it use up the call's one cancel
        del self._ended[request_id]  # told once per call
        if self.clock() - ended_at > self.forget_after:
            return
        log.info("a backend streams %s for nobody (its call ended): cancelling it", request_id)
        self.on_orphan(request_id, model)

    def waiting(self) -> list[PendingCall]:
        """The calls still waiting for (more of) their answer."""
        return list(self._calls.values())

    def fail_all(self, error: Callable[[], BaseException]) -> None:
        """Fail every waiting call (their replies can no longer arrive), each with an error of
        its own: one exception raised in many tasks would gather every task's traceback."""
        for call in self._calls.values():
            call.fail(error())

    def expect_result(self, request_id: str) -> asyncio.Future[bytes]:
        """A one-shot RPC answer (the model list), removed from the table when done."""
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._results[request_id] = future
        future.add_done_callback(lambda _: self._results.pop(request_id, None))
        return future

    def resolve_result(self, request_id: str, body: bytes, sender: str | None = None) -> bool:
        future = self._results.get(request_id)
        if future is None or future.done():
            return False
        if not self.trust.is_router(sender):
            log.warning("rpc answer %s from broker user %r dropped", request_id, sender)
            return False
        future.set_result(body)
        return True
