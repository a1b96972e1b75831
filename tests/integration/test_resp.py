"""`PipelinedRedis` on the machine's Redis: each reply reaches its own caller, whatever the
callers before it did, and a connection that fails or falls silent is replaced.

Keys live under a prefix of their own, removed afterwards.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from services.dispatcher.resp import PipelinedRedis
from tests.conftest import REDIS, require_services
from tests.support.slow_redis import SlowRedis

pytestmark = pytest.mark.integration

URL = f"redis://{REDIS[0]}:{REDIS[1]}/0"
URL_DB3 = f"redis://{REDIS[0]}:{REDIS[1]}/3"


@pytest.fixture
async def direct() -> AsyncIterator[tuple[Redis, str]]:
    """redis-py on the same Redis, to see what the client did, and a key prefix to clean up."""
    require_services()
    client = Redis.from_url(URL)
    prefix = f"test-resp-{uuid.uuid4().hex[:10]}"
    try:
        yield client, prefix
    finally:
        for db in (client, Redis.from_url(URL_DB3)):
            found = [key async for key in db.scan_iter(f"{prefix}*")]
            if found:
                await db.delete(*found)
            await db.aclose()


@pytest.fixture
async def pipelined() -> AsyncIterator[PipelinedRedis]:
    client = PipelinedRedis.from_url(URL)
    assert client is not None
    try:
        yield client
    finally:
        await client.aclose()


async def test_concurrent_calls_each_get_their_own_reply(
    direct: tuple[Redis, str], pipelined: PipelinedRedis
) -> None:
    _, prefix = direct
    await pipelined.call("MSET", *(part for i in range(50) for part in (f"{prefix}:{i}", i)))
    replies = await asyncio.gather(*(pipelined.call("GET", f"{prefix}:{i}") for i in range(50)))
    assert replies == [str(i).encode() for i in range(50)]
    assert await pipelined.call("MGET", f"{prefix}:3", f"{prefix}:none") == [b"3", None]


async def test_a_caller_that_stopped_waiting_leaves_the_next_reply_to_the_next_caller(
    direct: tuple[Redis, str], slow_redis: SlowRedis
) -> None:
    _, prefix = direct
    client = PipelinedRedis.from_url(slow_redis.url, reply_timeout=5)
    assert client is not None
    try:
        await client.call("SET", f"{prefix}:a", "A")
        await client.call("SET", f"{prefix}:b", "B")
        slow_redis.reply_delay = 0.3
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):
                await client.call("GET", f"{prefix}:a")
        slow_redis.reply_delay = 0
        assert await client.call("GET", f"{prefix}:b") == b"B"
    finally:
        await client.aclose()


async def test_an_error_reply_raises_for_its_caller_only(
    direct: tuple[Redis, str], pipelined: PipelinedRedis
) -> None:
    _, prefix = direct
    await pipelined.call("SET", f"{prefix}:text", "not a number")
    incr, get = await asyncio.gather(
        pipelined.call("INCR", f"{prefix}:text"),
        pipelined.call("GET", f"{prefix}:text"),
        return_exceptions=True,
    )
    assert isinstance(incr, ResponseError) and "not an integer" in str(incr)
    assert get == b"not a number"


async def test_a_script_redis_does_not_hold_is_sent_in_full(
    direct: tuple[Redis, str], pipelined: PipelinedRedis
) -> None:
    client, prefix = direct
    source = f"-- {uuid.uuid4().hex}\nreturn redis.call('SET', KEYS[1], ARGV[1])"
    digest = client.register_script(source).sha
    assert await client.script_exists(digest) == [False]
    assert await pipelined.run_script(digest, source, [f"{prefix}:s"], ["v"]) == b"OK"
    assert await client.get(f"{prefix}:s") == b"v"
    assert await client.script_exists(digest) == [True]  # by digest from now on


async def test_a_connection_the_server_closed_is_replaced(
    direct: tuple[Redis, str], pipelined: PipelinedRedis
) -> None:
    client, prefix = direct
    await pipelined.call("CLIENT", "SETNAME", f"{prefix}-victim")
    victims = [c for c in await client.client_list() if c["name"] == f"{prefix}-victim"]
    assert len(victims) == 1
    await client.client_kill_filter(_id=victims[0]["id"])
    with pytest.raises(RedisConnectionError):
        for _ in range(50):  # the loss is seen once the close arrives
            await pipelined.call("PING")
            await asyncio.sleep(0.01)
    assert await pipelined.call("PING") == b"PONG"


async def test_a_connection_that_owes_a_reply_too_long_is_closed_and_replaced(
    direct: tuple[Redis, str], slow_redis: SlowRedis
) -> None:
    client = PipelinedRedis.from_url(slow_redis.url, reply_timeout=0.3)
    assert client is not None
    try:
        assert await client.call("PING") == b"PONG"
        slow_redis.swallow_replies()  # of the connection open now
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(RedisConnectionError):
            await client.call("PING")
        assert 0.25 <= loop.time() - started < 2
        assert await client.call("PING") == b"PONG"  # a new connection answers
    finally:
        await client.aclose()


async def test_user_password_and_database_come_from_the_url(direct: tuple[Redis, str]) -> None:
    client, prefix = direct
    user, password = f"{prefix}-user", uuid.uuid4().hex
    await client.acl_setuser(
        user, enabled=True, passwords=[f"+{password}"], keys=[f"{prefix}*"], commands=["+@all"]
    )
    try:
        good = PipelinedRedis.from_url(f"redis://{user}:{password}@{REDIS[0]}:{REDIS[1]}/3")
        assert good is not None
        try:
            await good.call("SET", f"{prefix}:in-3", "x")
        finally:
            await good.aclose()
        db3 = Redis.from_url(URL_DB3)
        try:
            assert await db3.get(f"{prefix}:in-3") == b"x"
        finally:
            await db3.aclose()
        assert await client.get(f"{prefix}:in-3") is None  # not in database 0

        bad = PipelinedRedis.from_url(f"redis://{user}:wrong@{REDIS[0]}:{REDIS[1]}/0")
        assert bad is not None
        try:
            with pytest.raises(ResponseError, match="WRONGPASS"):
                await bad.call("PING")
        finally:
            await bad.aclose()
    finally:
        await client.acl_deluser(user)


def test_urls_it_has_no_transport_for_are_left_to_redis_py() -> None:
    assert PipelinedRedis.from_url("rediss://cache.example:6380/0") is None
    assert PipelinedRedis.from_url("unix:///run/redis.sock") is None
    assert PipelinedRedis.from_url("redis://cache.example:6380/2") is not None
