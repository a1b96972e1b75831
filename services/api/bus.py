"""The API's side of the broker: publishing jobs, cancels and control messages, and the reply
queue that feeds `ReplyRouter`.

If the broker is down when the API starts, the API still serves (`/ready` says 503, requests
get 503) and keeps trying to connect in the background.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable

from services.api.rpc import PendingCall, ReplyRouter
from services.api.settings import ApiSettings
from shared.amqp import Broker, Delivery
from shared.errors import (
    BrokerUnavailableError,
    RouterError,
    ServiceUnavailableError,
    UnroutableError,
)
from shared.messages import (
    AgentHeartbeat,
    AgentRegistration,
    Envelope,
    Job,
    MessageType,
    decode_reply,
    encode_cancel,
    encode_control,
    encode_job,
    encode_rpc_models,
)
from shared.reply_trust import ReplyTrust
from shared.topology import Topology, cancel_routing_key, declare_queue, declare_topology

log = logging.getLogger(__name__)

RECONNECT_INTERVAL = 1.0  # seconds between attempts, as the robust connections reconnect
STILL_DOWN_EVERY = 30.0  # seconds between reminders that the broker is still not usable


def _describe(exc: BaseException) -> str:
    return exc.message if isinstance(exc, RouterError) else f"{type(exc).__name__}: {exc}"


class ApiBus:
    def __init__(self, settings: ApiSettings, topology: Topology) -> None:
        self.settings = settings
        self.topology = topology
        self.process_id = uuid.uuid4().hex[:12]
        self.replies = ReplyRouter(
            ReplyTrust.parse(settings.reply_users),
            on_orphan=self._cancel_soon,
            forget_after=settings.request_timeout,
        )
        self.reply_queue = topology.reply_queue(self.process_id)
        self._broker = Broker(
            settings.rabbitmq_url,
            name=f"api-{self.process_id}",
            publish_timeout=settings.publish_timeout,
            declare_shared=settings.declare_topology,
        )
        if not topology.is_persistent:
            # Transient mode: a broker that drops the connection may have lost every queued
            # job and reply, so nobody waits out a deadline for an answer that cannot come.
            self._broker.on_connection_lost(self._fail_waiting)
        self._connector: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        # Set once the process stops waiting for answers (`end_waiting`): jobs after it would
        # run for nobody, so their requests get the same error at once (a new one each: one
        # exception raised again and again would gather every raise's traceback).
        self._stopped_with: Callable[[], RouterError] | None = None

    async def start(self) -> None:
        """Connect now if the broker answers, else keep trying in the background."""
        try:
            await self._connect()
        except Exception as e:
            log.warning("broker not usable at start (%s); retrying in the background", _describe(e))
            self._connector = asyncio.create_task(self._keep_connecting())

    async def _keep_connecting(self) -> None:
        """Try again every second until connected, whatever failed; `stop()` cancels it. Said
        again every STILL_DOWN_EVERY seconds: an operator looking at the log an hour later
        (every request answered 503) must not find only the first line."""
        started = next_said = time.monotonic()
        while True:
            await asyncio.sleep(RECONNECT_INTERVAL)
            try:
                await self._connect()
            except Exception as e:  # the broker, or aiormq or aio-pika mid-declare, bind or consume
                if time.monotonic() >= next_said + STILL_DOWN_EVERY:
                    next_said = time.monotonic()
                    log.warning(
                        "broker still not usable after %.0fs (%s); answering 503, retrying",
                        next_said - started,
                        _describe(e),
                    )
                continue
            log.info("connected to the broker")
            return

    async def _connect(self) -> None:
        """Open the connections and attach the reply queue; on any failure close them all, so
        the next attempt opens fresh ones and none is left reconnecting on its own."""
        try:
            await self._broker.connect()
            await self._attach()
        except Exception:
            await self._broker.close()
            raise

    async def _attach(self) -> None:
        channel = await self._broker.channel(prefetch=1000)
        await declare_topology(channel, self.topology, passive=not self.settings.declare_topology)
        queue = await declare_queue(channel, self.topology.reply_queue_spec(self.process_id))
        # Replies arrive through the replies exchange, which stamps nothing but routes by name;
        # the sender's broker-validated user_id is checked per reply (`ReplyTrust`).
        await queue.bind(self.topology.replies_exchange, routing_key=queue.name)
        # Auto-ack: a reply is consumed once; the API is its only reader.
        await self._broker.consume(channel, queue, self._on_reply, no_ack=True)

    def _fail_waiting(self) -> None:
        log.warning("broker connection lost in transient mode: failing waiting requests")
        self.replies.fail_all(
            lambda: BrokerUnavailableError(
                "The broker connection was lost; the request was not kept."
            )
        )

    @property
    def is_ready(self) -> bool:
        """Connected and consuming replies now (not merely once): what `/ready` reports."""
        return self._broker.is_consuming

    async def stop(self) -> None:
        if self._background:  # cancels on their way out
            await asyncio.wait(self._background, timeout=self.settings.publish_timeout)
        if self._connector is not None:
            self._connector.cancel()
        await self._broker.stop_consuming()
        await self._broker.close()

    async def _on_reply(self, env: Envelope, _: Delivery) -> None:
        if env.type == MessageType.RPC_RESULT:
            if env.correlation_id:
                self.replies.resolve_result(env.correlation_id, env.body, env.user_id)
            return
        self.replies.dispatch(decode_reply(env), env.user_id)

    def _require_connection(self) -> None:
        """Fail fast while the broker is away, rather than publish into a dead connection."""
        if not self.is_ready:
            raise BrokerUnavailableError()

    async def submit(self, job: Job) -> None:
        """Publish a job, confirmed; raises QueueFullError or BrokerUnavailableError.

        Refused while the reply consumer is not back after a reconnect: the answer would find
        no reply queue (in transient mode it is re-declared only when the consuming connection
        returns), and the client would wait out its deadline for nothing.
        """
        if self._stopped_with is not None:
            raise self._stopped_with()
        if not self.is_ready:
            raise BrokerUnavailableError()
        env = encode_job(job, now=time.time())
        try:
            await self._broker.publish(
                env, self.topology.jobs_queue, persistent=self.topology.is_persistent
            )
        except UnroutableError as e:  # the jobs queue was deleted under us
            raise ServiceUnavailableError("The job queue is missing; retry shortly.") from e
        except BrokerUnavailableError:
            # Not confirmed is not "not sent": a broker in a memory alarm holds a publish past
            # its timeout and routes it when the alarm clears, so the job would run after all
            # while its client, told 503, runs it again. The cancel leaves on the same
            # connection, behind the job: dispatchers and agents drop or abort it.
            self._cancel_soon(job.request_id, job.model)
            raise

    def end_waiting(self, error: Callable[[], RouterError]) -> int:
        """The process is stopping: every call still waiting for its answer ends now with an
        `error()`, and its job is cancelled, since nobody will read what it would answer.
        Returns how many calls there were."""
        self._stopped_with = error
        calls = self.replies.waiting()
        for call in calls:
            self.cancel_soon(call)
            call.fail(error())
        return len(calls)

    def cancel_soon(self, call: PendingCall) -> None:
        """`cancel()` in the background (the caller is answering or gone already)."""
        self._cancel_soon(call.request_id, call.model)

    def _cancel_soon(self, request_id: str, model: str) -> None:
        task = asyncio.create_task(self._cancel(request_id, model))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def cancel(self, call: PendingCall) -> None:
        """Tell every dispatcher, and the agents serving the call's model, that nobody waits
        for this request any more."""
        await self._cancel(call.request_id, call.model)

    async def _cancel(self, request_id: str, model: str) -> None:
        try:
            self._require_connection()
            await self._broker.publish(
                encode_cancel(request_id),
                cancel_routing_key(model),
                exchange=self.topology.cancel_exchange,
                mandatory=False,
            )
        except RouterError:
            log.warning("cancel of %s not published: broker unavailable", request_id)

    async def announce(self, message: AgentRegistration | AgentHeartbeat) -> None:
        """Publish a registration or heartbeat to every dispatcher, confirmed."""
        self._require_connection()
        await self._broker.publish(
            encode_control(message), "", exchange=self.topology.control_exchange, mandatory=False
        )

    async def ask_models(self, timeout: float, model: str | None = None) -> bytes:
        """Ask any dispatcher for the model list (JSON bytes); 503 if none answers in time.
        With `model`, the list also holds that id if it is another name of a listed one."""
        self._require_connection()
        request_id = uuid.uuid4().hex
        answer = self.replies.expect_result(request_id)
        try:
            await self._broker.publish(
                encode_rpc_models(request_id, self.reply_queue, model), self.topology.rpc_queue
            )
            async with asyncio.timeout(timeout):
                return await answer
        except TimeoutError as e:
            raise ServiceUnavailableError("No dispatcher answered; retry shortly.") from e
        except UnroutableError as e:
            raise ServiceUnavailableError("No dispatcher is running; retry shortly.") from e
        finally:
            answer.cancel()
