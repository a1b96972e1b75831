"""RabbitMQ as a trust boundary: least-privilege broker users, per service and per agent pool.

Each test gets its own vhost and users on the machine's broker, made with the definitions that
`router broker-acl --format definitions` prints (so the permissions tested are the shipped ones),
and the topology that `router topology` declares. Services run with DECLARE_TOPOLOGY=false.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import pytest
from aiormq.exceptions import ChannelAccessRefused, ChannelClosed, ChannelPreconditionFailed

from shared.amqp import envelope_of
from shared.broker_acl import admin_grant, agent_grant, api_grant, definitions, dispatcher_grant
from shared.messages import Job, Reply, ReplyKind, decode_job, encode_reply
from shared.settings import Durability
from shared.topology import Topology
from tests.conftest import require_services
from tests.support.amqp import to_message
from tests.support.procs import ROOT, Stack, free_port, running_stack, wait_for
from tests.support.rig import AGENT_TOKENS, MESSAGES, Router

AGENT_MODEL_ARGS = ("--agent-model", "local_a", "--agent-model", "local_b")
ROLES = ("admin", "api", "dispatcher", "agent-a", "agent-b")


def rabbitmqctl(*args: str) -> str:
    done = subprocess.run(
        ["rabbitmqctl", "-q", *args],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.stdout


def import_definitions(document: dict[str, Any], vhost: str, last_user: str) -> None:
    """Import from a file the broker's own user can read (Debian's rabbitmqctl runs as
    `rabbitmq`, and pytest's tmp folders are private); the import runs asynchronously, so
    wait until its last step (topic permissions) is visible."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", dir="/tmp") as file:
        json.dump(document, file)
        file.flush()
        os.chmod(file.name, 0o644)
        rabbitmqctl("import_definitions", file.name)
    wait_for(
        lambda: last_user in rabbitmqctl("list_topic_permissions", "-p", vhost),
        timeout=30,
        message="definitions not imported",
    )


@dataclass
class Acl:
    vhost: str
    users: dict[str, str]  # role -> user
    passwords: dict[str, str]  # user -> password
    topology: Topology

    def url(self, role: str) -> str:
        user = self.users[role]
        return f"amqp://{user}:{self.passwords[user]}@127.0.0.1:5672/{self.vhost}"

    @property
    def reply_users(self) -> str:
        u = self.users
        return f"{u['dispatcher']}=*,{u['agent-a']}=local_a,{u['agent-b']}=local_b"

    def service_env(self, role: str) -> dict[str, str]:
        return {
            "RABBITMQ_URL": self.url(role),
            "DECLARE_TOPOLOGY": "false",
            "REPLY_USERS": self.reply_users,
        }


@pytest.fixture
def acl(tmp_path: Path) -> Iterator[Acl]:
    require_services()
    if shutil.which("rabbitmqctl") is None:
        reason = "rabbitmqctl not installed: cannot create broker users"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI runs on a machine with RabbitMQ's tools")
        pytest.skip(reason)
    suffix = uuid.uuid4().hex[:8]
    namespace = f"acl{suffix}"
    topology = Topology(namespace=namespace, mode=Durability.DURABLE)
    users = {role: f"router-test-{suffix}-{role}" for role in ROLES}
    passwords = {user: secrets.token_hex(12) for user in users.values()}
    grants = [
        admin_grant(users["admin"]),
        api_grant(users["api"], topology),
        dispatcher_grant(users["dispatcher"], topology),
        agent_grant(users["agent-a"], topology, ["local_a"]),
        agent_grant(users["agent-b"], topology, ["local_b"]),
    ]
    vhost = f"router-test-{suffix}"
    import_definitions(definitions(vhost, grants, passwords), vhost, users["agent-b"])
    acl = Acl(vhost, users, passwords, topology)
    try:
        declared = subprocess.run(
            [sys.executable, "-m", "services.cli", "topology", *AGENT_MODEL_ARGS],
            env={
                **os.environ,
                "RABBITMQ_URL": acl.url("admin"),
                "BROKER_NAMESPACE": namespace,
            },
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert declared.returncode == 0, declared.stderr
        assert topology.agent_queue("local_a") in declared.stdout
        yield acl
    finally:
        rabbitmqctl("delete_vhost", vhost)
        for user in users.values():
            rabbitmqctl("delete_user", user)


@pytest.fixture
def acl_stack(acl: Acl, tmp_path: Path) -> Iterator[Stack]:
    base = {"REQUEST_TIMEOUT": "20", "LOG_LEVEL": "INFO", "CACHE_TTL": "0", "OPENAI_API_KEY": ""}
    with running_stack(base) as stack:
        stack.namespace = acl.topology.namespace
        stack.start_dispatcher(tmp_path, HEARTBEAT_TTL="60", **acl.service_env("dispatcher"))
        stack.start_api(AGENT_TOKENS=AGENT_TOKENS, **acl.service_env("api"))
        yield stack


def test_least_privilege_stack_serves_an_agent_model(
    acl: Acl, acl_stack: Stack, tmp_path: Path
) -> None:
    """Every service on its own restricted user, nothing declared by services: it works."""
    router = Router(acl_stack, tmp_path, [f"http://127.0.0.1:{acl_stack.api_ports[0]}"])
    fake = router.fake(models="a")
    router.agent("a1", fake, **acl.service_env("agent-a"))
    router.wait_listed("local_a")
    response = router.chat("local_a")
    assert response.status_code == 200, response.text
    assert response.json()["model"] == "local_a"
    stream = router.chat("local_a", stream=True)
    assert stream.status_code == 200 and stream.text.rstrip().endswith("data: [DONE]")


async def _ignore(_: aio_pika.abc.AbstractIncomingMessage) -> None:
    return None


async def _refused(url: str, action: Any) -> BaseException | None:
    """Run `action(channel)` as the user of `url`; the broker's refusal, or None."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        try:
            await action(channel)
        except ChannelClosed as e:
            return e
        return None
    finally:
        await connection.close()


def test_an_agents_broker_user_is_confined_to_its_own_models(acl: Acl) -> None:
    t = acl.topology
    url_b = acl.url("agent-b")
    job = aio_pika.Message(b"{}", type="job")

    async def consume_other_model(channel: aio_pika.abc.AbstractChannel) -> None:
        queue = await channel.declare_queue(t.agent_queue("local_a"), passive=True)
        await queue.consume(_ignore)

    async def publish_into_jobs(channel: aio_pika.abc.AbstractChannel) -> None:
        await channel.default_exchange.publish(job, t.jobs_queue)

    async def requeue_into_jobs(channel: aio_pika.abc.AbstractChannel) -> None:
        exchange = await channel.get_exchange(t.requeue_exchange)
        await exchange.publish(job, t.jobs_queue)

    async def requeue_into_other_model(channel: aio_pika.abc.AbstractChannel) -> None:
        exchange = await channel.get_exchange(t.requeue_exchange)
        await exchange.publish(job, t.agent_queue("local_a"))

    async def declare_shared_name(channel: aio_pika.abc.AbstractChannel) -> None:
        await channel.declare_queue(t.jobs_queue + ".mine", durable=True)

    async def impersonate_agent_a(channel: aio_pika.abc.AbstractChannel) -> None:
        exchange = await channel.get_exchange(t.replies_exchange)
        message = aio_pika.Message(b"{}", user_id=acl.users["agent-a"])
        await exchange.publish(message, t.reply_queue("0" * 12))

    async def exchange_hop_into_jobs(channel: aio_pika.abc.AbstractChannel) -> None:
        # Review 2026-11-29: an exchange under its cancel queue's name, bound as the source of
        # `requeue`, routed with any key (topic permissions are not checked between exchanges).
        hop = await channel.declare_exchange(t.private_queue("cancel", "c" * 12), auto_delete=True)
        requeue = await channel.get_exchange(t.requeue_exchange)
        await requeue.bind(hop, routing_key="#")  # `requeue` receives what `hop` is sent
        await hop.publish(job, t.jobs_queue)

    async def hear_every_cancel(channel: aio_pika.abc.AbstractChannel) -> None:
        # Review 2026-11-29: with no topic permission on `cancels`, an agent bound `#`.
        queue = await channel.declare_queue(t.private_queue("cancel", "b" * 12), exclusive=True)
        await queue.bind(t.cancel_exchange, routing_key="#")

    async def hear_other_models_cancels(channel: aio_pika.abc.AbstractChannel) -> None:
        queue = await channel.declare_queue(t.private_queue("cancel", "b" * 12), exclusive=True)
        await queue.bind(t.cancel_exchange, routing_key="local_a")

    async def own_model(channel: aio_pika.abc.AbstractChannel) -> None:
        queue = await channel.declare_queue(t.agent_queue("local_b"), passive=True)
        tag = await queue.consume(_ignore)
        await queue.cancel(tag)
        exchange = await channel.get_exchange(t.agent_requeue_exchange("local_b"))
        await exchange.publish(aio_pika.Message(b"{}", expiration=0.001), "")
        cancels = await channel.declare_queue(t.private_queue("cancel", "b" * 12), exclusive=True)
        await cancels.bind(t.cancel_exchange, routing_key="local_b")

    async def check() -> None:
        for action in (
            consume_other_model,
            publish_into_jobs,
            requeue_into_jobs,
            requeue_into_other_model,
            declare_shared_name,
            hear_every_cancel,
            hear_other_models_cancels,
            exchange_hop_into_jobs,
        ):
            refusal = await _refused(url_b, action)
            assert isinstance(refusal, ChannelAccessRefused), action.__name__
        refusal = await _refused(url_b, impersonate_agent_a)
        assert isinstance(refusal, ChannelPreconditionFailed)  # user_id is checked by the broker
        assert await _refused(url_b, own_model) is None  # its own queue: allowed

    asyncio.run(check())


def _take_job(acl: Acl, model: str, timeout: float = 10.0) -> Job:
    """Take the next job for `model` off its queue (as admin), as an agent would receive it."""

    async def take() -> Job:
        connection = await aio_pika.connect(acl.url("admin"))
        try:
            # aiormq's basic.get gives the message as the router's consumers receive it.
            channel = await (await connection.channel()).get_underlay_channel()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                message = await channel.basic_get(acl.topology.agent_queue(model), no_ack=True)
                if message.delivery_tag is not None:  # None: the queue was empty
                    return decode_job(envelope_of(message))
                await asyncio.sleep(0.05)
            raise TimeoutError(f"no job for {model}")
        finally:
            await connection.close()

    return asyncio.run(take())


def _reply_as(acl: Acl, role: str, job: Job, content: str) -> None:
    """Publish a whole answer to `job` through the replies exchange, as `role`'s user."""
    body = {
        "id": f"chatcmpl-{role}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": job.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
    }
    reply = Reply(ReplyKind.FINAL, job.request_id, f"att-{role}", body=json.dumps(body).encode())

    async def publish() -> None:
        connection = await aio_pika.connect(acl.url(role))
        try:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.get_exchange(acl.topology.replies_exchange)
            message = to_message(encode_reply(reply), persistent=False, user_id=acl.users[role])
            await exchange.publish(message, job.reply_to)
        finally:
            await connection.close()

    asyncio.run(publish())


def test_a_reply_from_an_agent_not_serving_the_model_is_dropped(acl: Acl, acl_stack: Stack) -> None:
    """Agent B's user learned a local_a job's id and reply queue: its forged answer (a valid
    publish, with its own user_id) never reaches the client; agent A's answer does."""
    api = f"http://127.0.0.1:{acl_stack.api_ports[0]}"

    def registered_and_listed() -> bool:
        # Registered again until listed, as heartbeats would: the dispatcher may not have
        # bound its control queue yet when the first registration is broadcast.
        response = httpx.post(
            f"{api}/register",
            json={"name": "a1", "models": ["local_a"]},
            headers={"Authorization": "Bearer tok-a1"},
            timeout=5,
        )
        assert response.status_code == 200, response.text
        return "local_a" in _listed(api)

    wait_for(registered_and_listed, timeout=15, interval=0.5, message="local_a not listed")

    answer: dict[str, httpx.Response] = {}
    client = threading.Thread(
        target=lambda: answer.setdefault(
            "response",
            httpx.post(
                f"{api}/v1/chat/completions",
                json={"model": "local_a", "messages": MESSAGES},
                timeout=25,
            ),
        )
    )
    client.start()
    job = _take_job(acl, "local_a")
    _reply_as(acl, "agent-b", job, "forged by agent b")
    _reply_as(acl, "agent-a", job, "the real answer")
    client.join(timeout=25)
    response = answer["response"]
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "the real answer"
    api_log = next(s for s in acl_stack.services if s.name == "api").log()
    assert "not allowed to answer it" in api_log


def _listed(api: str) -> list[str]:
    response = httpx.get(f"{api}/v1/models", timeout=5)
    return [entry["id"] for entry in response.json().get("data", [])]


def test_services_do_not_create_a_missing_topology(acl: Acl, tmp_path: Path) -> None:
    """DECLARE_TOPOLOGY=false only checks: in a namespace nobody declared, the API stays
    unready (503) and says what to run, and so does the dispatcher; neither creates anything."""
    with running_stack({"LOG_LEVEL": "INFO"}) as stack:  # a fresh, undeclared namespace
        port = free_port()
        api = stack.start("api", ["api"], API_PORT=str(port), **acl.service_env("api"))
        dispatcher = stack.start_dispatcher(tmp_path, **acl.service_env("dispatcher"))
        wait_for(lambda: "router topology" in api.log(), timeout=15, message="no hint logged")
        assert httpx.get(f"http://127.0.0.1:{port}/ready", timeout=5).status_code == 503
        wait_for(lambda: "router topology" in dispatcher.log(), timeout=15, message="no hint")
        assert dispatcher.is_running()  # it keeps checking, so declaring later is enough
        unwanted = Topology(namespace=stack.namespace).jobs_queue

        async def exists() -> bool:
            return await _refused(acl.url("admin"), _passive(unwanted)) is None

        assert not asyncio.run(exists())


def _passive(name: str) -> Any:
    async def check(channel: aio_pika.abc.AbstractChannel) -> None:
        await channel.declare_queue(name, passive=True)

    return check


def _router(acl: Acl, role: str, *argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`router <argv>` as `role`'s broker user, in the acl's namespace, run to its end."""
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *argv],
        env={
            **os.environ,
            "BROKER_NAMESPACE": acl.topology.namespace,
            "LOG_LEVEL": "INFO",
            "CACHE_TTL": "0",
            **acl.service_env(role),
            **env,
        },
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_user_without_the_rights_stops_a_service_with_one_line(acl: Acl, tmp_path: Path) -> None:
    """A dispatcher on the API's user (or grants made for another DURABILITY) used to end in
    aiormq's 86-line ChannelAccessRefused traceback: now one line naming user and queue."""
    done = _router(acl, "api", "dispatcher", REGISTRY_PATH=str(tmp_path / "registry.sqlite3"))
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    [line] = [line for line in done.stderr.splitlines() if "cannot start" in line]
    assert "ACCESS_REFUSED" in line and acl.users["api"] in line
    assert f"{acl.topology.prefix}.control." in line  # the queue it was refused


def test_topology_refused_is_one_line_and_exit_1(acl: Acl) -> None:
    """`router topology` as a user that may not declare, or over agent queues made with
    another AGENT_QUEUE_TTL, ended in a traceback; now one line each, exit code 1."""
    done = _router(acl, "api", "topology")
    assert done.returncode == 1, done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith("router topology: the broker refused: ACCESS_REFUSED")
    assert acl.users["api"] in line and "administrator" in line  # not a service's grants

    done = _router(acl, "admin", "topology", *AGENT_MODEL_ARGS, AGENT_QUEUE_TTL="10")
    assert done.returncode == 1, done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith(f"router topology: queue {acl.topology.agent_queue('local_a')} exists")
    assert "AGENT_QUEUE_TTL" in line
