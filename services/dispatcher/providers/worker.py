"""Consuming one provider's queue: call the provider for each job and publish its reply.

A provider call may last minutes, so provider jobs have their own queue and channel (with a
larger prefetch) and never hold a slot of the jobs queue. Ack policy: a job whose deadline
passed or whose client cancelled is acked without an upstream call; any other job once it is
over, a stream included, so the queue's prefetch (`PROVIDER_PREFETCH`) bounds the calls a
dispatcher runs at once and the rest go to other dispatchers. A stream that has sent output is
acked however it ends, the dispatcher stopping included (it must not run again for a client that
holds part of it), once a chunk of it was confirmed. A cancel that arrives while the call runs
aborts the HTTP call (its task is cancelled).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from services.dispatcher.providers.base import Provider, ProviderRequest
from services.dispatcher.providers.routes import upstream_model
from services.dispatcher.providers.upstream import rewrite_model
from services.dispatcher.routing import ProviderRule
from shared.amqp import Delivery
from shared.cancel import Cancellations
from shared.errors import BrokerUnavailableError, DeadlineError, ModelNotFoundError, RouterError
from shared.messages import Envelope, Job, decode_job
from shared.replies import ReplyPublisher, StreamWriter, new_attempt

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Outcome:
    """How one job ended, for its log line."""

    status: int = 0
    events: int = 0
    error: str = ""

    def failed(self, error: RouterError) -> None:
        self.status = error.status
        self.error = error.code or error.message


class ProviderWorker:
    def __init__(
        self,
        provider: Provider,
        *,
        rules: tuple[ProviderRule, ...],
        reply: ReplyPublisher,
        cancellations: Cancellations,
        coalesce_window: float = 0.005,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.provider = provider
        self.rules = rules
        self.reply = reply
        self.cancellations = cancellations
        self.coalesce_window = coalesce_window
        self.clock = clock

    async def on_job(self, env: Envelope, delivery: Delivery) -> None:
        started = time.perf_counter()
        job = decode_job(env)
        name = self.provider.name
        if self.cancellations.is_cancelled(job.request_id):
            log.info("%s job %s dropped: cancelled by the api", name, job.request_id)
            return
        if job.remaining(self.clock()) <= 0:
            log.info("%s job %s dropped: deadline passed before the call", name, job.request_id)
            return
        model = upstream_model(job.model, self.rules, name)
        if model is None:  # this dispatcher's routes differ from the one that routed the job
            await self.reply.error(job, ModelNotFoundError(job.model), attempt=new_attempt())
            return
        request = ProviderRequest(
            request_id=job.request_id,
            model=model,
            body=rewrite_model(job.body, job.model, model),
            stream=job.stream,
            deadline=job.deadline,
        )
        outcome = Outcome()
        work = (
            self._stream(job, request, delivery, outcome)
            if job.stream
            else self._complete(job, request, outcome)
        )
        finished = await self.cancellations.run(job.request_id, work)
        log.log(
            logging.WARNING if outcome.status >= 500 else logging.INFO,
            "job %s model=%s route=%s stream=%s status=%s events=%d %.2fms%s",
            job.request_id,
            job.model,
            name,
            job.stream,
            outcome.status if finished else "cancelled",
            outcome.events,
            (time.perf_counter() - started) * 1000,
            f" error={outcome.error}" if outcome.error else "",
        )

    async def _complete(self, job: Job, request: ProviderRequest, outcome: Outcome) -> None:
        attempt = new_attempt()
        try:
            async with asyncio.timeout(job.remaining(self.clock())):
                response = await self.provider.complete(request)
        except Exception as e:
            error = self._as_error(e, job)
            outcome.failed(error)
            await self.reply.error(job, error, attempt=attempt)
            return
        outcome.status = await self.reply.final(
            job, response.body, attempt=attempt, http_headers=response.headers
        )

    async def _stream(
        self, job: Job, request: ProviderRequest, delivery: Delivery, outcome: Outcome
    ) -> None:
        attempt = new_attempt()
        writer: StreamWriter | None = None
        headers: dict[str, str] = {}
        try:
            async with asyncio.timeout(job.remaining(self.clock())):
                stream = await self.provider.stream(request)
                headers = stream.headers
                try:
                    writer = StreamWriter(
                        job,
                        self.reply,
                        attempt=attempt,
                        window=self.coalesce_window,
                        http_headers=headers,
                        max_bytes=self.reply.max_body,
                    )
                    async for event in stream.events():
                        await writer.send(event)
                        outcome.events += 1
                finally:
                    await stream.aclose()
            await writer.end()
            outcome.status = 200
        except asyncio.CancelledError:
            if writer is not None:
                cancelled = self.cancellations.is_cancelled(job.request_id)
                why = "The dispatcher stopped, or lost its broker connection."
                await writer.cut_off(by_client=cancelled, why=why)
            raise
        except Exception as e:
            if isinstance(e, BrokerUnavailableError) and not (writer and writer.output_confirmed):
                # No chunk reached the broker, so none reached the client: the consumer holds
                # the job until publishing is back, then puts it back in its queue (as an
                # agent does). An error published in its place would end it for good.
                log.info("job %s: the broker took no chunk; back to its queue", job.request_id)
                raise
            error = self._as_error(e, job)
            outcome.failed(error)
            if writer is not None and writer.started:
                try:
                    await writer.fail(error)
                except RouterError as unsent:
                    if not writer.output_confirmed:
                        raise  # nothing reached the client: back to its queue
                    # The job is acked (the client holds part of it): log its outcome, at least.
                    log.warning(
                        "job %s: its stream's error was not sent: %s", job.request_id, unsent
                    )
            else:
                # The error is the whole answer (an error event first, say): it carries the
                # stream's headers, the upstream's request id and rate limits.
                await self.reply.error(job, error, attempt=attempt, http_headers=headers)
        finally:
            if writer is not None and writer.output_confirmed:
                await delivery.ack()  # the client holds part of it: never run it again

    def _as_error(self, exc: Exception, job: Job) -> RouterError:
        if isinstance(exc, RouterError):
            return exc
        if isinstance(exc, TimeoutError):
            return DeadlineError("The model did not answer in time.")
        log.error(
            "%s call for %s failed unexpectedly", self.provider.name, job.request_id, exc_info=exc
        )
        return RouterError(
            f"The server had an error processing your request (request id {job.request_id})."
        )
