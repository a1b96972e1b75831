"""The API's broker side (`services.api.bus.ApiBus`) on the real RabbitMQ: getting connected
whatever fails on the way, and knowing when it no longer is."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import aiormq
import pytest

from services.api.bus import ApiBus
from services.api.rpc import PendingCall
from services.api.settings import ApiSettings
from shared.errors import BrokerUnavailableError
from shared.messages import AgentHeartbeat
from shared.topology import topology_for
from tests.conftest import RABBITMQ, require_services
from tests.faults.harness.proxy import FaultProxy
from tests.support.procs import new_namespace

HEARTBEAT = AgentHeartbeat(name="agent-1")


def bus_on(port: int) -> ApiBus:
    settings = ApiSettings(
        rabbitmq_url=f"amqp://guest:guest@127.0.0.1:{port}/",
        broker_namespace=new_namespace(),
        durability="transient",
        publish_timeout=5,
    )
    return ApiBus(settings, topology_for(settings))


async def wait_until(condition: Callable[[], bool], what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not {what} after {timeout} s"
        await asyncio.sleep(0.05)


@pytest.fixture
def proxy() -> Iterator[FaultProxy]:
    """A TCP proxy in front of RabbitMQ, to take the broker away from the bus."""
    require_services()
    proxy = FaultProxy(RABBITMQ[1]).start()
    try:
        yield proxy
    finally:
        proxy.close()


@pytest.fixture
async def bus() -> AsyncIterator[ApiBus]:
    require_services()
    bus = bus_on(RABBITMQ[1])
    try:
        yield bus
    finally:
        await bus.stop()


async def test_a_broker_error_while_attaching_is_retried_on_fresh_connections(
    bus: ApiBus,
) -> None:
    """aiormq's errors (a channel closed mid-declare, say) are not RouterErrors: the first, at
    start, and the second, in the background, each close what was opened and try again."""
    attach = bus._attach
    attempts = 0
    abandoned: list[Any] = []

    async def failing_twice() -> None:
        nonlocal attempts
        attempts += 1
        if attempts <= 2:
            abandoned.extend([bus._broker._publish_conn, bus._broker._consume_conn])
            raise aiormq.exceptions.ChannelInvalidStateError("channel closed mid-declare")
        await attach()

    bus._attach = failing_twice  # type: ignore[method-assign]
    await bus.start()
    await wait_until(lambda: bus.is_ready, "ready")
    assert attempts == 3
    assert len(abandoned) == 4 and all(conn.is_closed for conn in abandoned)


Use = Callable[[ApiBus], Awaitable[object]]
USES: dict[str, Use] = {
    "announce": lambda bus: bus.announce(HEARTBEAT),
    "ask_models": lambda bus: bus.ask_models(1.0),
}


@pytest.mark.parametrize("use", USES)
async def test_after_losing_the_broker_publishes_fail_fast_until_it_is_back(
    proxy: FaultProxy, use: str
) -> None:
    bus = bus_on(proxy.port)
    try:
        await bus.start()
        await wait_until(lambda: bus.is_ready, "ready")
        publish = bus._broker.publish
        attempted: list[str] = []

        async def recorded(*args: Any, **kwargs: Any) -> None:
            attempted.append(args[0].type)
            await publish(*args, **kwargs)

        bus._broker.publish = recorded  # type: ignore[method-assign]
        proxy.refuse = True  # the robust connections' reconnects fail too
        proxy.reset_all()
        await wait_until(lambda: not bus.is_ready, "disconnected")

        async with asyncio.timeout(10):  # publishing into the dead connection could hang
            with pytest.raises(BrokerUnavailableError):
                await USES[use](bus)
            await bus.cancel(PendingCall("req-1", "local_a"))  # logged, never raised
        assert attempted == []  # refused without touching the dead connection

        proxy.heal()
        await wait_until(lambda: bus.is_ready, "ready again")
        if use == "announce":
            await bus.announce(HEARTBEAT)
            assert attempted == ["agent.heartbeat"]
    finally:
        proxy.heal()  # stopping consumers waits for a broker that is back
        await bus.stop()
