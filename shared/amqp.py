"""The one module that talks aio-pika: connections, publishing with confirms, consuming.

Each service holds two robust connections: RabbitMQ blocks every publishing connection during a
memory or disk alarm, acks included, so consumers keep acking on their own connection. Every
publish waits for the broker's confirm within `publish_timeout` (a publish can hang while
aio-pika reconnects) and maps failures to the router's errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, cast

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractQueue,
    AbstractRobustConnection,
)
from aio_pika.exceptions import (
    CONNECTION_EXCEPTIONS,
    ChannelInvalidStateError,
    DeliveryError,
    PublishError,
)
from aiormq import spec
from aiormq.abc import DeliveredMessage
from yarl import URL

from shared import amqp_writes
from shared.acks import AckBatcher
from shared.errors import (
    BrokerUnavailableError,
    QueueFullError,
    ReplyQueueGoneError,
    UnroutableError,
)
from shared.messages import H_DELIVERIES, H_QUEUED_AT, Envelope, MessageDecodeError
from shared.topology import QueueSpec, Topology, declare_queue, declare_requeue_route

log = logging.getLogger(__name__)

amqp_writes.install()  # frames queued in one turn of the loop leave in one socket write


def to_properties(env: Envelope, *, persistent: bool, user_id: str | None) -> spec.Basic.Properties:
    """The properties of a publish, built directly: aio-pika's Message would cost a
    frozen-checked object and a second properties copy per publish."""
    return spec.Basic.Properties(
        headers=env.headers,
        delivery_mode=2 if persistent else 1,
        correlation_id=env.correlation_id,
        reply_to=env.reply_to,
        expiration=None if env.expiration_ms is None else str(env.expiration_ms),
        message_id=env.message_id,
        message_type=env.type,
        user_id=user_id,
    )


async def _publish(
    channel: AbstractChannel,
    env: Envelope,
    exchange: str,
    routing_key: str,
    *,
    persistent: bool,
    user_id: str | None,
    timeout: float,
    mandatory: bool = True,
) -> None:
    """Publish on `channel`'s aiormq channel and wait for the confirm (aio-pika's own
    `Exchange.publish` does the same, after building a Message). Raises aiormq's errors:
    PublishError (returned), DeliveryError (nacked), ChannelInvalidStateError.

    `wait=False`: aiormq otherwise also waits, holding the channel's lock, until its writer
    has sent the frames, so a channel sends one publish per turn of the event loop and no two
    share a socket write. The confirm already proves the frames left (a lost connection fails
    it), and the lock still orders the frames. Letting a turn's publishes leave together gave
    38% more requests/s at c=32 and a third less RabbitMQ CPU (bench/RESULTS.md)."""
    if channel.is_closed:
        raise ChannelInvalidStateError(f"{channel!r} closed")
    # aiormq's Channel: its abstract type does not declare `wait`.
    underlay = cast(aiormq.Channel, await channel.get_underlay_channel())
    await underlay.basic_publish(
        env.body,
        exchange=exchange,
        routing_key=routing_key,
        properties=to_properties(env, persistent=persistent, user_id=user_id),
        mandatory=mandatory,
        timeout=timeout,
        wait=False,
    )


class Settleable(Protocol):
    """The little of a consumed message that `Delivery` uses (`Received` gives it to aiormq's
    DeliveredMessage; tests give it to fakes)."""

    @property
    def redelivered(self) -> bool | None: ...

    @property
    def headers(self) -> Mapping[str, Any] | None: ...

    async def ack(self) -> None: ...

    async def ack_now(self) -> None: ...

    async def reject(self, requeue: bool = False) -> None: ...


class Received:
    """A message as aiormq delivered it, settled on its own channel; acked a moment later,
    with others (see shared.acks), unless `ack_now`."""

    __slots__ = ("_acks", "_message", "headers", "redelivered")

    def __init__(self, message: DeliveredMessage, acks: AckBatcher) -> None:
        self._message = message
        self._acks = acks
        self.headers = message.header.properties.headers
        self.redelivered = message.redelivered

    async def ack(self) -> None:
        self._acks.ack(self._message.channel, self._tag)

    async def ack_now(self) -> None:
        await self._message.channel.basic_ack(self._tag)

    async def reject(self, requeue: bool = False) -> None:
        await self._message.channel.basic_reject(self._tag, requeue=requeue)

    @property
    def _tag(self) -> int:
        tag = self._message.delivery_tag
        assert tag is not None, "a consumed message has a delivery tag"
        return tag


@dataclass
class Delivery:
    """What a handler may do with the message it was given, without seeing the AMQP client.

    `ack()` may be called by the handler (a streaming agent acks a stream that has sent output
    however it ends, even when cancelled); the consumer settles whatever the handler left
    unsettled when it returns.
    """

    _message: Settleable
    settled: bool = False

    @property
    def redelivered(self) -> bool:
        """Delivered before: by the broker's flag, or a copy the consumer counted (see
        `Broker.consume`'s `redelivery_limit`)."""
        headers = self._message.headers or {}
        return bool(self._message.redelivered) or H_DELIVERIES in headers

    async def ack(self) -> None:
        if not self.settled:
            self.settled = True
            await self._message.ack()

    async def ack_now(self) -> None:
        """Ack in the next write, before anything published after it on this channel."""
        if not self.settled:
            self.settled = True
            await self._message.ack_now()

    async def reject(self, *, requeue: bool) -> None:
        if not self.settled:
            self.settled = True
            await self._message.reject(requeue=requeue)


def envelope_of(message: DeliveredMessage) -> Envelope:
    properties = message.header.properties
    return Envelope(
        type=properties.message_type or "",
        body=message.body,
        headers=dict(properties.headers or {}),
        correlation_id=properties.correlation_id,
        reply_to=properties.reply_to,
        message_id=properties.message_id,
        user_id=properties.user_id,
    )


_RAW = "_router_raw_delivery"
# How long stopping waits for the broker to confirm consumer cancels: while it is away a robust
# channel would wait for its return, and a stopping process must end.
STOP_TIMEOUT = 2.0
# Seconds between AMQP heartbeats, unless the URL sets `heartbeat`. A peer silent for three of
# them is dead: 48 s for a connection that hangs (a dropped route, an expired NAT entry) rather
# than closes, against 3 minutes on RabbitMQ's default of 60, with publishes waiting on it.
HEARTBEAT = 15


def _deliver_raw() -> None:
    """Let consumers marked `_RAW` take aiormq's DeliveredMessage, in aiormq's own task.

    aio-pika wraps every delivery in an IncomingMessage (some thirty checked attribute writes)
    and runs the callback in a second task: a tenth of a consumer's time per message, for
    nothing our handlers use. Its robust queues keep re-consuming through the same function,
    so recovery after a reconnect or a deleted queue is unchanged.
    """
    original = aio_pika.queue.consumer
    if getattr(original, _RAW, False):
        return

    async def consumer(
        callback: Callable[..., Any], message: DeliveredMessage, **kwargs: Any
    ) -> Any:
        if getattr(callback, _RAW, False):
            return await callback(message)
        return await original(callback, message, **kwargs)

    setattr(consumer, _RAW, True)
    aio_pika.queue.consumer = consumer  # type: ignore[assignment]


_deliver_raw()


Handler = Callable[[Envelope, Delivery], Awaitable[None]]
# Told of a message its handler failed for good (see `Broker.consume`): a job's client can then
# hear of it now, instead of waiting out its deadline for an answer that will not come.
GiveUp = Callable[[Envelope, Exception], Awaitable[None]]


def _consumer_alive(queue: AbstractQueue, tag: str) -> bool:
    """The consumer is registered on its channel right now.

    The broker cancels a consumer whose queue is deleted, and the channel stays open: aio-pika
    re-declares the queue and consumes again under the same tag a moment later. Until then the
    tag is missing from the aiormq channel's consumers (aio-pika keeps that channel in
    `_channel`, which it exposes only through a coroutine)."""
    underlay = getattr(queue.channel, "_channel", None)
    return (
        underlay is not None and not queue.channel.is_closed and tag in underlay.channel.consumers
    )


def broker_address(url: str) -> str:
    """Where `url` points, for logs: `host:port, vhost v`, never its credentials."""
    parts = URL(url)
    port = parts.explicit_port or (5671 if parts.scheme == "amqps" else 5672)
    return f"{parts.host}:{port}, vhost {parts.path[1:] or '/'}"


class Broker:
    """Publishing and consuming connections of one service process."""

    def __init__(
        self,
        url: str,
        *,
        name: str,
        publish_timeout: float,
        declare_shared: bool = True,
        requeue_via: Topology | None = None,
    ) -> None:
        """`declare_shared=False` only passive-declares the queues given to `consume()` as
        specs (least privilege: `router topology` created them). Counted copies of redelivered
        messages go back through `requeue_via`'s routes (see `consume`)."""
        self._url = (
            url
            if "heartbeat" in URL(url).query
            else str(URL(url).update_query(heartbeat=HEARTBEAT))
        )
        self._name = name
        self.publish_timeout = publish_timeout
        self.declare_shared = declare_shared
        self._requeue_via = requeue_via
        # Every message carries the user it was published as; the broker refuses a mismatch,
        # so a receiver can trust `user_id` (see shared.reply_trust).
        self.user = URL(url).user or "guest"
        self._publish_conn: AbstractRobustConnection | None = None
        self._consume_conn: AbstractRobustConnection | None = None
        self._publish_channel: AbstractChannel | None = None
        self._consumers: list[tuple[AbstractQueue, str, bool]] = []  # queue, tag, is intake
        self._inflight: set[asyncio.Task[Any]] = set()
        self._acks = AckBatcher()
        self._lost_callbacks: list[Callable[[], None]] = []
        self._closing = False
        self._restored = False
        self._lost = False  # logged as lost, not yet as back
        self._address = broker_address(url)
        self._stopping = asyncio.Event()  # intake stopped: held messages go back at once

    def on_connection_lost(self, callback: Callable[[], None]) -> None:
        """Call `callback` whenever a connection drops (not on `close()`); it must not block."""
        self._lost_callbacks.append(callback)

    def _connection_closed(self, _: Any = None, exc: BaseException | None = None) -> None:
        self._restored = False
        if self._closing:
            return
        self._log_lost(exc)
        for callback in self._lost_callbacks:
            callback()

    def _connection_restored(self, *_: Any) -> None:
        # Fired by aio-pika after every channel was re-opened and its queues, bindings and
        # consumers re-declared: only now do reply queues exist again.
        self._restored = self.is_connected
        if self._restored and self._lost:
            self._lost = False
            log.info("%s: connected to the broker at %s again", self._name, self._address)

    def _log_lost(self, exc: BaseException | None) -> None:
        """One line per outage, however many connections it closed (the client library's own
        lines about it are DEBUG: see shared.logs.QuietReconnects)."""
        if self._lost:
            return
        self._lost = True
        log.warning(
            "%s: lost the broker at %s (%s); reconnecting every second",
            self._name,
            self._address,
            f"{type(exc).__name__}: {exc}" if exc is not None else "closed",
        )

    async def connect(self, timeout: float = 10.0) -> None:
        """Open both connections; raises BrokerUnavailableError if the broker does not answer."""
        try:
            self._closing = False
            self._lost = False
            self._stopping.clear()
            # Reconnect every second (aio-pika's default is 5 s): full service sooner.
            self._publish_conn = await aio_pika.connect_robust(
                self._url,
                timeout=timeout,
                reconnect_interval=1,
                client_properties={"connection_name": f"{self._name}/publish"},
            )
            self._consume_conn = await aio_pika.connect_robust(
                self._url,
                timeout=timeout,
                reconnect_interval=1,
                client_properties={"connection_name": f"{self._name}/consume"},
            )
            for conn in (self._publish_conn, self._consume_conn):
                conn.close_callbacks.add(self._connection_closed)
                conn.reconnect_callbacks.add(self._connection_restored)
            self._restored = True
            self._publish_channel = await self._publish_conn.channel(
                publisher_confirms=True, on_return_raises=True
            )
        except (*CONNECTION_EXCEPTIONS, TimeoutError) as e:
            await self.close()
            raise BrokerUnavailableError(
                f"cannot connect to the broker at {broker_address(self._url)}: {type(e).__name__}"
            ) from e

    @property
    def is_connected(self) -> bool:
        return all(
            conn is not None and not conn.is_closed and conn.connected.is_set()
            for conn in (self._publish_conn, self._consume_conn)
        )

    async def _hold(self, message: DeliveredMessage, delivery: Delivery, lifetime: float) -> None:
        """Hold a message whose handler the broker failed until publishing works again (at
        most `lifetime`, and no longer than intake runs), then send it back to its queue."""
        try:
            await self.publishing(max(self.publish_timeout, lifetime), stop=self._stopping)
        finally:  # a cancelled hold (the drain's end) gives the message back too
            log.warning(
                "%s %s back to its queue: the broker took no publish",
                message.header.properties.message_type,
                message.header.properties.correlation_id,
            )
            await _settle_quietly(delivery, requeue=True)

    def _can_publish(self) -> bool:
        conn, channel = self._publish_conn, self._publish_channel
        return (
            conn is not None
            and not conn.is_closed
            and conn.connected.is_set()
            and channel is not None
            and not channel.is_closed
        )

    async def publishing(self, timeout: float, *, stop: asyncio.Event | None = None) -> bool:
        """Whether publishing works, waiting up to `timeout` seconds (or until `stop` is set)
        for a lost publishing connection (and its channel) to come back. The two connections
        reconnect on their own: consuming may go on while nothing can be published."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self._can_publish():
            if loop.time() >= deadline or (stop is not None and stop.is_set()):
                return False
            await asyncio.sleep(0.1)
        return True

    async def channel(self, *, prefetch: int | None = None) -> AbstractChannel:
        """A new channel on the consuming connection (for declaring and consuming)."""
        assert self._consume_conn is not None, "connect() first"
        channel = await self._consume_conn.channel()
        if prefetch is not None:
            await channel.set_qos(prefetch_count=prefetch)
        return channel

    async def publish(
        self,
        env: Envelope,
        routing_key: str,
        *,
        exchange: str = "",
        mandatory: bool = True,
        persistent: bool = False,
        timeout: float | None = None,
    ) -> None:
        """Publish and wait for the broker's confirm, `timeout` seconds at most (by default
        `publish_timeout`).

        Raises QueueFullError when the broker nacks (a bounded queue refusing), UnroutableError
        when a mandatory message reached no queue, and BrokerUnavailableError on timeout or a
        lost connection.
        """
        channel = self._publish_channel
        if channel is None:
            raise BrokerUnavailableError()
        try:
            await _publish(
                channel,
                env,
                exchange,
                routing_key,
                persistent=persistent,
                user_id=self.user,
                mandatory=mandatory,
                timeout=self.publish_timeout if timeout is None else timeout,
            )
        except PublishError as e:
            raise UnroutableError(f"no queue for {routing_key!r}") from e
        except DeliveryError as e:
            raise QueueFullError() from e
        except (TimeoutError, ChannelInvalidStateError, *CONNECTION_EXCEPTIONS) as e:
            raise BrokerUnavailableError() from e
        except asyncio.CancelledError as e:
            # aiormq fails the confirms of a connection its heartbeats found dead (one that
            # hung rather than closed) with CancelledError: a lost connection, unless this
            # task itself is being cancelled.
            task = asyncio.current_task()
            if task is None or task.cancelling():
                raise
            raise BrokerUnavailableError() from e

    async def declare(self, channel: AbstractChannel, spec: QueueSpec) -> AbstractQueue:
        """Declare `spec`, or only check it exists when services may not declare shared names;
        a missing queue raises BrokerEntityMissingError (and closes `channel`)."""
        return await declare_queue(channel, spec, passive=not self.declare_shared)

    async def consume(
        self,
        channel: AbstractChannel,
        spec: QueueSpec | AbstractQueue,
        handler: Handler,
        *,
        no_ack: bool = False,
        intake: bool = True,
        redelivery_limit: int = 0,
        on_give_up: GiveUp | None = None,
    ) -> AbstractQueue:
        """Consume a queue: each message runs `handler` in its own task.

        An undecodable message (MessageDecodeError) is rejected without requeue, into the
        dead-letter queue. Any other exception requeues the message once; a redelivered message
        that fails again is rejected, so a crash-looping message never loops. `intake=False`
        marks a consumer that must outlive `stop_consuming(intake_only=True)` (cancels).

        `redelivery_limit` counts deliveries where the queue cannot (classic queues have no
        delivery limit): a redelivered message, such as one whose consumer died holding it,
        is republished with its count in `x-router-deliveries` and the original acked; past
        the limit it is rejected into the dead-letter queue. So a message that crashes its
        consumer process every time ends parked, never looping.

        `on_give_up(env, exc)` runs when a handler's exception is final: the message is not
        requeued (it failed before), or the handler had settled it (a stream acked once its
        output went out) and nothing will run it again.
        """
        if intake:
            # Intake runs again (an agent's watchdog resumes it): jobs the broker fails are
            # held for the publishing connection again, not bounced straight back.
            self._stopping.clear()
        if isinstance(spec, QueueSpec):
            queue = await self.declare(channel, spec)
            if redelivery_limit and self._requeue_via is not None:
                await declare_requeue_route(
                    channel, self._requeue_via, queue, passive=not self.declare_shared
                )
        else:
            queue = spec

        # What sends a message back to its queue every time (see below); `()` catches nothing.
        broker_failures: tuple[type[Exception], ...] = (BrokerUnavailableError,) if intake else ()
        queue_ttl = _queue_ttl(spec)

        async def on_message(message: DeliveredMessage) -> None:
            task = asyncio.current_task()
            if task is not None:
                self._inflight.add(task)
            delivery = Delivery(Received(message, self._acks), settled=no_ack)
            env: Envelope | None = None
            try:
                recount = redelivery_limit and message.redelivered and not no_ack
                if recount and await self._recount(
                    channel, queue.name, message, delivery, redelivery_limit, on_give_up=on_give_up
                ):
                    return
                env = envelope_of(message)
                await handler(env, delivery)
                await delivery.ack()
            except MessageDecodeError as e:
                properties = message.header.properties
                log.warning(
                    "rejecting undecodable %s message %s: %s",
                    properties.message_type,
                    properties.message_id,
                    e,
                )
                await delivery.reject(requeue=False)
            except ReplyQueueGoneError as e:
                log.info(
                    "%s: nobody waits for %s any more; dropped",
                    e,
                    message.header.properties.correlation_id,
                )
                await _settle_quietly(delivery, requeue=False, ack=True)
            except broker_failures:
                # A publish the broker did not take (the publishing connection lost, say, while
                # this one still delivers): the broker's fault, not the message's, so a job is
                # held until publishing works again (for as long as it may live in its queue:
                # no loop spins on an outage, and a quorum queue counts one delivery per
                # outage, not one per try), then goes back to its queue however often it came.
                # Rejected into the dead-letter queue instead, it would be lost to a blip. Not
                # so for control and cancel messages (`intake=False`): a heartbeat handled late
                # would be a lie. A delivery its handler settled (a stream acked once its
                # output was out) has nothing to hold.
                if not delivery.settled:
                    await self._hold(message, delivery, _lifetime(message, queue_ttl))
            except asyncio.CancelledError:
                await _settle_quietly(delivery, requeue=True)
                raise
            except Exception as e:
                final = delivery.settled or delivery.redelivered
                log.exception(
                    "handler failed on %s %s (requeue=%s)",
                    message.header.properties.message_type,
                    message.header.properties.correlation_id,
                    not final,
                )
                await _settle_quietly(delivery, requeue=not final)
                if final and on_give_up is not None and env is not None:
                    await _give_up_quietly(on_give_up, env, e)
            finally:
                if task is not None:
                    self._inflight.discard(task)

        setattr(on_message, _RAW, True)
        tag = await queue.consume(on_message, no_ack=no_ack)  # type: ignore[arg-type]  # raw
        self._consumers.append((queue, tag, intake))
        return queue

    async def _recount(
        self,
        channel: AbstractChannel,
        queue_name: str,
        message: DeliveredMessage,
        delivery: Delivery,
        limit: int,
        *,
        on_give_up: GiveUp | None = None,
    ) -> bool:
        """Handle a redelivered message's count; True if it was settled here. One past the
        limit is parked, and `on_give_up` told: a job's client hears of it now.

        The original is acked, then a passive declare of its queue on the same channel makes a
        round trip: the broker handles a channel's frames in order, so once it answers, the ack
        is settled, and the copy cannot reach a consumer (and crash it again) before it, nor
        can copies multiply. The copy goes out on the publishing connection: RabbitMQ blocks a
        connection that publishes during a memory alarm, and this one must keep acking. The
        price is a window of a round trip: a process killed between the ack and the copy's
        confirm loses that (already redelivered) message.
        """
        properties = message.header.properties
        headers = dict(properties.headers or {})
        raw = headers.get(H_DELIVERIES, 1)
        deliveries = (raw if isinstance(raw, int) else 1) + 1
        if deliveries > limit:
            log.warning(
                "%s %s delivered %d times: parked in the dead-letter queue",
                properties.message_type,
                properties.correlation_id,
                deliveries - 1,
            )
            await delivery.reject(requeue=False)
            if on_give_up is not None:
                with contextlib.suppress(MessageDecodeError):  # nobody to tell
                    parked = envelope_of(message)
                    error = RuntimeError(f"delivered {deliveries - 1} times")
                    await _give_up_quietly(on_give_up, parked, error)
            return True
        headers[H_DELIVERIES] = deliveries
        if H_QUEUED_AT in headers:  # the copy enters its queue now (services/dispatcher/returns)
            headers[H_QUEUED_AT] = round(time.time() * 1000)
        expiration = properties.expiration  # milliseconds, as text
        env = Envelope(
            type=properties.message_type or "",
            body=message.body,
            headers=headers,
            correlation_id=properties.correlation_id,
            reply_to=properties.reply_to,
            message_id=properties.message_id,
            expiration_ms=max(1, int(expiration)) if expiration and expiration.isdigit() else None,
        )
        persistent = properties.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        if not await self.publishing(self.publish_timeout):
            # Acked now, its copy could not go out: left to the broker, uncounted, for later.
            await delivery.reject(requeue=True)
            return True
        await delivery.ack_now()
        underlay = cast(aiormq.Channel, await channel.get_underlay_channel())
        await underlay.queue_declare(queue_name, passive=True, timeout=self.publish_timeout)
        # Through the queue's requeue route (`Topology.requeue_route`): an agent's broker user
        # may publish only to its own models' requeue exchanges.
        await self._publish_copy(env, queue_name, persistent=persistent)
        return True

    async def _publish_copy(self, env: Envelope, queue_name: str, *, persistent: bool) -> None:
        """Publish a counted copy whose original is acked already: it is the only one left.

        A queue at its bound (others keep it full, as a dispatcher does under overload)
        refuses it; it is tried again as room frees, for as long as the message may live. So
        is the confirm awaited that long: in a memory alarm the copy is routed once the alarm
        clears. A publishing connection lost meanwhile is waited for, within the same time.
        """
        if self._requeue_via is None:  # straight into the queue, by the default exchange
            exchange, routing_key = "", queue_name
        else:
            exchange, routing_key = self._requeue_via.requeue_route(queue_name)
        loop = asyncio.get_running_loop()
        lifetime = env.expiration_ms / 1000 if env.expiration_ms else self.publish_timeout
        deadline = loop.time() + max(lifetime, self.publish_timeout)
        delay = 0.01
        while True:
            try:
                await self.publish(
                    env,
                    routing_key,
                    exchange=exchange,
                    persistent=persistent,
                    timeout=max(self.publish_timeout, deadline - loop.time()),
                )
                return
            except (QueueFullError, BrokerUnavailableError) as e:
                if loop.time() + delay > deadline:
                    log.error(
                        "%s %s dropped: its queue %s %s for its whole lifetime",
                        env.type,
                        env.correlation_id,
                        queue_name,
                        "stayed full" if isinstance(e, QueueFullError) else "could not be reached",
                    )
                    raise
                if isinstance(e, BrokerUnavailableError):
                    await self.publishing(max(0.0, deadline - loop.time()))
            await asyncio.sleep(delay)
            delay = min(0.5, delay * 2)

    @property
    def consumer_count(self) -> int:
        return len(self._consumers)

    @property
    def is_consuming(self) -> bool:
        """Connected, with every consumer's channel open: what `/ready` reports.

        Robust channels re-open and re-consume after a reconnect; until they have, this is
        False, so an orchestrator never sees a process that is alive but idle.
        """
        return (
            self._restored
            and self.is_connected
            and bool(self._consumers)
            and all(_consumer_alive(queue, tag) for queue, tag, _ in self._consumers)
        )

    async def stop_consuming(self, *, intake_only: bool = False) -> None:
        """Stop intake: cancel consumers (in-flight handlers keep running).

        With `intake_only`, consumers registered with `intake=False` (cancels, control) keep
        running, so a draining service still hears that a client left.
        """
        self._stopping.set()
        kept = [c for c in self._consumers if intake_only and not c[2]]
        stopped = [c for c in self._consumers if c not in kept]
        self._consumers = kept
        # All at once, under one deadline: a robust channel's cancel waits for a broker that
        # is away, and a stopping process must end. A robust queue forgets the consumer before
        # it asks the broker, so one given up on here is not restored when the broker returns.
        results = await asyncio.gather(
            *(asyncio.wait_for(queue.cancel(tag), STOP_TIMEOUT) for queue, tag, _ in stopped),
            return_exceptions=True,
        )
        for (_, tag, _), result in zip(stopped, results, strict=True):
            if isinstance(result, BaseException):  # the channel may be gone; intake stops anyway
                log.debug("cancel of consumer %s failed: %r", tag, result)

    async def drain(self, timeout: float) -> None:
        """Wait for in-flight handlers to finish, then cancel those still running."""
        if not self._inflight:
            return
        running = len(self._inflight)
        log.info("draining %d job(s) in flight (up to %gs)", running, timeout)
        _, pending = await asyncio.wait(set(self._inflight), timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            log.warning(
                "%d of %d job(s) still running after DRAIN_TIMEOUT (%gs): cut off",
                len(pending),
                running,
                timeout,
            )
            await asyncio.wait(pending, timeout=1.0)

    async def close(self) -> None:
        self._closing = True
        await self._acks.flush()
        for conn in (self._publish_conn, self._consume_conn):
            if conn is not None:
                try:
                    await conn.close()
                except Exception:
                    log.debug("closing connection failed", exc_info=True)
        self._publish_conn = self._consume_conn = None
        self._publish_channel = None
        # Their channels closed with the connections; a start after this consumes afresh.
        self._consumers = []


def _queue_ttl(spec: QueueSpec | AbstractQueue) -> float | None:
    """Seconds a message may live in the queue `spec` declares (`x-message-ttl`), if bounded."""
    ttl = spec.arguments.get("x-message-ttl") if isinstance(spec, QueueSpec) else None
    return ttl / 1000 if isinstance(ttl, int) else None


def _lifetime(message: DeliveredMessage, queue_ttl: float | None) -> float:
    """Seconds a message may live in its queue (its expiration, within the queue's TTL), 0
    when unbounded. A requeued message keeps its time in the queue: past this it is gone."""
    expiration = message.header.properties.expiration
    limits = [queue_ttl] if queue_ttl is not None else []
    if expiration and expiration.isdigit():
        limits.append(int(expiration) / 1000)
    return min(limits, default=0.0)


async def _give_up_quietly(on_give_up: GiveUp, env: Envelope, exc: Exception) -> None:
    try:
        await on_give_up(env, exc)
    except Exception:
        log.warning(
            "could not answer %s after its handler failed", env.correlation_id, exc_info=True
        )


async def _settle_quietly(delivery: Delivery, *, requeue: bool, ack: bool = False) -> None:
    try:
        if ack:
            await delivery.ack()
        else:
            await delivery.reject(requeue=requeue)
    except Exception:  # a stale delivery tag after a reconnect: the broker requeued it already
        log.debug("could not settle a delivery", exc_info=True)
