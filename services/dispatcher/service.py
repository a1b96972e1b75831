"""The dispatcher process: wiring consumers to the handler, and its lifecycle.

Start: connect, declare the topology, load the registry, consume. Stop (SIGTERM): cancel the
consumers (no new intake), let in-flight jobs finish within `drain_timeout`, then close.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

from aio_pika.abc import AbstractChannel

from services.dispatcher.handler import DispatcherHandler
from services.dispatcher.registry import AgentTable, Registry, SqliteStore
from services.dispatcher.settings import DispatcherSettings
from shared.amqp import Broker
from shared.cancel import Cancellations
from shared.topology import QueueSpec, Topology, declare_queue, declare_topology

log = logging.getLogger(__name__)


def topology_for(settings: DispatcherSettings) -> Topology:
    return Topology(
        namespace=settings.broker_namespace,
        mode=settings.durability,
        agent_queue_ttl_ms=int(settings.agent_queue_ttl * 1000),
    )


class QueueDeclarer:
    """Declares backend queues once per process (they are created on first use)."""

    def __init__(self, channel: AbstractChannel) -> None:
        self._channel = channel
        self._declared: set[str] = set()

    async def __call__(self, spec: QueueSpec) -> None:
        if spec.name not in self._declared:
            await declare_queue(self._channel, spec)
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
        )
        self.registry = Registry(
            AgentTable(settings.heartbeat_ttl), SqliteStore(settings.registry_path)
        )
        self.cancellations = Cancellations()

    async def start(self) -> None:
        await self.broker.connect()
        control_channel = await self.broker.channel(prefetch=256)
        await declare_topology(control_channel, self.topology)
        handler = DispatcherHandler(
            topology=self.topology,
            broker=self.broker,
            registry=self.registry,
            cancellations=self.cancellations,
            ensure_queue=QueueDeclarer(control_channel),
            coalesce_window=self.settings.stream_coalesce_ms / 1000,
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
        await self.broker.consume(control_channel, control, handler.on_control)
        cancel = await declare_queue(
            control_channel, t.private_queue_spec("cancel", self.process_id)
        )
        await cancel.bind(exchanges[t.cancel_exchange])
        await self.broker.consume(control_channel, cancel, handler.on_cancel)
        await self.broker.consume(control_channel, t.rpc_queue_spec(), handler.on_rpc)
        await self.broker.consume(control_channel, t.returns_queue_spec(), handler.on_returned)
        jobs_channel = await self.broker.channel(prefetch=self.settings.dispatcher_prefetch)
        await self.broker.consume(jobs_channel, t.jobs_queue_spec(), handler.on_job)
        log.info(
            "dispatcher %s consuming %s (%s mode, %d agents known)",
            self.process_id,
            t.jobs_queue,
            t.mode.value,
            len(self.registry.table),
        )

    async def stop(self) -> None:
        await self.broker.stop_consuming()
        await self.broker.drain(self.settings.drain_timeout)
        await self.broker.close()
        self.registry.close()


async def run(settings: DispatcherSettings, stop: asyncio.Event) -> None:
    service = DispatcherService(settings)
    await service.start()
    try:
        await stop.wait()
    finally:
        log.info("dispatcher %s stopping", service.process_id)
        await service.stop()
