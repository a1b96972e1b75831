"""The dispatcher process: wiring consumers to the handler, and its lifecycle.

Start: connect, declare the topology, load the registry, consume. Stop (SIGTERM): cancel the
consumers (no new intake), let in-flight jobs finish within `drain_timeout`, then close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

from aio_pika.abc import AbstractChannel, AbstractRobustChannel

from services.dispatcher.cache import cache_for
from services.dispatcher.handler import DispatcherHandler
from services.dispatcher.providers.runtime import ProviderRuntime
from services.dispatcher.registry import AgentTable, Registry, SqliteStore
from services.dispatcher.settings import DispatcherSettings
from shared import health
from shared.amqp import Broker
from shared.cancel import Cancellations
from shared.errors import BrokerUnavailableError, RouterError
from shared.topology import (
    EVERY_CANCEL,
    QueueArgumentsError,
    QueueSpec,
    broker_refusals_stop_start,
    declare_queue,
    declare_topology,
    topology_for,
)

log = logging.getLogger(__name__)


class QueueDeclarer:
    """Declares backend queues once per process (they are created on first use).

    Disabled under least privilege (`DECLARE_TOPOLOGY=false`): `router topology` declared
    them, and a job for a queue that does not exist is unroutable, which answers 503.

    A queue that exists with other arguments (`QueueArgumentsError`: this dispatcher's
    AGENT_QUEUE_TTL is not the one it was made with) is logged once and refused from then on
    without asking the broker again: each refusal closes the channel it was asked on, so the
    declares get a channel of their own, apart from the registry's consumers.
    """

    def __init__(
        self, channel: AbstractChannel, *, enabled: bool = True, timeout: float = 5.0
    ) -> None:
        self._channel = channel
        self._enabled = enabled
        self._timeout = timeout
        self._declared: set[str] = set()
        self._refused: dict[str, QueueArgumentsError] = {}
        # One declare per queue at a time: a heartbeat and a job asking together would both
        # be refused (and log it twice).
        self._declaring: dict[str, asyncio.Lock] = {}

    async def __call__(self, spec: QueueSpec) -> None:
        if not self._enabled or spec.name in self._declared:
            return
        async with self._declaring.setdefault(spec.name, asyncio.Lock()):
            await self._declare_once(spec)

    async def _declare_once(self, spec: QueueSpec) -> None:
        if spec.name in self._declared:
            return
        if spec.name in self._refused:
            raise self._refused[spec.name]
        # On a job's path: a broker that stops answering must fail the job's handling within
        # the publish timeout, as a publish does (it goes back to its queue), not hold its delivery
        # until the connection is judged dead minutes later.
        try:
            async with asyncio.timeout(self._timeout):
                await declare_queue(self._channel, spec)
        except TimeoutError as e:
            raise BrokerUnavailableError(
                f"The broker did not declare {spec.name} within {self._timeout:g} s."
            ) from e
        except QueueArgumentsError as e:
            log.error("%s; its model's jobs are refused until then", e)
            self._refused[spec.name] = e
            raise
        self._declared.add(spec.name)


class DispatcherService:
    def __init__(self, settings: DispatcherSettings) -> None:
        self.settings = settings
        self.topology = topology_for(settings)
        self.process_id = uuid.uuid4().hex[:12]
        self.broker = Broker(
            settings.rabbitmq_url,
            name=f"dispatcher-{self.process_id}",
            publish_timeout=settings.publish_timeout,
            declare_shared=settings.declare_topology,
            requeue_via=self.topology,
        )
        self.registry = Registry(
            AgentTable(settings.heartbeat_ttl),
            SqliteStore(settings.registry_path),
            forget_after=settings.agent_forget_after,
        )
        self.cancellations = Cancellations()
        self.cache = cache_for(settings, cancellations=self.cancellations)
        self.providers = ProviderRuntime.from_settings(settings)
        self.handler: DispatcherHandler | None = None

    async def start(self) -> None:
        await self.broker.connect()
        control_channel = await self.broker.channel(prefetch=256)
        await declare_topology(
            control_channel, self.topology, passive=not self.settings.declare_topology
        )
        self.handler = handler = DispatcherHandler(
            topology=self.topology,
            broker=self.broker,
            registry=self.registry,
            cancellations=self.cancellations,
            ensure_queue=QueueDeclarer(
                await self.broker.channel(),
                enabled=self.settings.declare_topology,
                timeout=self.settings.publish_timeout,
            ),
            providers=self.providers.rules,
            provider_models=self.providers.models,
            coalesce_window=self.settings.stream_coalesce_ms / 1000,
            cache=self.cache,
            max_reply_bytes=self.settings.max_reply_bytes,
            # A quarter: the cache's single-flight waiters may hold half the prefetch beside.
            max_registry_waiters=self.settings.dispatcher_prefetch // 4,
        )
        t = self.topology
        exchanges = {
            name: await control_channel.get_exchange(name)
            for name in (t.control_exchange, t.cancel_exchange)
        }
        # Registry and cancels first, so jobs are routed on a registry that is up to date.
        control = await declare_queue(
            control_channel, t.private_queue_spec("control", self.process_id)
        )
        await control.bind(exchanges[t.control_exchange])
        await self.broker.consume(control_channel, control, handler.on_control, intake=False)
        self._warm_up_while_listening(control_channel)
        cancel = await declare_queue(
            control_channel, t.private_queue_spec("cancel", self.process_id)
        )
        await cancel.bind(exchanges[t.cancel_exchange], routing_key=EVERY_CANCEL)
        await self.broker.consume(control_channel, cancel, handler.on_cancel, intake=False)
        await self.broker.consume(control_channel, t.rpc_queue_spec(), handler.on_rpc)
        await self.broker.consume(
            control_channel, t.returns_queue_spec(), handler.on_returned, on_give_up=handler.give_up
        )
        if self.cache.is_active:
            # Auto-ack: a cache write is best effort (acked either way), so an ack frame per
            # answered request would buy nothing. Each write is bounded by CACHE_TIMEOUT_MS.
            await self.broker.consume(
                control_channel, t.completed_queue_spec(), self.cache.on_completed, no_ack=True
            )
        # Provider calls last long: their own queues, channels and prefetch (no head-of-line).
        await self.providers.start(
            self.broker,
            t,
            reply=handler.reply,
            cancellations=self.cancellations,
            prefetch=self.settings.provider_prefetch,
            coalesce_window=self.settings.stream_coalesce_ms / 1000,
        )
        jobs_channel = await self.broker.channel(prefetch=self.settings.dispatcher_prefetch)
        await self.broker.consume(
            jobs_channel,
            t.jobs_queue_spec(),
            handler.on_job,
            redelivery_limit=t.redelivery_limit,
            on_give_up=handler.give_up,
        )
        log.info(
            "dispatcher %s consuming %s (%s mode, %d agents known)",
            self.process_id,
            t.jobs_queue,
            t.mode.value,
            len(self.registry.table),
        )

    def _warm_up_while_listening(self, control_channel: AbstractChannel) -> None:
        """Warm the registry up from now, when its control consumer consumes, and again each
        time the channel comes back after a loss: the control queue is exclusive, so whatever
        agents announced while this dispatcher was cut off never reaches it (however long the
        outage, and even if none of its agents expired meanwhile)."""
        assert isinstance(control_channel, AbstractRobustChannel)  # the Broker's are robust
        table = self.registry.table
        table.start_listening(time.time())
        control_channel.close_callbacks.add(lambda *_: table.stop_listening(time.time()))
        control_channel.reopen_callbacks.add(lambda *_: table.start_listening(time.time()))

    def status(self) -> dict[str, object]:
        return {
            "service": "dispatcher",
            "id": self.process_id,
            "agents": len(self.registry.table),
            "consuming": self.broker.is_consuming,
        }

    async def stop(self) -> None:
        await self.broker.stop_consuming(intake_only=True)
        await self.broker.drain(self.settings.drain_timeout)
        await self.providers.aclose()
        if self.handler is not None:
            await self.handler.reply.flush()
        await self.broker.close()
        await self.cache.aclose()
        self.registry.close()
        log.info("dispatcher %s stopped", self.process_id)


async def run(settings: DispatcherSettings, stop: asyncio.Event) -> None:
    """Serve until `stop`; a broker that is down at start is waited for, not fatal."""
    service = DispatcherService(settings)
    runner = None
    if settings.health_port:
        app = health.create_app(service.status, lambda: service.broker.is_consuming)
        runner, _ = await health.serve(
            app, settings.health_host, settings.health_port, setting="HEALTH_PORT"
        )
    try:
        while not stop.is_set():
            try:
                with broker_refusals_stop_start():  # a missing permission is no outage
                    await service.start()
                break
            except RouterError as e:
                log.warning("dispatcher cannot start yet (%s); retrying in 2 s", e.message)
                await service.broker.close()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 2.0)
        await stop.wait()
    finally:
        log.info("dispatcher %s stopping", service.process_id)
        await service.stop()
        if runner is not None:
            await runner.cleanup()
