"""`shared.amqp.Broker` on the real RabbitMQ: what `/ready` and the API's job intake rely on."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aio_pika
import pytest

from shared import amqp_writes
from shared.amqp import STOP_TIMEOUT, Broker, Delivery, GiveUp
from shared.errors import BrokerUnavailableError, QueueFullError
from shared.messages import Envelope, Job, Reply, ReplyKind
from shared.replies import ReplyPublisher
from shared.settings import Durability
from shared.topology import QueueSpec, Topology, declare_topology
from tests.conftest import RABBITMQ, require_services
from tests.faults.harness.proxy import FaultProxy
from tests.support.procs import new_namespace

URL = "amqp://guest:guest@127.0.0.1:5672/"


async def ignore(_: Envelope, __: Delivery) -> None:
    return None


@contextlib.asynccontextmanager
async def consumer_of_its_own_queue(
    handler: Callable[[Envelope, Delivery], Awaitable[None]] = ignore,
    *,
    publish_timeout: float = 5,
    intake: bool = True,
    on_give_up: GiveUp | None = None,
    redelivery_limit: int = 0,
) -> AsyncIterator[tuple[Broker, str]]:
    """A broker consuming a queue of this test's own (durable, so deleting it is the only way
    it goes away)."""
    require_services()
    name = f"{new_namespace()}.probe"
    broker = Broker(URL, name="test-amqp", publish_timeout=publish_timeout)
    await broker.connect()
    channel = await broker.channel(prefetch=10)
    spec = QueueSpec(name=name, durable=True)
    await broker.consume(
        channel,
        spec,
        handler,
        intake=intake,
        on_give_up=on_give_up,
        redelivery_limit=redelivery_limit,
    )
    try:
        yield broker, name
    finally:
        await broker.stop_consuming()
        await broker.close()
        connection = await aio_pika.connect(URL)
        async with connection:
            await (await connection.channel()).queue_delete(name)


@pytest.fixture
async def consuming() -> AsyncIterator[tuple[Broker, str]]:
    async with consumer_of_its_own_queue() as consumer:
        yield consumer


async def test_a_broker_closed_and_connected_again_consumes_only_what_it_consumes_now(
    consuming: tuple[Broker, str],
) -> None:
    """A service whose start failed closes its broker and starts again on it (the dispatcher
    does, until its topology exists): the closed connection's consumers must not count, or it
    never reports ready."""
    broker, name = consuming
    await broker.close()
    assert not broker.is_consuming
    await broker.connect()
    channel = await broker.channel(prefetch=10)
    await broker.consume(channel, QueueSpec(name=name, durable=True), ignore)
    assert broker.consumer_count == 1
    assert broker.is_consuming


async def test_a_consumer_gone_from_its_channel_is_not_consuming(
    consuming: tuple[Broker, str],
) -> None:
    """The channel is open, but the consumer is not registered on it (as between the broker's
    Basic.Cancel and aio-pika's re-consume): not ready, so the API takes no job whose answer
    would find no queue."""
    broker, _ = consuming
    assert broker.is_consuming
    queue, tag, _ = broker._consumers[0]
    # Straight on the aiormq channel, so aio-pika does not know and does not consume again.
    underlay = await queue.channel.get_underlay_channel()
    await underlay.basic_cancel(tag)
    assert not queue.channel.is_closed
    assert not broker.is_consuming


async def test_a_deleted_queue_is_declared_and_consumed_again(
    consuming: tuple[Broker, str],
) -> None:
    broker, name = consuming
    connection = await aio_pika.connect(URL)
    async with connection:
        await (await connection.channel()).queue_delete(name)
        deadline = time.monotonic() + 5
        while True:
            assert time.monotonic() < deadline, f"{name} was not consumed again"
            try:  # a passive declare of a missing queue closes its channel: one per try
                queue = await (await connection.channel()).declare_queue(name, passive=True)
            except aio_pika.exceptions.ChannelClosed:
                queue = None
            if queue and queue.declaration_result.consumer_count == 1 and broker.is_consuming:
                return
            await asyncio.sleep(0.02)


async def test_a_published_envelope_arrives_whole_and_a_failed_one_comes_back_once() -> None:
    """What a handler gets is what was published (plus the broker-checked user); a handler that
    fails is given the message once more, marked redelivered, and not a third time."""
    require_services()
    name = f"{new_namespace()}.roundtrip"
    broker = Broker(URL, name="test-amqp", publish_timeout=5)
    await broker.connect()
    seen: list[tuple[Envelope, bool]] = []
    done = asyncio.Event()

    async def handler(env: Envelope, delivery: Delivery) -> None:
        seen.append((env, delivery.redelivered))
        if env.type == "fails":
            if len([e for e, _ in seen if e.type == "fails"]) == 2:
                done.set()
            raise RuntimeError("handler failure, on purpose")

    sent = Envelope(
        type="job",
        body=b'{"x": 1}',
        headers={"x-router-test": "yes", "n": 3},
        correlation_id="req-1",
        reply_to="somewhere",
        message_id="m-1",
    )
    try:
        channel = await broker.channel(prefetch=10)
        await broker.consume(
            channel, QueueSpec(name=name, durable=False, auto_delete=True), handler
        )
        await broker.publish(sent, name, persistent=True)
        await broker.publish(Envelope(type="fails", body=b"", headers={}), name)
        await asyncio.wait_for(done.wait(), timeout=5)
        await asyncio.sleep(0.3)  # a third delivery would land by now
    finally:
        await broker.stop_consuming()
        await broker.close()
    got = next(env for env, _ in seen if env.type == "job")
    assert got == dataclasses.replace(sent, user_id="guest")
    assert [again for env, again in seen if env.type == "fails"] == [False, True]


async def test_publishes_made_together_leave_in_one_socket_write(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Forty publishes started in one turn of the event loop share a write, so the broker reads
    them in one go. By aiormq's defaults each waited, holding the channel's lock, until its
    frames were written, and a write queue of ten made the eleventh wait for the writer: one
    publish per turn of the loop, each in a write of its own."""
    require_services()
    name = f"{new_namespace()}.together"
    writes: list[bytes] = []
    original = asyncio.StreamWriter.write

    def recording(self: asyncio.StreamWriter, data: bytes) -> None:
        writes.append(bytes(data))
        original(self, data)

    broker = Broker(URL, name="test-amqp", publish_timeout=5)
    await broker.connect()
    try:
        channel = await broker.channel(prefetch=1)
        underlay = await channel.get_underlay_channel()
        await broker.consume(channel, QueueSpec(name=name, durable=False, auto_delete=True), ignore)
        monkeypatch.setattr(asyncio.StreamWriter, "write", recording)
        envs = [Envelope(type="job", body=b"n%d" % i, headers={}) for i in range(40)]
        await asyncio.gather(*(broker.publish(env, name) for env in envs))
    finally:
        monkeypatch.undo()
        await broker.stop_consuming()
        await broker.close()
    basic_publish = b"\x00\x3c\x00\x28"  # class 60 (basic), method 40 (publish)
    # And a channel holds more than aiormq's ten incoming frames (three deliveries) before
    # the connection's reader must wait for it.
    assert underlay.frames.maxsize == amqp_writes.MAX_BATCH
    per_write = [w.count(basic_publish) for w in writes if basic_publish in w]
    assert sum(per_write) == 40
    assert len(per_write) <= 2, per_write


async def test_stopping_while_the_broker_is_away_ends_within_its_deadline() -> None:
    """A SIGTERM during a broker outage must still end the process: cancelling a consumer on a
    robust channel waits for the channel to come back, so stopping bounds that wait (once for
    all consumers, not once each)."""
    require_services()
    proxy = FaultProxy(RABBITMQ[1]).start()
    name = f"{new_namespace()}.away"
    broker = Broker(
        f"amqp://guest:guest@127.0.0.1:{proxy.port}/", name="test-amqp", publish_timeout=5
    )
    try:
        await broker.connect()
        for _ in range(3):
            channel = await broker.channel(prefetch=10)
            await broker.consume(channel, QueueSpec(name=name, durable=False), ignore)
        proxy.refuse = True  # reconnects fail too
        proxy.reset_all()
        deadline = time.monotonic() + 15
        while broker.is_connected:
            assert time.monotonic() < deadline, "the broker never looked away"
            await asyncio.sleep(0.05)
        async with asyncio.timeout(STOP_TIMEOUT + 5):
            await broker.stop_consuming()
            await broker.close()
        assert broker._consumers == []
    finally:
        proxy.heal()
        proxy.close()
        await broker.close()


async def test_a_redelivered_message_whose_counted_copy_finds_its_queue_full_is_not_lost() -> None:
    """On a classic queue a redelivered message is acked, then published again with its count
    (`Broker._recount`). A queue kept at its bound by other publishers (a dispatcher under
    overload) refused that copy, and the message, acked, was gone (review 2026-11-29): the
    copy now waits for room, within the message's lifetime."""
    require_services()
    topology = Topology(namespace=new_namespace(), jobs_max_length=2)
    spec = topology.jobs_queue_spec()
    publisher = Broker(URL, name="test-pub", publish_timeout=5)
    consumer = Broker(URL, name="test-con", publish_timeout=5, requeue_via=topology)
    await publisher.connect()
    await consumer.connect()
    copy_handled = asyncio.Event()

    async def handler(env: Envelope, delivery: Delivery) -> None:
        if env.message_id != "A":
            await asyncio.sleep(0.02)  # other work: slower than the burst fills the queue
        elif not delivery.redelivered:
            raise RuntimeError("a failure that requeues A, as an agent's hand-back does")
        else:
            copy_handled.set()

    async def burst(seconds: float) -> None:
        """Publishes that keep the queue at its bound (most are refused) for `seconds`: a slot
        freed is taken again before a copy published a round trip later can have it."""

        async def publishing() -> None:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                with contextlib.suppress(QueueFullError):
                    await publisher.publish(Envelope(type="job", body=b"", headers={}), spec.name)

        await asyncio.gather(*(publishing() for _ in range(4)))

    try:
        await declare_topology(await consumer.channel(prefetch=10), topology)
        channel = await consumer.channel(prefetch=1)
        await consumer.consume(channel, spec, handler, redelivery_limit=5)
        filling = asyncio.create_task(burst(1.5))
        await asyncio.sleep(0.2)
        a = Envelope(type="job", body=b"{}", headers={}, message_id="A", expiration_ms=20_000)
        while True:  # A is let in when a slot frees
            with contextlib.suppress(QueueFullError):
                await publisher.publish(a, spec.name)
                break
            await asyncio.sleep(0.001)
        await filling
        await asyncio.wait_for(copy_handled.wait(), timeout=10)
    finally:
        await consumer.stop_consuming()
        await consumer.close()
        await publisher.close()


@pytest.mark.parametrize("mode", [Durability.DURABLE, Durability.QUORUM])
async def test_jobs_taken_while_only_the_publishing_connection_is_down_are_not_lost(
    mode: Durability,
) -> None:
    """The two connections reconnect on their own: one that still delivers while the other
    cannot publish hands the service jobs it cannot pass on (review 2026-11-29). A failed
    hand-off was requeued once, then rejected for good; a redelivered job was acked and its
    counted copy failed to go out. Each lost the job. Now a job whose handler the broker
    failed is held until publishing works again, then goes back to its queue however often it
    came (a quorum queue, which counts deliveries itself, counts one for the outage, not one
    per try), and a counted copy waits for the publishing connection."""
    require_services()
    topology = Topology(namespace=new_namespace(), mode=mode)
    spec = topology.jobs_queue_spec()
    proxy = FaultProxy(RABBITMQ[1]).start()
    publisher = Broker(URL, name="test-pub", publish_timeout=5)
    # Through the proxy: its first connection is the publishing one (`Broker.connect`).
    consumer = Broker(
        f"amqp://guest:guest@{proxy.address}/", name="test-con", publish_timeout=0.5,
        requeue_via=topology,
    )  # fmt: skip
    handled: dict[str, int] = {}
    done = asyncio.Event()

    async def handler(env: Envelope, _: Delivery) -> None:
        """Passes each job on, as a dispatcher hands it off; it cannot while publishing is down."""
        handled[env.message_id or ""] = handled.get(env.message_id or "", 0) + 1
        await consumer.publish(Envelope(type="x", body=b"", headers={}), spec.name + ".out")
        done.set()

    try:
        await publisher.connect()
        await consumer.connect()
        channel = await consumer.channel(prefetch=4)
        await declare_topology(channel, topology)
        await consumer.declare(channel, dataclasses.replace(spec, name=spec.name + ".out"))
        await consumer.consume(channel, spec, handler, redelivery_limit=topology.redelivery_limit)
        proxy.refuse = True  # the publishing connection cannot come back...
        proxy.reset(0)  # ...once it is cut; the consuming one goes on
        job = Envelope(type="job", body=b"{}", headers={}, message_id="J", expiration_ms=30_000)
        await publisher.publish(job, spec.name)
        await asyncio.sleep(4.0)  # the job is taken (and fails) while nothing can be published
        assert not done.is_set() and handled.get("J", 0) >= 1
        proxy.heal()
        await asyncio.wait_for(done.wait(), timeout=15)
    finally:
        await consumer.stop_consuming()
        await consumer.close()
        connection = await aio_pika.connect(URL)
        async with connection:
            admin = await connection.channel()
            for name in (spec.name, spec.name + ".out"):
                await admin.queue_delete(name)
        await publisher.close()
        proxy.close()


async def test_a_message_its_handler_fails_twice_is_given_up_once() -> None:
    """A job that crashes its handler (a bug, or input nothing can handle) ran twice and went
    to the dead-letter queue without a word: its client waited out REQUEST_TIMEOUT. The hook
    hears of it once, on the second failure, with the exception."""
    tries = 0
    given_up: list[tuple[str | None, Exception]] = []

    async def crashing(_: Envelope, __: Delivery) -> None:
        nonlocal tries
        tries += 1
        raise ValueError("a bug")

    async def give_up(env: Envelope, exc: Exception) -> None:
        given_up.append((env.message_id, exc))

    async with consumer_of_its_own_queue(crashing, on_give_up=give_up) as (broker, name):
        await broker.publish(Envelope(type="job", body=b"", headers={}, message_id="J"), name)
        await asyncio.sleep(1.0)
    assert tries == 2
    assert [(message_id, str(exc)) for message_id, exc in given_up] == [("J", "a bug")]


async def test_a_message_parked_by_its_count_is_given_up() -> None:
    """A job that kills its consumer process every time ends parked by its count: its client
    must hear of it then, not at its deadline."""
    given_up: list[str | None] = []

    async def crashing(_: Envelope, __: Delivery) -> None:
        raise ValueError("a bug")  # as a killed process would, it makes the broker redeliver

    async def give_up(env: Envelope, _: Exception) -> None:
        given_up.append(env.message_id)

    # Failed once, it comes back redelivered: one delivery past this limit.
    async with consumer_of_its_own_queue(crashing, on_give_up=give_up, redelivery_limit=1) as (
        broker,
        name,
    ):
        await broker.publish(Envelope(type="job", message_id="J"), name)
        await asyncio.sleep(1.0)
    assert given_up == ["J"]


async def test_a_message_its_handler_settled_is_given_up_at_its_first_failure() -> None:
    """A stream is acked once its output went out, so nothing runs it again: its client must
    hear of a failure after that at once."""
    given_up: list[str | None] = []

    async def acks_then_crashes(_: Envelope, delivery: Delivery) -> None:
        await delivery.ack()
        raise ValueError("a bug")

    async def give_up(env: Envelope, _: Exception) -> None:
        given_up.append(env.message_id)

    async with consumer_of_its_own_queue(acks_then_crashes, on_give_up=give_up) as (broker, q):
        await broker.publish(Envelope(type="job", body=b"", headers={}, message_id="J"), q)
        await asyncio.sleep(1.0)
    assert given_up == ["J"]


async def test_a_control_message_the_broker_failed_is_requeued_once_then_dropped() -> None:
    """Only jobs go back to their queue every time the broker fails their handler: a heartbeat
    handled minutes late, once the broker is back, would say an agent lives that may not."""
    seen = 0

    async def failing(_: Envelope, __: Delivery) -> None:
        nonlocal seen
        seen += 1
        raise BrokerUnavailableError()

    async with consumer_of_its_own_queue(failing, publish_timeout=0.2, intake=False) as (
        broker,
        name,
    ):
        await broker.publish(Envelope(type="control", body=b"", headers={}), name)
        await asyncio.sleep(1.5)
        assert seen == 2


@contextlib.asynccontextmanager
async def cut_off_from_publishing(
    topology: Topology, spec: QueueSpec, handler: Callable[[Envelope, Delivery], Awaitable[None]]
) -> AsyncIterator[tuple[Broker, Broker]]:
    """A consumer of `spec` whose publishing connection is cut, and cannot come back, while
    its consuming one delivers; and a publisher beside it. Both closed afterwards."""
    proxy = FaultProxy(RABBITMQ[1]).start()
    publisher = Broker(URL, name="test-pub", publish_timeout=5)
    consumer = Broker(f"amqp://guest:guest@{proxy.address}/", name="test-con", publish_timeout=0.5)
    try:
        await publisher.connect()
        await consumer.connect()  # its first connection is the publishing one
        channel = await consumer.channel(prefetch=4)
        await declare_topology(channel, topology)
        await consumer.consume(channel, spec, handler)
        proxy.refuse = True
        proxy.reset(0)
        yield consumer, publisher
    finally:
        await consumer.stop_consuming()
        await consumer.close()
        await publisher.close()
        proxy.close()


async def failing_to_publish(_: Envelope, __: Delivery) -> None:
    raise BrokerUnavailableError()


async def test_a_held_job_goes_back_by_its_queues_ttl_not_its_own_deadline() -> None:
    """An agent queue's jobs live AGENT_QUEUE_TTL there (then a dispatcher answers 503): one
    held past that, up to its own 20 s, kept its client waiting for a 504 instead."""
    require_services()
    topology = Topology(namespace=new_namespace(), agent_queue_ttl_ms=2_000)
    spec = topology.agent_queue_spec("local_m")
    async with cut_off_from_publishing(topology, spec, failing_to_publish) as (_, publisher):
        job = Envelope(type="job", body=b"{}", headers={}, message_id="J", expiration_ms=20_000)
        started = time.monotonic()
        await publisher.publish(job, spec.name)
        returns = topology.returns_queue

        async def returned() -> bool:
            connection = await aio_pika.connect(URL)
            async with connection:
                queue = await (await connection.channel()).get_queue(returns)
                return (queue.declaration_result.message_count or 0) > 0

        while not await returned():
            assert time.monotonic() - started < 8, "the job was held past its queue's TTL"
            await asyncio.sleep(0.2)


async def test_intake_resumed_after_a_pause_holds_jobs_again() -> None:
    """An agent's watchdog pauses intake while its server is unhealthy and resumes it. The
    pause left the broker "stopping" for good: a job the broker failed then went back to its
    queue at once, to be taken and failed again in a loop, instead of waiting for the
    publishing connection (review 2026-11-29)."""
    require_services()
    topology = Topology(namespace=new_namespace())
    spec = topology.jobs_queue_spec()
    taken = 0

    async def failing(_: Envelope, __: Delivery) -> None:
        nonlocal taken
        taken += 1
        raise BrokerUnavailableError()

    async with cut_off_from_publishing(topology, spec, failing) as (consumer, publisher):
        await consumer.stop_consuming(intake_only=True)  # the watchdog's pause...
        await consumer.consume(await consumer.channel(prefetch=4), spec, failing)  # ...resumed
        job = Envelope(type="job", body=b"{}", headers={}, message_id="J", expiration_ms=20_000)
        await publisher.publish(job, spec.name)
        await asyncio.sleep(1.5)
        assert taken == 1  # held, not bounced


async def test_stopping_gives_held_jobs_back_at_once() -> None:
    """A service stopped while it cannot publish: its drain does not wait out DRAIN_TIMEOUT
    for jobs held for the publishing connection, and those jobs are back in their queue
    before its connections close, for another consumer to take."""
    require_services()
    topology = Topology(namespace=new_namespace())
    spec = topology.jobs_queue_spec()
    async with cut_off_from_publishing(topology, spec, failing_to_publish) as (consumer, pub):
        job = Envelope(type="job", body=b"{}", headers={}, message_id="J", expiration_ms=20_000)
        await pub.publish(job, spec.name)
        await asyncio.sleep(1.0)  # taken, failed, held
        started = time.monotonic()
        await consumer.stop_consuming()
        await consumer.drain(5.0)
        assert time.monotonic() - started < 2
        await asyncio.sleep(0.3)  # the requeue reaches the broker
        connection = await aio_pika.connect(URL)
        async with connection:
            queue = await (await connection.channel()).get_queue(spec.name)
            assert queue.declaration_result.message_count == 1


async def test_a_stream_message_lost_with_the_publishing_connection_goes_again() -> None:
    """Mid-stream the job cannot run again: a chunk (or the stream's error) lost with the
    publishing connection went nowhere, and the client waited out its idle timeout though the
    connection was back in milliseconds (review 2026-11-29). It is sent again once it is."""
    require_services()
    proxy = FaultProxy(RABBITMQ[1]).start()
    broker = Broker(f"amqp://guest:guest@{proxy.address}/", name="test-streamer", publish_timeout=5)
    connection = await aio_pika.connect(URL)
    try:
        await broker.connect()
        replies = await (await connection.channel()).declare_queue(exclusive=True)
        publish = ReplyPublisher(broker, persistent=False)
        job = Job("r1", "m", replies.name, deadline=time.time() + 30, body=b"{}", stream=True)
        await publish(job, Reply(ReplyKind.CHUNK, "r1", "a", body=b"data: 0\n\n", seq=0))
        proxy.reset(0)  # the connections drop; they reconnect on their own
        for seq in (1, 2):
            await publish(job, Reply(ReplyKind.CHUNK, "r1", "a", body=b"data: x\n\n", seq=seq))
        await publish(job, Reply(ReplyKind.END, "r1", "a", seq=3))
        seqs: list[int] = []
        async with asyncio.timeout(10), replies.iterator() as incoming:
            async for delivered in incoming:
                await delivered.ack()
                seqs.append(int(delivered.headers["x-seq"]))  # type: ignore[arg-type]
                if seqs[-1] == 3:
                    break
        assert sorted(set(seqs)) == [0, 1, 2, 3]  # a copy may come twice: the API drops it
    finally:
        await broker.close()
        await connection.close()
        proxy.close()
