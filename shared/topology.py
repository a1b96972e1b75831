"""Every exchange and queue name and its arguments, as frozen data, and `declare_topology()`.

Names carry the schema version and the durability mode (`router.v1.durable.jobs`): RabbitMQ
refuses to re-declare a queue with other arguments, so a build that changes them (or a switch
of mode) gets fresh names instead of a PRECONDITION_FAILED against queues an older build left.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue, ExchangeType
from aio_pika.exceptions import ChannelNotFoundEntity, ChannelPreconditionFailed
from aiormq.exceptions import ChannelAccessRefused

from shared.errors import BrokerEntityMissingError
from shared.runner import StartupError
from shared.settings import BrokerSettings, Durability

SCHEMA_VERSION = "v1"

# A model name becomes part of a queue name: keep it to a safe charset and length.
MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$")
# Dispatchers hear every cancel; an agent binds the routing keys of its own models.
EVERY_CANCEL = "#"


def cancel_routing_key(model: str) -> str:
    """A cancel's routing key on the cancel exchange: the request's model. The names agents
    serve (MODEL_NAME_RE) hold no topic wildcard, so an agent binds its models' keys as they
    are; a name too long for a routing key (255 bytes) reaches the dispatchers alone."""
    return model if len(model.encode()) <= 255 else ""


@dataclass(frozen=True)
class QueueSpec:
    name: str
    durable: bool
    arguments: dict[str, Any] = field(default_factory=dict)
    auto_delete: bool = False
    exclusive: bool = False


@dataclass(frozen=True)
class Topology:
    """Names and arguments for one namespace and durability mode.

    `jobs_max_length` bounds the jobs queue (`reject-publish`: a full queue refuses new jobs,
    it never drops accepted ones). `agent_queue_ttl_ms` bounds how long a job may wait for an
    agent before it is dead-lettered back to a dispatcher, which answers 503.
    """

    namespace: str = "router"
    mode: Durability = Durability.DURABLE
    jobs_max_length: int = 10_000
    agent_queue_max_length: int = 1_000
    agent_queue_ttl_ms: int = 30_000
    reply_queue_expires_ms: int = 60_000
    delivery_limit: int = 5

    @property
    def prefix(self) -> str:
        return f"{self.namespace}.{SCHEMA_VERSION}.{self.mode.value}"

    # --- exchanges -------------------------------------------------------------------------
    @property
    def control_exchange(self) -> str:
        """Fanout: agent registrations and heartbeats, one copy to every dispatcher."""
        return f"{self.prefix}.control"

    @property
    def cancel_exchange(self) -> str:
        """Topic: request ids whose client went away, routed by the request's model. Agents
        bind their own models, dispatchers everything (`#`): a fanout cost the broker a copy
        per agent of the whole fleet for every cancel."""
        return f"{self.prefix}.cancels"

    @property
    def completed_exchange(self) -> str:
        """Fanout: finished cacheable answers (`job.completed`), for the cache writer."""
        return f"{self.prefix}.completed"

    @property
    def replies_exchange(self) -> str:
        """Direct: every reply, routed by reply-queue name. Agents may publish here and nowhere
        else that reaches a client, and the broker stamps their `user_id` (see `broker_acl`)."""
        return f"{self.prefix}.replies"

    @property
    def requeue_exchange(self) -> str:
        """Topic: a counted copy of a redelivered job back into its own queue (routing key =
        the queue's name), for the queues dispatchers consume (`jobs`, provider queues)."""
        return f"{self.prefix}.requeue"

    def agent_requeue_exchange(self, model: str) -> str:
        """Fanout, bound to the model's agent queue alone: where its agents send counted
        copies. One per model, not the shared `requeue` with a topic permission: RabbitMQ
        does not check topic permissions on exchange-to-exchange routing, so an agent that
        bound an exchange of its own to `requeue` could route a job into any queue."""
        return f"{self.prefix}.requeue.agent.{model}"

    def requeue_route(self, queue_name: str) -> tuple[str, str]:
        """(exchange, routing key) of a counted copy of a message redelivered from
        `queue_name`."""
        agent_queues = f"{self.prefix}.agent."
        if queue_name.startswith(agent_queues):
            return self.agent_requeue_exchange(queue_name[len(agent_queues) :]), ""
        return self.requeue_exchange, queue_name

    @property
    def dead_letter_exchange(self) -> str:
        """Direct: poison jobs (to the dead queue) and agent-queue returns."""
        return f"{self.prefix}.dlx"

    # --- shared queues ---------------------------------------------------------------------
    @property
    def jobs_queue(self) -> str:
        return f"{self.prefix}.jobs"

    @property
    def rpc_queue(self) -> str:
        """Small questions any dispatcher answers (the model list)."""
        return f"{self.prefix}.rpc"

    @property
    def returns_queue(self) -> str:
        """Jobs that waited too long in an agent queue, or that an agent refused."""
        return f"{self.prefix}.returns"

    @property
    def dead_queue(self) -> str:
        """Parking lot for undecodable and crash-looping messages, for a human to inspect."""
        return f"{self.prefix}.dead"

    @property
    def completed_queue(self) -> str:
        return f"{self.prefix}.completed"

    def agent_queue(self, model: str) -> str:
        return f"{self.prefix}.agent.{model}"

    def provider_queue(self, provider: str) -> str:
        return f"{self.prefix}.provider.{provider}"

    def reply_queue(self, process_id: str) -> str:
        return f"{self.prefix}.reply.{process_id}"

    def private_queue(self, purpose: str, process_id: str) -> str:
        """A process's own queue bound to the control fanout or the cancel exchange."""
        return f"{self.prefix}.{purpose}.{process_id}"

    # --- queue specs -----------------------------------------------------------------------
    @property
    def redelivery_limit(self) -> int:
        """Deliveries a consumer counts itself (0 where the queue counts: quorum)."""
        return 0 if self.mode is Durability.QUORUM else self.delivery_limit

    @property
    def is_persistent(self) -> bool:
        return self.mode is not Durability.TRANSIENT

    def _work_queue(self, name: str, *, max_length: int, extra: dict[str, Any]) -> QueueSpec:
        """A queue of jobs: bounded, refusing (not dropping) when full, dead-lettering poison."""
        args: dict[str, Any] = {
            "x-max-length": max_length,
            "x-overflow": "reject-publish",
            **extra,
        }
        if self.mode is Durability.QUORUM:
            args["x-queue-type"] = "quorum"
            args["x-delivery-limit"] = self.delivery_limit
        return QueueSpec(name=name, durable=self.is_persistent, arguments=args)

    def jobs_queue_spec(self) -> QueueSpec:
        return self._work_queue(
            self.jobs_queue,
            max_length=self.jobs_max_length,
            extra={
                "x-dead-letter-exchange": self.dead_letter_exchange,
                "x-dead-letter-routing-key": self.dead_queue,
            },
        )

    def provider_queue_spec(self, provider: str) -> QueueSpec:
        return self._work_queue(
            self.provider_queue(provider),
            max_length=self.jobs_max_length,
            extra={
                "x-dead-letter-exchange": self.dead_letter_exchange,
                "x-dead-letter-routing-key": self.dead_queue,
            },
        )

    def agent_queue_spec(self, model: str) -> QueueSpec:
        if not MODEL_NAME_RE.fullmatch(model):
            raise ValueError(f"model name not allowed in a queue name: {model!r}")
        return self._work_queue(
            self.agent_queue(model),
            max_length=self.agent_queue_max_length,
            extra={
                # A job nobody takes in time goes back to a dispatcher, which answers 503.
                "x-message-ttl": self.agent_queue_ttl_ms,
                "x-dead-letter-exchange": self.dead_letter_exchange,
                "x-dead-letter-routing-key": self.returns_queue,
            },
        )

    def rpc_queue_spec(self) -> QueueSpec:
        # RPC questions are cheap to ask again: never persistent, never kept long.
        return QueueSpec(
            name=self.rpc_queue, durable=self.is_persistent, arguments={"x-message-ttl": 10_000}
        )

    def returns_queue_spec(self) -> QueueSpec:
        return QueueSpec(name=self.returns_queue, durable=self.is_persistent)

    def dead_queue_spec(self) -> QueueSpec:
        return QueueSpec(
            name=self.dead_queue,
            durable=self.is_persistent,
            arguments={"x-max-length": 10_000, "x-message-ttl": 86_400_000},
        )

    def completed_queue_spec(self) -> QueueSpec:
        return QueueSpec(
            name=self.completed_queue,
            durable=self.is_persistent,
            arguments={"x-max-length": 10_000, "x-overflow": "drop-head"},
        )

    def reply_queue_spec(self, process_id: str) -> QueueSpec:
        """One reply queue per API process.

        `durable` and `quorum` modes keep it durable with `x-expires`, so a reply published
        during a broker restart still reaches a living API process; a dead process's queue
        goes away by itself.
        """
        name = self.reply_queue(process_id)
        if self.is_persistent:
            return QueueSpec(
                name=name, durable=True, arguments={"x-expires": self.reply_queue_expires_ms}
            )
        return QueueSpec(name=name, durable=False, exclusive=True, auto_delete=True)

    def private_queue_spec(self, purpose: str, process_id: str) -> QueueSpec:
        """Fanout subscriptions are per process and need no durability: state converges."""
        return QueueSpec(
            name=self.private_queue(purpose, process_id),
            durable=False,
            exclusive=True,
            auto_delete=True,
        )


def topology_for(settings: BrokerSettings) -> Topology:
    """The topology every service derives from the same settings, so queue arguments agree."""
    return Topology(
        namespace=settings.broker_namespace,
        mode=settings.durability,
        agent_queue_ttl_ms=int(settings.agent_queue_ttl * 1000),
    )


class QueueArgumentsError(StartupError):
    """A queue exists with other arguments than this service declares it with: the services
    disagree on a setting that is part of them (AGENT_QUEUE_TTL), or the queue predates a
    change of it. Nothing this service does can use that queue until an operator acts."""


class BrokerRefusedError(StartupError):
    """The broker refused what a service needs to start: its user lacks a permission, or a
    name exists with other properties. Retrying cannot help; an operator must act."""


SERVICE_GRANTS_HINT = (
    "the permissions `router broker-acl` prints are made for one BROKER_NAMESPACE and "
    "DURABILITY: run it with this service's"
)


@contextlib.contextmanager
def broker_refusals_stop_start(hint: str = SERVICE_GRANTS_HINT) -> Iterator[None]:
    """A refusal raised inside becomes a `BrokerRefusedError` (one `cannot start` line, exit
    code 1, not aiormq's traceback): the broker's own words name the resource and the user;
    `hint` says what to check when a permission is missing."""
    try:
        yield
    except ChannelAccessRefused as e:
        raise BrokerRefusedError(f"the broker refused: {e} ({hint})") from e
    except ChannelPreconditionFailed as e:  # a name that exists with other properties
        raise BrokerRefusedError(f"the broker refused: {e}") from e


async def declare_queue(
    channel: AbstractChannel, spec: QueueSpec, *, passive: bool = False
) -> AbstractQueue:
    """Declare a queue, or with `passive` only check that it exists (needs no configure right;
    raises BrokerEntityMissingError if it does not). Either failure closes the channel."""
    if passive:
        try:
            return await channel.declare_queue(spec.name, passive=True)
        except ChannelNotFoundEntity as e:
            raise BrokerEntityMissingError(_missing(f"queue {spec.name}")) from e
    try:
        return await channel.declare_queue(
            spec.name,
            durable=spec.durable,
            exclusive=spec.exclusive,
            auto_delete=spec.auto_delete,
            arguments=spec.arguments,
        )
    except ChannelPreconditionFailed as e:
        raise QueueArgumentsError(
            f"queue {spec.name} exists with other arguments ({e.args[0] if e.args else e}): "
            "every service must use the same AGENT_QUEUE_TTL; fix the setting, or delete the "
            "queue (and the jobs in it) to change it"
        ) from e


async def declare_exchanges(
    channel: AbstractChannel, topology: Topology, *, passive: bool = False
) -> dict[str, AbstractExchange]:
    durable = topology.is_persistent
    kinds = {
        topology.control_exchange: ExchangeType.FANOUT,
        topology.cancel_exchange: ExchangeType.TOPIC,
        topology.completed_exchange: ExchangeType.FANOUT,
        topology.replies_exchange: ExchangeType.DIRECT,
        topology.requeue_exchange: ExchangeType.TOPIC,
        topology.dead_letter_exchange: ExchangeType.DIRECT,
    }
    exchanges = {}
    for name, kind in kinds.items():
        try:
            exchanges[name] = await channel.declare_exchange(
                name, kind, durable=durable, passive=passive
            )
        except ChannelNotFoundEntity as e:
            raise BrokerEntityMissingError(_missing(f"exchange {name}")) from e
    return exchanges


def _missing(what: str) -> str:
    return f"{what} does not exist: declare the topology with `router topology` (admin user)"


async def declare_topology(
    channel: AbstractChannel, topology: Topology, *, passive: bool = False
) -> None:
    """Declare the shared exchanges and queues (idempotent; every service may call it).

    With `passive`, only check they exist: under least privilege (`DECLARE_TOPOLOGY=false`)
    services may not create shared names; `router topology` does, once, with admin rights.
    """
    exchanges = await declare_exchanges(channel, topology, passive=passive)
    specs = (
        topology.jobs_queue_spec(),
        topology.rpc_queue_spec(),
        topology.returns_queue_spec(),
        topology.dead_queue_spec(),
        topology.completed_queue_spec(),
    )
    queues = {spec.name: await declare_queue(channel, spec, passive=passive) for spec in specs}
    if passive:
        return
    dlx = exchanges[topology.dead_letter_exchange]
    await queues[topology.returns_queue].bind(dlx, routing_key=topology.returns_queue)
    await queues[topology.dead_queue].bind(dlx, routing_key=topology.dead_queue)
    await queues[topology.completed_queue].bind(exchanges[topology.completed_exchange])
    jobs = queues[topology.jobs_queue]
    await jobs.bind(exchanges[topology.requeue_exchange], routing_key=jobs.name)


async def declare_work_queue(
    channel: AbstractChannel, topology: Topology, spec: QueueSpec, *, passive: bool = False
) -> AbstractQueue:
    """An agent or provider queue, with its route back for counted copies."""
    queue = await declare_queue(channel, spec, passive=passive)
    await declare_requeue_route(channel, topology, queue, passive=passive)
    return queue


async def declare_requeue_route(
    channel: AbstractChannel, topology: Topology, queue: AbstractQueue, *, passive: bool = False
) -> None:
    """Bind `queue` where its counted copies go (`Topology.requeue_route`), declaring an agent
    queue's own exchange first; with `passive`, only check that exchange exists (a copy
    published to a missing exchange would close the publishing channel)."""
    exchange, routing_key = topology.requeue_route(queue.name)
    if exchange != topology.requeue_exchange:
        try:
            await channel.declare_exchange(
                exchange, ExchangeType.FANOUT, durable=topology.is_persistent, passive=passive
            )
        except ChannelNotFoundEntity as e:
            raise BrokerEntityMissingError(_missing(f"exchange {exchange}")) from e
    if not passive:
        await queue.bind(exchange, routing_key=routing_key)


def message_delivery_mode(topology: Topology) -> aio_pika.DeliveryMode:
    if topology.is_persistent:
        return aio_pika.DeliveryMode.PERSISTENT
    return aio_pika.DeliveryMode.NOT_PERSISTENT
