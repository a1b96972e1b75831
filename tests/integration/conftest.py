"""Integration fixtures: one router stack (real processes, real RabbitMQ) per test session,
in its own broker namespace."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import openai
import pytest

from tests.conftest import require_services
from tests.support.procs import Stack, running_stack
from tests.support.rig import Router
from tests.support.slow_redis import SlowRedis

# The response cache is off in shared stacks: tests that count upstream calls or compare ids
# must not be answered from an earlier test's entry. tests/integration/test_cache.py turns it on.
# The developer's own OPENAI_API_KEY must never reach a test stack: cloud names would go to OpenAI.
STACK_ENV = {
    "REQUEST_TIMEOUT": "20",
    "TTFT_TIMEOUT": "15",
    "LOG_LEVEL": "INFO",
    "CACHE_TTL": "0",
    "OPENAI_API_KEY": "",
}


@pytest.fixture(scope="session")
def stack_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stack")


@pytest.fixture(scope="session")
def stack(stack_dir: Path) -> Iterator[Stack]:
    """API + dispatcher, shared by the tests that do not break anything."""
    require_services()
    with running_stack(STACK_ENV) as stack:
        stack.start_dispatcher(stack_dir)
        stack.start_api()
        yield stack


@pytest.fixture(scope="session")
def api_url(stack: Stack) -> str:
    return f"http://127.0.0.1:{stack.api_ports[0]}"


def sdk_client(base_url: str, **kwargs: object) -> openai.OpenAI:
    """The official SDK, strict: a body missing a field fails instead of being defaulted."""
    return openai.OpenAI(
        base_url=f"{base_url}/v1",
        api_key=str(kwargs.pop("api_key", "sk-test")),
        max_retries=0,
        timeout=30,
        _strict_response_validation=True,
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.fixture
def client(api_url: str) -> Iterator[openai.OpenAI]:
    with sdk_client(api_url) as c:
        yield c


@pytest.fixture
def isolated(stack_dir: Path) -> Iterator[Stack]:
    """A private stack for tests that stop or break its parts."""
    require_services()
    with running_stack(STACK_ENV) as stack:
        yield stack


@pytest.fixture
def router(tmp_path: Path) -> Iterator[Router]:
    """API (with agent tokens) and a dispatcher with a short heartbeat TTL; tests add the
    fake vLLM servers and agents they need."""
    require_services()
    with running_stack({**STACK_ENV, "STREAM_IDLE_TIMEOUT": "3"}) as stack:
        r = Router(stack, tmp_path, [])
        r.add_dispatcher()
        r.add_api()
        yield r


@pytest.fixture
async def slow_redis() -> AsyncIterator[SlowRedis]:
    """A proxy to Redis that can delay or swallow its replies (tests.support.slow_redis)."""
    proxy = SlowRedis()
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop()
