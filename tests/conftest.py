"""Shared fixtures. Integration tests need the real RabbitMQ and Redis on localhost: they skip
when those are absent on a laptop, and fail when `CI` is set (a skipped suite proves nothing).
So do tests that need a tool CI always has (`skip_or_fail`)."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from bench.broker import delete_namespaces
from shared.settings import BrokerSettings
from tests.support.procs import NAMESPACES

RABBITMQ = ("127.0.0.1", 5672)
REDIS = ("127.0.0.1", 6379)


def _answers(address: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(address, timeout=1.0):
            return True
    except OSError:
        return False


def require_services() -> None:
    missing = [
        name for name, addr in (("RabbitMQ", RABBITMQ), ("Redis", REDIS)) if not _answers(addr)
    ]
    if not missing:
        return
    reason = f"{' and '.join(missing)} not answering on localhost"
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must provide them (see .ci/run)")
    pytest.skip(reason)


def skip_or_fail(reason: str) -> None:
    """Skip for want of something CI always provides (its machine runs RabbitMQ and Redis from
    Debian's packages, tools included, and .ci/run installs docker-compose); fail under `CI`."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must provide it (see .ci/run)")
    pytest.skip(reason)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under `pytest -n N --dist loadgroup` (make test) a module's tests stay on one worker, so
    module fixtures (a fuzz run's summary, a provider fake) are set up once; the fault suite is
    one group, as it shares one RabbitMQ node and Redis that its cases stop and pause."""
    for item in items:
        if item.get_closest_marker("xdist_group"):
            continue
        path = item.path.as_posix()
        group = "faults" if "/tests/faults/" in path else item.nodeid.split("::", 1)[0]
        item.add_marker(pytest.mark.xdist_group(group))


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Delete the queues and exchanges of the namespaces this process's tests used (each
    xdist worker its own). Their services are stopped by then: fixtures are torn down first."""
    if not NAMESPACES:
        return
    try:
        asyncio.run(delete_namespaces(BrokerSettings().rabbitmq_url, sorted(NAMESPACES)))
    except Exception as e:  # the suite's outcome stands; the queues only take some memory
        print(f"\ncould not delete the test namespaces' queues: {e!r}")
