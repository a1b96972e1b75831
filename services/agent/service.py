"""The agent process: wiring the inference server, the broker and the API together.

Start: (vllm-docker: run the container and wait for its health), learn the models, connect to
the broker, declare the topology, bind a private queue to the cancel fanout, consume each
model's queue with prefetch = AGENT_CONCURRENCY, then register and heartbeat. While the
server's /health fails (checked every HEARTBEAT_INTERVAL, see services/agent/watchdog.py),
stop consuming the models' queues, which pauses the heartbeats; consume again once it answers.
Stop (SIGTERM):
hand jobs that have not started back to their queue, cancel the consumers (heartbeats stop
with them), let in-flight jobs finish within DRAIN_TIMEOUT, stop the container, close; each
step even if one before it failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
import uuid
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import httpx
from aio_pika.abc import AbstractChannel, AbstractQueue
from aiohttp import web
from httpx_aiohttp import AiohttpTransport

from services.agent.backend import UpstreamUnavailableError, VllmClient
from services.agent.container import (
    ContainerError,
    ContainerSpec,
    VllmContainer,
    container_spec,
)
from services.agent.handler import STOPPING, AgentHandler
from services.agent.heartbeat import Registrar, RegistrationRefusedError, next_backoff
from services.agent.models import ModelMap, discovered_models, parse_agent_models
from services.agent.settings import AgentSettings, Backend
from services.agent.watchdog import UpstreamHealth
from shared import health
from shared.amqp import Broker, Delivery
from shared.cancel import Cancellations
from shared.errors import BrokerEntityMissingError, BrokerUnavailableError
from shared.messages import AgentRegistration, Envelope, decode_cancel
from shared.replies import ReplyPublisher
from shared.runner import StartupError
from shared.topology import (
    broker_refusals_stop_start,
    cancel_routing_key,
    declare_queue,
    declare_topology,
    topology_for,
)

log = logging.getLogger(__name__)


def vllm_url(settings: AgentSettings) -> str:
    if settings.vllm_url:
        return settings.vllm_url
    if settings.agent_backend is Backend.VLLM_DOCKER:
        return f"http://127.0.0.1:{settings.vllm_host_port}/v1"
    return "http://127.0.0.1:8000/v1"


def docker_spec(settings: AgentSettings, served_names: list[str]) -> ContainerSpec:
    s = settings
    return container_spec(
        agent_name=s.agent_name,
        image=s.vllm_image,
        model=s.vllm_model,
        served_names=list(dict.fromkeys(served_names)),
        gpus=s.vllm_gpus,
        host_port=s.vllm_host_port,
        hf_cache_dir=str(Path(s.hf_cache_dir).expanduser()),
        hf_token=s.hf_token.get_secret_value(),
        api_key=s.vllm_api_key.get_secret_value(),
        extra_args=s.vllm_args,
        name=s.vllm_container_name,
    )


class AgentService:
    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self.topology = topology_for(settings)
        self.process_id = uuid.uuid4().hex[:12]
        self.configured = parse_agent_models(settings.agent_models)
        self.models = self.configured
        self.upstream = VllmClient(
            vllm_url(settings),
            connect_timeout=settings.upstream_connect_timeout,
            api_key=settings.vllm_api_key.get_secret_value(),
        )
        self.router = httpx.AsyncClient(transport=AiohttpTransport())
        self.broker = Broker(
            settings.rabbitmq_url,
            name=f"agent-{settings.agent_name}-{self.process_id}",
            publish_timeout=settings.publish_timeout,
            declare_shared=settings.declare_topology,
            requeue_via=self.topology,
        )
        self.cancellations = Cancellations()
        self.handler: AgentHandler | None = None
        self.reply: ReplyPublisher | None = None
        self.registrar: Registrar | None = None
        self.container: VllmContainer | None = None
        self._heartbeats: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._model_channels: dict[str, AbstractChannel] = {}
        # Each model's queue as its channel declared it: consumed again after a pause, not
        # declared again (aio-pika keeps every declared queue to restore it on a reconnect).
        self._model_queues: dict[str, AbstractQueue] = {}
        self._taking_jobs = False  # consuming the models' queues (not while the server is down)
        self._web: web.AppRunner | None = None
        self.port = settings.agent_port

    # --- readiness -----------------------------------------------------------------------------
    def is_attached(self) -> bool:
        """Consuming every model queue (plus the cancel queue), each consumer live on the
        broker: `Broker.is_consuming` is False while any consumer is gone from its channel (the
        broker cancels the consumers of a deleted queue), not only while disconnected. The
        model queues are not consumed while the inference server is down."""
        expected = len(self.models.router_ids) + 1
        return (
            bool(self.models)
            and self.broker.is_consuming
            and (self.broker.consumer_count >= expected)
        )

    def is_ready(self) -> bool:
        return (
            self.is_attached() and self.registrar is not None and self.registrar.registered.is_set()
        )

    def status(self) -> dict[str, Any]:
        return {
            "name": self.settings.agent_name,
            "models": self.models.router_ids,
            "load": self.load(),
            "consuming": self.is_attached(),
        }

    def load(self) -> float:
        return float(self.handler.in_flight) if self.handler is not None else 0.0

    # --- start ---------------------------------------------------------------------------------
    async def start(self) -> None:
        """Bring the agent up; runs until it is registering (cancel it to abort)."""
        self._web, self.port = await health.serve(
            health.create_app(self.status, self.is_ready),
            self.settings.agent_bind,
            self.settings.agent_port,
            setting="AGENT_PORT",
        )
        if self.settings.agent_backend is Backend.VLLM_DOCKER:
            await self._start_container()
        self.models = await self._learn_models()
        await self._connect()
        with broker_refusals_stop_start():  # a missing permission: one line, not a traceback
            await self._consume()
        self._start_heartbeats()
        self._watchdog = asyncio.create_task(self._watch_upstream())

    async def _start_container(self) -> None:
        import docker  # only this backend needs an engine

        spec = docker_spec(self.settings, list(self.configured.served.values()))
        try:
            client = docker.from_env()
        except docker.errors.DockerException as e:
            raise ContainerError(f"no Docker engine for AGENT_BACKEND=vllm-docker: {e}") from e
        self.container = VllmContainer(client, spec, self.upstream.is_healthy)
        await self.container.start()
        await self.container.wait_ready(self.settings.vllm_startup_timeout)

    async def _learn_models(self) -> ModelMap:
        """Wait for the server to list its models; use them when AGENT_MODELS is empty."""
        delay = 0.5
        while True:
            try:
                served = await self.upstream.served_models()
                break
            except UpstreamUnavailableError as e:
                log.warning("inference server at %s not answering: %s", self.upstream.root, e)
            await asyncio.sleep(delay)
            delay = next_backoff(delay, cap=10.0)
        if self.configured:
            missing = set(self.configured.served.values()) - set(served)
            if missing:
                log.warning("the server does not list %s (it lists %s)", sorted(missing), served)
            return self.configured
        models, skipped = discovered_models(served)
        if skipped:
            log.warning("served models that cannot be named in the router: %s", skipped)
        if not models:
            raise RuntimeError(f"the inference server lists no usable model: {served}")
        return models

    async def _connect(self) -> None:
        delay = 0.5
        while True:
            try:
                await self.broker.connect()
                return
            except BrokerUnavailableError as e:
                log.warning("%s; retrying in %.1fs", e.message, delay)
            await asyncio.sleep(delay)
            delay = next_backoff(delay, cap=10.0)

    async def _consume(self) -> None:
        t = self.topology
        # Answers to jobs that carry a cache key also go out as `job.completed` (cache writes,
        # single-flight release); see shared.replies.ReplyPublisher.
        self.reply = ReplyPublisher.for_topology(
            self.broker, t, max_body=self.settings.max_reply_bytes
        )
        self.handler = AgentHandler(
            models=self.models,
            upstream=self.upstream,
            publish=self.reply,
            cancellations=self.cancellations,
            concurrency=self.settings.agent_concurrency,
            coalesce_window=self.settings.stream_coalesce_ms / 1000,
            max_reply_bytes=self.settings.max_reply_bytes,
        )
        control = await self.broker.channel(prefetch=256)
        if self.settings.declare_topology:
            await declare_topology(control, t)
        cancel = await declare_queue(control, t.private_queue_spec("cancel", self.process_id))
        for model in self.models.router_ids:  # cancels of requests for its models only
            await cancel.bind(t.cancel_exchange, routing_key=cancel_routing_key(model))
        await self.broker.consume(control, cancel, self._on_cancel, intake=False)
        await self._consume_models()
        log.info(
            "agent %s consuming %s (prefetch %d each, %s mode) for %s",
            self.settings.agent_name,
            ", ".join(self.models.router_ids),
            self.settings.agent_concurrency,
            t.mode.value,
            self.upstream.root,
        )

    async def _consume_models(self) -> None:
        for model in self.models.router_ids:
            await self._consume_model(model)
        self._taking_jobs = True

    async def _consume_model(self, model: str) -> None:
        """Consume one model's queue; under least privilege wait until it has been declared
        (`router topology --agent-model ...`), since this agent's broker user may not. Consuming
        again (the server is back) reuses the model's channel."""
        assert self.handler is not None
        delay = 0.5
        while True:
            channel = self._model_channels.get(model)
            if channel is None or channel.is_closed:
                channel = await self.broker.channel(prefetch=self.settings.agent_concurrency)
                self._model_channels[model] = channel
                self._model_queues.pop(model, None)
            try:
                self._model_queues[model] = await self.broker.consume(
                    channel,
                    self._model_queues.get(model) or self.topology.agent_queue_spec(model),
                    self.handler.on_job,
                    redelivery_limit=self.topology.redelivery_limit,
                    on_give_up=self.reply.give_up if self.reply is not None else None,
                )
                return
            except BrokerEntityMissingError as e:  # the channel closed with it
                log.warning(
                    "%s; declare it with `router topology --agent-model %s` (retrying)", e, model
                )
            await asyncio.sleep(delay)
            delay = next_backoff(delay, cap=10.0)

    def _start_heartbeats(self) -> None:
        s = self.settings
        host = s.agent_host or socket.gethostname()
        self.registrar = Registrar(
            self.router,
            router_url=s.router_url,
            token=s.agent_token.get_secret_value(),
            registration=AgentRegistration(
                name=s.agent_name,
                endpoint=f"http://{host}:{self.port}",
                models=self.models.router_ids,
                instance=self.process_id,
            ),
            interval=s.heartbeat_interval,
            is_attached=self.is_attached,
            load=self.load,
        )
        self._heartbeats = asyncio.create_task(self.registrar.run())

    async def _on_cancel(self, env: Envelope, _: Delivery) -> None:
        request_id = decode_cancel(env)
        if self.cancellations.cancel(request_id, time.time()):
            # The api cancels a job whose client left, or a re-run nobody waits for any more.
            log.info("job %s cancelled by the api: upstream call aborted", request_id)

    # --- the inference server's health ----------------------------------------------------------
    async def _watch_upstream(self) -> None:
        """Check the server's /health every HEARTBEAT_INTERVAL; consume the models' queues only
        while it counts as healthy. Runs until cancelled: a failed step is logged and the
        next check tries again."""
        health = UpstreamHealth()
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval)
            try:
                healthy = health.record(await self.upstream.is_healthy())
                if healthy != self._taking_jobs:
                    await (self._take_jobs_again() if healthy else self._stop_taking_jobs(health))
            except Exception:
                log.exception("following the inference server's health failed; retrying")

    async def _stop_taking_jobs(self, health: UpstreamHealth) -> None:
        """Its queue consumers go, so heartbeats pause (`is_attached`) and the registry lets
        this agent go after the TTL; the jobs it holds that have not started go back to their
        queue for a healthy agent (cancelling a consumer leaves its unacked jobs here)."""
        log.warning(
            "inference server at %s failed %d health checks in a row: "
            "no more jobs taken until it answers again",
            self.upstream.root,
            health.failures,
        )
        self._taking_jobs = False
        assert self.handler is not None
        self.handler.stop_starting("inference server down")
        await self.broker.stop_consuming(intake_only=True)

    async def _take_jobs_again(self) -> None:
        log.info("inference server at %s healthy again: taking jobs", self.upstream.root)
        assert self.handler is not None
        self.handler.start_again()
        try:
            await self._consume_models()
        except Exception:  # consuming some models only: start over at the next check
            await self.broker.stop_consuming(intake_only=True)
            raise

    # --- running -------------------------------------------------------------------------------
    async def serve(self, stopping: asyncio.Future[Any]) -> None:
        """Run until `stopping` is done. Raises if the heartbeats end first: they end only on
        a refused token or registration (services/agent/heartbeat.py) or by a bug, and an
        agent that no longer heartbeats drops out of the registry while it looks ready, so it
        had better exit (non-zero) and be restarted."""
        assert self._heartbeats is not None, "start() first"
        await asyncio.wait({stopping, self._heartbeats}, return_when=asyncio.FIRST_COMPLETED)
        if stopping.done():
            return
        cause = None if self._heartbeats.cancelled() else self._heartbeats.exception()
        if isinstance(cause, RegistrationRefusedError):
            raise cause  # the operator's to fix, and logged as such: no traceback needed
        raise RuntimeError(f"heartbeats ended ({cause!r})") from cause

    # --- stop ----------------------------------------------------------------------------------
    async def stop(self) -> None:
        """Stop intake, drain, stop heartbeats and the container, close everything.

        Every step runs, in this order, even if one before it failed (it is logged): a dead
        heartbeat task or a container that cannot be removed must not leave the container
        running, replies unsent or the broker connections open.
        """
        await _step("stopping the health checks", _cancelled(self._watchdog))
        if self.handler is not None:  # jobs still waiting for a slot go back to their queue
            self.handler.stop_starting(STOPPING)
        await _step("stopping intake", self.broker.stop_consuming(intake_only=True))
        # No heartbeats while draining, and a last one that says so: dispatchers count this
        # agent dead at once, and answer its models 503 (if no other agent serves them)
        # instead of queueing jobs nobody will take.
        await _step("stopping heartbeats", self._stop_heartbeats())
        if self.registrar is not None:
            await _step("leaving the registry", self.registrar.leave())
        await _step("draining", self.broker.drain(self.settings.drain_timeout))
        if self.container is not None:
            await _step("stopping the container", self.container.stop())
        if self.reply is not None:
            await _step("flushing replies", self.reply.flush())
        await _step("closing the broker", self.broker.close())
        await _step("closing the upstream client", self.upstream.aclose())
        await _step("closing the router client", self.router.aclose())
        if self._web is not None:
            await _step("stopping the health server", self._web.cleanup())
        log.info("agent %s stopped", self.settings.agent_name)

    async def _stop_heartbeats(self) -> None:
        """Cancel the heartbeat task; raises what it died of, if it died, except a refused
        token or registration (the registrar logged it, in words an operator can act on)."""
        task = self._heartbeats
        refused = (
            task is not None
            and task.done()
            and not task.cancelled()
            and isinstance(task.exception(), RegistrationRefusedError)
        )
        if not refused:
            await _cancelled(task)


async def _cancelled(task: asyncio.Task[None] | None) -> None:
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _step(what: str, work: Awaitable[object]) -> None:
    try:
        await work
    except Exception:
        log.exception("%s failed; stopping goes on", what)


async def run(settings: AgentSettings, stop: asyncio.Event) -> None:
    service = AgentService(settings)
    starting = asyncio.create_task(service.start())
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            failure = starting.exception()
            # A StartupError is the runner's to log: one line, no traceback.
            if failure is not None and not isinstance(failure, StartupError):
                log.error("agent %s failed to start: %s", settings.agent_name, failure)
            starting.result()  # a failed start raises here
            await service.serve(stopping)
    finally:
        log.info("agent %s stopping", settings.agent_name)
        for task in (starting, stopping):
            task.cancel()
        await asyncio.gather(starting, stopping, return_exceptions=True)
        await service.stop()
