"""Fault-injection fixtures: the suite's own RabbitMQ node and Redis, and router stacks on them.

The node and Redis are session-scoped (a RabbitMQ start costs ~5-10 s here) and each case gets
a fresh broker namespace, so leftovers of one case never meet the next. A case that stops,
kills or pauses them leaves them to `healthy_servers`, which brings them back before the next
case. Nothing here touches the machine's shared RabbitMQ (5672) or Redis (6379).

Locally, a machine without `rabbitmq-server` or `redis-server` skips the suite; with `CI` set it
fails instead (a skipped fault suite proves nothing).
"""

from __future__ import annotations

import atexit
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.faults.harness.nodes import RabbitNode, RedisNode, rabbitmq_installed, redis_installed
from tests.faults.harness.router import FaultRouter
from tests.support.procs import running_stack

# Short enough that a case sees many requests end; generous for a busy 2-core machine.
BASE_ENV = {
    "LOG_LEVEL": "INFO",
    "PUBLISH_TIMEOUT": "2",
    "HEARTBEAT_TTL": "3",
    "DRAIN_TIMEOUT": "2",
    "STREAM_IDLE_TIMEOUT": "3",
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "faults: fault injection on the suite's own RabbitMQ node and Redis"
    )


def require_fault_tools() -> None:
    missing = [
        name
        for name, present in (
            ("rabbitmq-server", rabbitmq_installed()),
            ("redis-server", redis_installed()),
        )
        if not present
    ]
    if not missing:
        return
    reason = f"{' and '.join(missing)} not installed: the fault suite runs its own"
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must provide them")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def rabbit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitNode]:
    require_fault_tools()
    node = RabbitNode(tmp_path_factory.mktemp("rabbit"))
    atexit.register(node.kill)  # even if the session dies before the finalizer runs
    node.start()
    yield node
    node.kill()


@pytest.fixture(scope="session")
def redis_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisNode]:
    require_fault_tools()
    node = RedisNode(tmp_path_factory.mktemp("redis"))
    atexit.register(node.kill)
    node.start()
    yield node
    node.kill()


@pytest.fixture(autouse=True)
def healthy_servers(rabbit: RabbitNode, redis_node: RedisNode) -> Iterator[None]:
    """Each case starts on a running, unpaused node and Redis, whatever the last one did."""
    _revive(rabbit, redis_node)
    yield
    _revive(rabbit, redis_node)


def _revive(rabbit: RabbitNode, redis_node: RedisNode) -> None:
    rabbit.resume()
    redis_node.resume()
    if not rabbit.is_running():
        rabbit.start()
    if not redis_node.is_running() or not redis_node.ping():
        redis_node.kill()
        redis_node.start()


RouterFactory = Callable[..., FaultRouter]


@pytest.fixture
def make_router(
    rabbit: RabbitNode, redis_node: RedisNode, tmp_path: Path
) -> Iterator[RouterFactory]:
    """`make_router(durability=..., broker_proxy=False, **env)`: a stack with no process yet.

    With `broker_proxy=True` every service reaches the broker through a `FaultProxy`.
    """
    routers: list[FaultRouter] = []
    stacks = []

    def make(*, durability: str = "durable", broker_proxy: bool = False, **env: str) -> FaultRouter:
        proxy = None
        url = rabbit.url
        if broker_proxy:
            from tests.faults.harness.proxy import FaultProxy

            proxy = FaultProxy(rabbit.port).start()
            url = f"amqp://guest:guest@{proxy.address}/"
        base = {
            **BASE_ENV,
            "RABBITMQ_URL": url,
            "REDIS_URL": redis_node.url,
            "DURABILITY": durability,
            **env,
        }
        context = running_stack(base)
        stack = context.__enter__()
        stacks.append(context)
        router = FaultRouter(stack, tmp_path, rabbit, redis_node, broker_proxy=proxy)
        if proxy is not None:
            router.proxies.append(proxy)
        routers.append(router)
        return router

    yield make
    for router in routers:
        for service in router.stack.services:
            service.signal(signal.SIGCONT)  #: a paused process cannot stop gracefully
    for context in reversed(stacks):
        context.__exit__(None, None, None)
    for router in routers:
        router.close()
