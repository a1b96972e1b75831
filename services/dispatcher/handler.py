"""What a dispatcher does with each message it consumes, given its collaborators.

Handlers receive decoded envelopes and a `Delivery`; they never see aio-pika. A job is acked
(by the consumer, when the handler returns) only once it has been answered or handed on and the
broker confirmed that.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

import orjson

from services.dispatcher import dummy
from services.dispatcher.cache import Hit, JobCache
from services.dispatcher.providers.routes import is_listed_alias
from services.dispatcher.registry import Registry
from services.dispatcher.returns import delivery_count, header_text, latest_death, was_held
from services.dispatcher.routing import (
    AgentView,
    AnswerDummy,
    AwaitRegistry,
    ProviderRule,
    Refuse,
    Route,
    ToAgent,
    ToProvider,
    choose_route,
    is_unknown,
    warming_up_error,
)
from shared.amqp import Broker, Delivery
from shared.cancel import Cancellations
from shared.errors import (
    QueueFullError,
    RateLimitError,
    RouterError,
    ServiceUnavailableError,
    UnroutableError,
)
from shared.messages import (
    H_DELIVERIES,
    H_MODEL,
    H_QUEUED_AT,
    MAX_REPLY_BYTES,
    Envelope,
    Job,
    decode_cancel,
    decode_control,
    decode_job,
    encode_job,
    encode_rpc_result,
)
from shared.replies import ReplyPublisher, StreamWriter, confirm_timeout, new_attempt
from shared.topology import QueueArgumentsError, QueueSpec, Topology

log = logging.getLogger(__name__)

EnsureQueue = Callable[[QueueSpec], Awaitable[None]]

# How often a job waiting for the registry's warm-up looks again (a heartbeat lands any time).
REGISTRY_POLL = 0.05


def _header_text(env: Envelope, name: str) -> str | None:
    return header_text(env.headers.get(name))


def model_list(view: AgentView, provider_models: list[str], created: int) -> bytes:
    """OpenAI's list shape: `dummy`, every live local model, then provider models."""
    entries = [{"id": "dummy", "object": "model", "created": created, "owned_by": "router"}]
    entries += [
        {"id": model, "object": "model", "created": created, "owned_by": "agent"}
        for model in sorted(view.live)
    ]
    entries += [
        {"id": model, "object": "model", "created": created, "owned_by": "provider"}
        for model in provider_models
    ]
    return orjson.dumps({"object": "list", "data": entries})


class DispatcherHandler:
    def __init__(
        self,
        *,
        topology: Topology,
        broker: Broker,
        registry: Registry,
        cancellations: Cancellations,
        ensure_queue: EnsureQueue,
        providers: tuple[ProviderRule, ...] = (),
        provider_models: Callable[[], list[str]] = list,
        coalesce_window: float = 0.005,
        clock: Callable[[], float] = time.time,
        cache: JobCache | None = None,
        max_reply_bytes: int = MAX_REPLY_BYTES,
        max_registry_waiters: int = 0,
    ) -> None:
        self.topology = topology
        self.broker = broker
        self.registry = registry
        self.cancellations = cancellations
        self.ensure_queue = ensure_queue
        self.providers = providers
        self.provider_models = provider_models
        self.coalesce_window = coalesce_window
        self.clock = clock
        self.cache = cache
        # Jobs waiting for the warm-up hold prefetch slots: a few at most, or jobs for other
        # models (or unknown ones, sent in a burst) would stall behind them.
        self.max_registry_waiters = max_registry_waiters
        self._registry_waiters = 0
        # Answers to cacheable jobs this dispatcher finishes (dummy, providers) feed the cache.
        self.reply = ReplyPublisher.for_topology(broker, topology, max_body=max_reply_bytes)

    # --- jobs ----------------------------------------------------------------------------------
    async def on_job(self, env: Envelope, _: Delivery) -> None:
        started = time.perf_counter()
        job = decode_job(env)
        now = self.clock()
        if self.cancellations.is_cancelled(job.request_id):
            log.info("job %s dropped: cancelled by its client", job.request_id)
            return
        if job.remaining(now) <= 0:
            log.info("job %s dropped: deadline passed before dispatch", job.request_id)
            return
        routed = choose_route(job.model, self.registry.view(now), self.providers)
        if self.cache is not None and not is_unknown(routed):
            looked = await self.cache.lookup(job)
            if isinstance(looked, Hit):
                await self._answer_from_cache(looked)
                log.info(
                    "job %s model=%s route=CacheHit stream=%s %.2fms",
                    job.request_id,
                    job.model,
                    job.stream,
                    (time.perf_counter() - started) * 1000,
                )
                return
            job = looked.job
            if self.cancellations.is_cancelled(job.request_id):  # while waiting on the cache
                log.info("job %s dropped: cancelled by its client", job.request_id)
                # A cancel heard during the lookup found no lock to release: it was not taken yet.
                await self.cache.on_cancel(job.request_id)
                return
            # The lookup may have waited for an identical job: route by the registry of now.
            routed = choose_route(job.model, self.registry.view(self.clock()), self.providers)
        route: Route | None = routed
        if isinstance(route, AwaitRegistry):
            route = await self._after_warm_up(job)
            if route is None:
                log.info("job %s dropped: cancelled by its client", job.request_id)
                return
        if isinstance(route, AnswerDummy):
            await self._answer_dummy(job, int(now))
        elif isinstance(route, ToAgent):
            await self._hand_off(job, self.topology.agent_queue_spec(route.model))
        elif isinstance(route, ToProvider):
            await self._hand_off(job, self.topology.provider_queue_spec(route.provider))
        elif isinstance(route, Refuse):
            await self.reply.error(job, route.error, attempt=new_attempt())
        else:
            await self.reply.error(job, warming_up_error(), attempt=new_attempt())
        log.info(
            "job %s model=%s route=%s stream=%s %.2fms",
            job.request_id,
            job.model,
            type(route).__name__,
            job.stream,
            (time.perf_counter() - started) * 1000,
        )

    async def give_up(self, env: Envelope, exc: Exception) -> None:
        """`Broker.consume`'s hook for a job this dispatcher failed for good: answer its
        client 500 now, and release the single-flight lock its cache lookup may have taken
        (the job as the API published it names no cache key, so its answer cannot)."""
        if self.cache is not None:
            await self.cache.on_cancel(decode_job(env).request_id)
        await self.reply.give_up(env, exc)

    async def _after_warm_up(self, job: Job) -> Route | None:
        """Where a job goes once its model was heard of, the warm-up ended or the job's
        deadline passed, whichever comes first (None: its client cancelled it meanwhile). A
        503 at once failed a live model's requests on a dispatcher just added, until its
        agents' next heartbeat (up to HEARTBEAT_INTERVAL)."""
        route: Route = AwaitRegistry(job.model)
        if self._registry_waiters >= self.max_registry_waiters:
            return route
        self._registry_waiters += 1
        try:
            while isinstance(route, AwaitRegistry) and job.remaining(self.clock()) > 0:
                await asyncio.sleep(REGISTRY_POLL)
                if self.cancellations.is_cancelled(job.request_id):
                    return None
                route = choose_route(job.model, self.registry.view(self.clock()), self.providers)
            return route
        finally:
            self._registry_waiters -= 1

    async def _answer_from_cache(self, hit: Hit) -> None:
        job, attempt = hit.job, new_attempt()
        if not job.stream:
            await self.reply.final(job, hit.payload, attempt=attempt)
            return
        writer = StreamWriter(job, self.reply, attempt=attempt, window=self.coalesce_window)
        await writer.send(hit.payload)
        await writer.end()

    async def _answer_dummy(self, job: Job, created: int) -> None:
        attempt = new_attempt()
        answer = dummy.DummyAnswer.for_request(job.body)
        if not job.stream:
            body = dummy.completion(job.request_id, job.model, created, answer)
            await self.reply.final(job, body, attempt=attempt)
            return
        writer = StreamWriter(job, self.reply, attempt=attempt, window=self.coalesce_window)
        events = dummy.stream_events(
            job.request_id, job.model, created, answer, include_usage=job.include_usage
        )
        await writer.send(b"".join(events))
        await writer.end()

    async def _hand_off(self, job: Job, spec: QueueSpec, deliveries: int | None = None) -> None:
        """Publish the job to a backend queue (agent or provider), confirmed; answer on refusal."""
        error = await self._publish_job(job, spec, deliveries=deliveries)
        if error is not None:
            await self.reply.error(job, error, attempt=new_attempt())

    async def _publish_job(
        self, job: Job, spec: QueueSpec, *, deliveries: int | None = None
    ) -> RouterError | None:
        """None once the broker confirmed the job; else the error that answers it.
        `deliveries`: the count a job queued again carries (`x-router-deliveries`)."""
        try:
            await self.ensure_queue(spec)
            now = self.clock()
            env = encode_job(job, now=now)
            env.headers[H_QUEUED_AT] = round(now * 1000)
            if deliveries is not None:
                env.headers[H_DELIVERIES] = deliveries
            await self.broker.publish(
                env,
                spec.name,
                persistent=self.topology.is_persistent,
                timeout=confirm_timeout(self.broker, job),
            )
        except QueueArgumentsError:  # logged by the declarer, with what the operator must do
            return ServiceUnavailableError(
                f"The router cannot queue requests for `{job.model}`: its configuration "
                "disagrees with the broker's queue.",
                code="queue_misconfigured",
            )
        except QueueFullError:
            return RateLimitError(
                f"Too many requests are waiting for `{job.model}`; retry shortly.",
                code="queue_full",
                headers={"retry-after": "1"},
            )
        except UnroutableError:
            return ServiceUnavailableError(
                f"The queue for `{job.model}` is missing; retry shortly.",
                headers={"retry-after": "1"},
            )
        return None

    # --- jobs that came back from an agent queue --------------------------------------------
    async def on_returned(self, env: Envelope, _: Delivery) -> None:
        job = decode_job(env)
        death = latest_death(env)
        died_in, reason = death.queue, death.reason
        if died_in != self.topology.agent_queue(job.model):
            # Only the model's own queue returns its jobs: an agent may put copies of a job
            # into its own queues, and one for another model expiring there must not be
            # answered 503 in the router's name (review 2026-11-29).
            log.warning(
                "returned job %s for %s dropped: it expired in %s, not its model's queue",
                job.request_id,
                job.model,
                died_in,
            )
            return
        if reason == "rejected":
            # Its agent gave up on it (a handler that failed twice, a crash loop it counted)
            # and answered the client itself.
            log.info("returned job %s dropped: rejected, and answered by its agent", job.request_id)
            return
        if job.remaining(self.clock()) <= 0 or self.cancellations.is_cancelled(job.request_id):
            log.info("returned job %s (%s) dropped: nobody waits", job.request_id, reason)
            return
        held = was_held(env, death, self.topology.agent_queue_ttl_ms / 1000)
        deliveries = delivery_count(env)
        if held and deliveries < self.topology.delivery_limit:
            await self._queue_again(job, deliveries + 1)
            return
        log.info("job %s returned from its agent queue (%s)", job.request_id, reason)
        # Past a delivery limit (the quorum queue's, or ours for a job held and handed back),
        # it crashed its agents or was handed back by them (paused, stopping) too often: the
        # queue counts both alike, so still a 503. A count past 1: an agent held it before
        # (it died, and no agent took the job again).
        held = held or reason == "delivery_limit" or deliveries > 1
        what = "could finish the request" if held else "took the request"
        error = ServiceUnavailableError(
            f"No agent serving `{job.model}` {what} in time; retry shortly.",
            code="no_agent_available",
            headers={"retry-after": "1"},
        )
        await self.reply.error(job, error, attempt=new_attempt())

    async def _queue_again(self, job: Job, delivery: int) -> None:
        """A job its agent held, then died or handed back, came back expired (see
        services/dispatcher/returns.py): it never waited out its queue's TTL, so it goes back
        with a fresh one, counted, to a live agent of its model."""
        route = choose_route(job.model, self.registry.view(self.clock()), self.providers)
        if isinstance(route, Refuse):
            await self.reply.error(job, route.error, attempt=new_attempt())
            return
        if not isinstance(route, ToAgent):  # still warming up: nothing known to send it to
            await self.reply.error(job, warming_up_error(), attempt=new_attempt())
            return
        log.info(
            "job %s came back from an agent that held it: queued again (delivery %d)",
            job.request_id,
            delivery,
        )
        await self._hand_off(job, self.topology.agent_queue_spec(route.model), delivery)

    # --- control, cancel, rpc ----------------------------------------------------------------
    async def on_control(self, env: Envelope, _: Delivery) -> None:
        record = self.registry.record(decode_control(env), self.clock())
        for model in record.models:
            with contextlib.suppress(QueueArgumentsError):  # logged once, by the declarer
                await self.ensure_queue(self.topology.agent_queue_spec(model))

    async def on_cancel(self, env: Envelope, _: Delivery) -> None:
        request_id = decode_cancel(env)
        self.cancellations.cancel(request_id, self.clock())
        if self.cache is not None:
            await self.cache.on_cancel(request_id)

    async def on_rpc(self, env: Envelope, _: Delivery) -> None:
        if not env.reply_to or not env.correlation_id:
            return
        now = self.clock()
        provider_models = self.provider_models()
        asked = _header_text(env, H_MODEL)
        if asked and is_listed_alias(asked, provider_models, self.providers):
            provider_models = [*provider_models, asked]
        body = model_list(self.registry.view(now), provider_models, int(now))
        try:
            await self.broker.publish(
                encode_rpc_result(env.correlation_id, body),
                env.reply_to,
                exchange=self.topology.replies_exchange,
            )
        except UnroutableError:
            log.info("rpc asker %s is gone", env.reply_to)
