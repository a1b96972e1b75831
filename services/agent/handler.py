"""What an agent does with each job it consumes.

Acks (see `shared.amqp.Delivery`): a job is acked when it is over (the consumer acks when
`on_job` returns), so it holds its prefetch slot, and this agent takes no more jobs of the model
than it has slots, for as long as it runs; a stream too, however long. A job that fails to reach
the server before any output is requeued once (the broker hands it to any consumer of its queue,
maybe this agent again); the second failure is answered 502. A stream that has sent output (a
chunk the broker confirmed) is acked however it ends, so it is not run again for a client that
already holds part of it (if the ack cannot reach the broker, as when the consuming connection
is lost, the re-run's first chunk makes the API cancel it). Cancelled and expired jobs are
acked and dropped without a reply: nobody waits for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from services.agent.backend import UpstreamBrokenError, UpstreamUnavailableError, VllmClient
from services.agent.bodies import (
    BodyError,
    UpstreamFailure,
    for_server,
    normalise_error,
    stream_event,
)
from services.agent.bodies import with_model as rewrite_model
from services.agent.models import ModelMap
from services.agent.sse import SseDecoder, SseEventTooLargeError
from shared.amqp import Delivery
from shared.cancel import Cancellations
from shared.errors import (
    AnswerTooLargeError,
    DeadlineError,
    GatewayTimeoutError,
    InvalidRequestError,
    ModelNotFoundError,
    RouterError,
    UpstreamError,
)
from shared.messages import MAX_REPLY_BYTES, Envelope, Job, Reply, ReplyKind, decode_job
from shared.replies import Publish, StreamWriter, error_reply, new_attempt

log = logging.getLogger(__name__)

# Why a stopping agent stops starting jobs; a job its drain then cuts off is logged with it.
STOPPING = "agent stopping"


class StreamEndedError(UpstreamError):
    """The server closed a stream without `data: [DONE]`."""


def failure_reply(
    job: Job, failure: UpstreamFailure, *, attempt: str, hints: dict[str, str] | None = None
) -> Reply:
    """The server's error for the client, with its retry and rate-limit headers (`hints`):
    a gateway such as llm-d's says with `retry-after` when to come back."""
    return Reply(
        ReplyKind.ERROR,
        job.request_id,
        attempt,
        body=failure.body,
        status=failure.status,
        http_headers=hints or {},
    )


class AgentHandler:
    """Runs jobs against one inference server; `in_flight` is the load it reports."""

    def __init__(
        self,
        *,
        models: ModelMap,
        upstream: VllmClient,
        publish: Publish,
        cancellations: Cancellations,
        concurrency: int | None = None,
        coalesce_window: float = 0.005,
        clock: Callable[[], float] = time.time,
        max_reply_bytes: int = MAX_REPLY_BYTES,
    ) -> None:
        self.models = models
        self.concurrency = concurrency
        self._slots: dict[str, asyncio.Semaphore] = {}
        self.upstream = upstream
        self.publish = publish
        self.cancellations = cancellations
        self.coalesce_window = coalesce_window
        self.clock = clock
        # Of one upstream SSE event, and of one chunk message: what one reply may carry.
        self.max_reply_bytes = max_reply_bytes
        self.in_flight = 0
        self.hand_back_reason: str | None = None

    def stop_starting(self, reason: str) -> None:
        """Hand jobs that have not reached the server yet back to their queue (`reason` is
        their logged outcome), so another agent takes them: this one is stopping, say, and a
        job that waited for a slot must not start a call the drain would then cut off."""
        self.hand_back_reason = reason

    def start_again(self) -> None:
        self.hand_back_reason = None

    def slot(self, model: str) -> AbstractAsyncContextManager[Any]:
        """At most `concurrency` upstream calls per model.

        The model's prefetch (as many as the slots) bounds them already, except after the health
        watchdog resumed consuming while streams ran: the new consumer gets the whole prefetch
        again (docs/architecture.md, "Acks"), and the jobs past the slots wait here. A job
        waiting here stays unacked, so it is redelivered if this agent dies.
        """
        if self.concurrency is None:
            return contextlib.nullcontext()
        if model not in self._slots:
            self._slots[model] = asyncio.Semaphore(self.concurrency)
        return self._slots[model]

    async def on_job(self, env: Envelope, delivery: Delivery) -> None:
        started = time.perf_counter()
        job = decode_job(env)
        try:
            outcome = await self._handle(job, delivery)
        except asyncio.CancelledError:
            # This consumer's own task (the api's cancel stops only the job's child task): the
            # drain of a stopping agent, or its channel closing with the consuming connection.
            why = STOPPING if self.hand_back_reason == STOPPING else "consuming connection lost"
            _log_outcome(logging.WARNING, job, f"cut off: {why}", started)
            raise
        _log_outcome(logging.INFO, job, outcome, started)

    async def _handle(self, job: Job, delivery: Delivery) -> str:
        if self.cancellations.is_cancelled(job.request_id):
            return "dropped: cancelled by the api"
        if job.remaining(self.clock()) <= 0:
            return "dropped: deadline passed"
        attempt = new_attempt()
        served = self.models.served_name(job.model)
        if served is None:
            await self.publish(
                job, error_reply(job, ModelNotFoundError(job.model), attempt=attempt)
            )
            return "refused: model not served here"
        try:
            body = for_server(job.body, served, include_usage=job.include_usage)
        except BodyError:
            error = InvalidRequestError("The request body is not a JSON object.")
            await self.publish(job, error_reply(job, error, attempt=attempt))
            return "refused: body is not a JSON object"
        run = _Run(self, job, delivery=delivery, attempt=attempt, body=body)
        self.in_flight += 1
        try:
            finished = await self.cancellations.run(job.request_id, run.go())
        finally:
            self.in_flight -= 1
        return run.outcome if finished else "cancelled by the api"


class _Run:
    """One attempt at one job (the state its helpers share)."""

    def __init__(
        self,
        handler: AgentHandler,
        job: Job,
        *,
        delivery: Delivery,
        attempt: str,
        body: bytes,
    ) -> None:
        self.h = handler
        self.job = job
        self.delivery = delivery
        self.attempt = attempt
        self.body = body
        self.remaining = 0.0
        self.outcome = "answered"

    async def go(self) -> None:
        if await self._handed_back():
            return
        async with self.h.slot(self.job.model):
            if await self._handed_back():  # told to stop starting jobs while it waited
                return
            # The deadline bounds the upstream call; it may have passed while waiting.
            self.remaining = self.job.remaining(self.h.clock())
            if self.remaining <= 0:
                self.outcome = "dropped: deadline passed while waiting for a slot"
                return
            await (self.stream() if self.job.stream else self.complete())

    async def _handed_back(self) -> bool:
        reason = self.h.hand_back_reason
        if reason is None:
            return False
        await self.delivery.reject(requeue=True)
        self.outcome = f"requeued: {reason}"
        return True

    async def _error(self, exc: BaseException) -> None:
        await self.h.publish(self.job, error_reply(self.job, exc, attempt=self.attempt))

    async def _unavailable(self, exc: UpstreamError) -> None:
        """Before any output: requeue once (any agent of the model may take it), then 502."""
        if not self.delivery.redelivered:
            await self.delivery.reject(requeue=True)
            self.outcome = f"requeued: {exc.message}"
            return
        await self._error(exc)
        self.outcome = f"failed: {exc.message}"

    # --- JSON ----------------------------------------------------------------------------------
    async def complete(self) -> None:
        job = self.job
        try:
            async with asyncio.timeout(self.remaining):
                answer = await self.h.upstream.complete(self.body, max_bytes=self.h.max_reply_bytes)
        except UpstreamUnavailableError as e:
            await self._unavailable(e)
            return
        except AnswerTooLargeError as e:
            await self._error(e)  # any agent of the model has the same limit
            self.outcome = f"failed: {e.message}"
            return
        except TimeoutError:
            await self._error(DeadlineError("The model did not answer in time."))
            self.outcome = "failed: deadline"
            return
        if answer.status != 200:
            failure = normalise_error(answer.status, answer.body)
            reply = failure_reply(job, failure, attempt=self.attempt, hints=answer.hints)
            await self.h.publish(job, reply)
            self.outcome = f"upstream error {failure.status}"
            return
        try:
            body = rewrite_model(answer.body, job.model)
        except BodyError:
            await self._error(UpstreamError("The inference server's answer is not JSON."))
            self.outcome = "failed: upstream answer is not JSON"
            return
        await self.h.publish(job, Reply(ReplyKind.FINAL, job.request_id, self.attempt, body=body))

    # --- SSE -----------------------------------------------------------------------------------
    async def stream(self) -> None:
        job = self.job
        writer = StreamWriter(
            job,
            self.h.publish,
            attempt=self.attempt,
            window=self.h.coalesce_window,
            max_bytes=self.h.max_reply_bytes,
        )
        try:
            await self._stream(writer)
        finally:
            if writer.output_confirmed:
                # The client holds part of the answer: whatever ended the stream (its end, a
                # failure, the agent stopping), the job must not run again for it.
                await self.delivery.ack()

    async def _stream(self, writer: StreamWriter) -> None:
        job = self.job
        try:
            async with asyncio.timeout(self.remaining):
                await self._relay(writer)
        except UpstreamUnavailableError as e:
            await self._unavailable(e)
        except (UpstreamBrokenError, StreamEndedError, BodyError) as e:
            error = _broken_stream_error(e)
            if writer.started:
                await writer.fail(error)
                self.outcome = f"failed mid-stream: {type(e).__name__}"
            else:
                await self._unavailable(UpstreamUnavailableError(error.message))
        except TimeoutError:
            await writer.fail(GatewayTimeoutError("The model did not finish in time."))
            self.outcome = "failed: deadline"
        except (AnswerTooLargeError, SseEventTooLargeError) as e:
            # An event past MAX_REPLY_BYTES (the decoder measures its data), or a chunk past it
            # once framed and renamed: any agent of the model would refuse it too, so no requeue.
            error = e if isinstance(e, AnswerTooLargeError) else _event_too_large()
            if writer.output_confirmed:
                with contextlib.suppress(RouterError, OSError):
                    await writer.fail(error)
            else:
                await self._error(error)
            self.outcome = f"failed: {error.message}"
        except RouterError as e:
            # A chunk the broker did not take (its channel closed): the client learns now, if
            # the channel is back, not at its idle timeout.
            if not writer.output_confirmed:
                raise  # nothing reached the client: the consumer requeues the job
            with contextlib.suppress(RouterError, OSError):
                await writer.fail(e)
            self.outcome = f"failed mid-stream: {e.message}"
        except asyncio.CancelledError:
            cancelled = self.h.cancellations.is_cancelled(job.request_id)
            stopping = self.h.hand_back_reason == STOPPING
            why = "The agent stopped." if stopping else "The agent lost its broker connection."
            await writer.cut_off(by_client=cancelled, why=why)
            raise

    async def _relay(self, writer: StreamWriter) -> None:
        job = self.job
        async with self.h.upstream.stream(self.body) as response:
            if response.status != 200:
                failure = normalise_error(response.status, await response.read())
                reply = failure_reply(job, failure, attempt=self.attempt, hints=response.hints)
                await self.h.publish(job, reply)
                self.outcome = f"upstream error {failure.status}"
                return
            decoder = SseDecoder(self.h.max_reply_bytes)
            async for raw in response.chunks():
                if await self._on_events(decoder.feed(raw), writer):
                    return
            if await self._on_events(decoder.close(), writer):
                return
        raise StreamEndedError("The inference server ended the stream early.")

    async def _on_events(self, events: list[bytes], writer: StreamWriter) -> bool:
        """Relay the events of one upstream read; True once the stream is over.

        Chunks that arrived together leave together, in one `send_all()`: a server writes the
        role chunk and the first token at once, and sent one by one the token would wait
        for the role chunk's publish to be confirmed (a broker round trip of time to first
        token). It also saves a send per event on a fast stream. Each stays a chunk of its
        own to the writer, which splits messages between chunks at MAX_REPLY_BYTES.
        """
        chunks: list[bytes] = []
        for data in events:
            event = stream_event(data, self.job.model)
            if event.chunk is not None:
                chunks.append(event.chunk)
                continue
            await self._send(chunks, writer)  # what came before the end goes first
            if event.done:
                await writer.end()
                return True
            assert event.error is not None
            if writer.started:
                await writer.fail(UpstreamError(event.error.message))
            else:
                reply = failure_reply(self.job, event.error, attempt=self.attempt)
                await self.h.publish(self.job, reply)
            self.outcome = f"upstream error event {event.error.status}"
            return True
        await self._send(chunks, writer)
        return False

    async def _send(self, chunks: list[bytes], writer: StreamWriter) -> None:
        if chunks:
            await writer.send_all(chunks)


def _log_outcome(level: int, job: Job, outcome: str, started: float) -> None:
    log.log(
        level,
        "job %s model=%s stream=%s %s %.1fms",
        job.request_id,
        job.model,
        job.stream,
        outcome,
        (time.perf_counter() - started) * 1000,
    )


def _broken_stream_error(exc: Exception) -> UpstreamError:
    if isinstance(exc, StreamEndedError):
        return exc
    return UpstreamError("The inference server's stream broke off.")


def _event_too_large() -> AnswerTooLargeError:
    return AnswerTooLargeError(
        "The inference server sent a stream event larger than the router carries (MAX_REPLY_BYTES)."
    )
