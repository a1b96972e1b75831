"""`PipelinedRedis` on the machine's Redis: each reply reaches its own caller, whatever the
callers before it did, and a connection that fails or falls silent is replaced.

Keys live under a prefix of their own, removed afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import hiredis
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
            found = [key async for key in db.scan_iter(f"{prefix}*", count=10_000)]
            if found:
                await db.delete(*found)
            await db.aclose()


@asynccontextmanager
async def opened(url: str, **timeouts: float) -> AsyncIterator[PipelinedRedis]:
    """The client for `url` (one it has a transport for), closed after the block."""
    client = PipelinedRedis.from_url(url, **timeouts)
    assert client is not None
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def pipelined() -> AsyncIterator[PipelinedRedis]:
    async with opened(URL) as client:
        yield client


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
    async with opened(slow_redis.url, reply_timeout=5) as client:
        await client.call("SET", f"{prefix}:a", "A")
        await client.call("SET", f"{prefix}:b", "B")
        slow_redis.reply_delay = 0.3
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):
                await client.call("GET", f"{prefix}:a")
        slow_redis.reply_delay = 0
        assert await client.call("GET", f"{prefix}:b") == b"B"


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


async def test_a_connection_the_server_closed_fails_its_calls_and_is_replaced(
    direct: tuple[Redis, str], slow_redis: SlowRedis
) -> None:
    client_direct, _ = direct
    async with opened(slow_redis.url) as client:
        first_id = await client.call("CLIENT", "ID")
        slow_redis.swallow_replies()  # the call below waits on this connection
        pending = asyncio.create_task(client.call("PING"))
        await asyncio.sleep(0.05)
        await client_direct.client_kill_filter(_id=first_id)
        with pytest.raises(RedisConnectionError):
            await asyncio.wait_for(pending, 0.5)  # failed by the close, not by the reply timeout
        assert await client.call("CLIENT", "ID") != first_id  # a new connection answers


async def test_a_connection_that_owes_a_reply_too_long_is_closed_and_replaced(
    direct: tuple[Redis, str], slow_redis: SlowRedis
) -> None:
    async with opened(slow_redis.url, reply_timeout=0.3) as client:
        assert await client.call("PING") == b"PONG"
        slow_redis.swallow_replies()  # of the connection open now
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(RedisConnectionError):
            await client.call("PING")
        assert 0.25 <= loop.time() - started < 2
        assert await client.call("PING") == b"PONG"  # a new connection answers


async def test_user_password_and_database_come_from_the_url(direct: tuple[Redis, str]) -> None:
    client, prefix = direct
    user, password = f"{prefix}-user", uuid.uuid4().hex
    await client.acl_setuser(
        user, enabled=True, passwords=[f"+{password}"], keys=[f"{prefix}*"], commands=["+@all"]
    )
    try:
        async with opened(f"redis://{user}:{password}@{REDIS[0]}:{REDIS[1]}/3") as good:
            await good.call("SET", f"{prefix}:in-3", "x")
        db3 = Redis.from_url(URL_DB3)
        try:
            assert await db3.get(f"{prefix}:in-3") == b"x"
        finally:
            await db3.aclose()
        assert await client.get(f"{prefix}:in-3") is None  # not in database 0

        async with opened(f"redis://{user}:wrong@{REDIS[0]}:{REDIS[1]}/0") as bad:
            with pytest.raises(ResponseError, match="WRONGPASS"):
                await bad.call("PING")
    finally:
        await client.acl_deluser(user)


async def test_a_password_without_a_user_works_on_a_server_without_passwords(
    direct: tuple[Redis, str],
) -> None:
    """As redis-py: `AUTH default <password>`, which a server without passwords accepts (the
    one-argument form is refused there, and the cache would be off)."""
    async with opened(f"redis://:anything@{REDIS[0]}:{REDIS[1]}/0") as client:
        assert await client.call("PING") == b"PONG"


@asynccontextmanager
async def redis_5(password: str) -> AsyncIterator[int]:
    """A server that speaks as Redis 5 with `requirepass`: `AUTH <password>` only (the
    two-argument form is "wrong number of arguments"), NOAUTH for anything before it."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        parser, authed = hiredis.Reader(), False
        while data := await reader.read(4096):
            parser.feed(data)
            while (command := parser.gets()) is not False:
                name = command[0].upper()
                if name == b"AUTH" and len(command) != 2:
                    writer.write(b"-ERR wrong number of arguments for 'auth' command\r\n")
                elif name == b"AUTH":
                    authed = command[1] == password.encode()
                    writer.write(b"+OK\r\n" if authed else b"-ERR invalid password\r\n")
                elif not authed:
                    writer.write(b"-NOAUTH Authentication required.\r\n")
                else:
                    writer.write(b"+PONG\r\n" if name == b"PING" else b"+OK\r\n")
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def test_a_password_without_a_user_works_on_redis_5_too() -> None:
    """Redis before 6 has no users: `AUTH default <password>` is refused there, and the cache
    would stay off. Without a user in the URL, the one-argument form follows, as in redis-py."""
    async with redis_5("s3cret") as port:
        async with opened(f"redis://:s3cret@127.0.0.1:{port}/2") as client:
            assert await client.call("PING") == b"PONG"
        async with opened(f"redis://:wrong@127.0.0.1:{port}/0") as client:
            with pytest.raises(ResponseError, match="invalid password"):
                await client.call("PING")


async def test_a_user_without_a_password_and_a_client_name(direct: tuple[Redis, str]) -> None:
    client, prefix = direct
    user = f"{prefix}-nopass"
    await client.acl_setuser(user, enabled=True, nopass=True, commands=["+@all"], keys=["*"])
    try:
        async with opened(
            f"redis://{user}@{REDIS[0]}:{REDIS[1]}/0?client_name={prefix}-n"
        ) as named:
            assert await named.call("ACL", "WHOAMI") == user.encode()
            assert await named.call("CLIENT", "GETNAME") == f"{prefix}-n".encode()
    finally:
        await client.acl_deluser(user)


@pytest.fixture
def blackhole() -> Iterator[int]:
    """A port whose listener's accept queue is full: Linux drops further SYNs, so a connect to
    it hangs (retransmitting) until it times out."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    try:
        yield port
    finally:
        for sock in (*fillers, listener):
            sock.close()


async def test_a_connect_that_hangs_fails_at_its_timeout_and_holds_up_nobody_after(
    blackhole: int,
) -> None:
    client = PipelinedRedis.from_url(f"redis://127.0.0.1:{blackhole}/0", connect_timeout=0.2)
    assert client is not None
    loop = asyncio.get_running_loop()
    try:
        started = loop.time()
        calls = await asyncio.gather(
            *(client.call("PING") for _ in range(3)), return_exceptions=True
        )
        assert all(isinstance(call, RedisConnectionError) for call in calls), calls
        # Each waiting caller tries once after the one before it: three timeouts at most.
        assert loop.time() - started < 0.2 * 3 + 1
    finally:
        started = loop.time()
        await client.aclose()
        assert loop.time() - started < 0.5


async def test_a_host_that_cannot_be_named_is_a_connection_error() -> None:
    """Not a UnicodeError past the store's fail-open handling, which catches RedisError."""
    async with opened(f"redis://{'a' * 64}.example:6379/0", connect_timeout=2) as client:
        with pytest.raises(RedisConnectionError):
            await client.call("PING")


async def test_aclose_during_a_connect_leaves_no_connection_open(
    direct: tuple[Redis, str],
) -> None:
    client_direct, prefix = direct
    client = PipelinedRedis.from_url(f"{URL}?client_name={prefix}-closing")
    assert client is not None
    call = asyncio.create_task(client.call("PING"))
    await asyncio.sleep(0)  # the call is connecting
    await client.aclose()
    await asyncio.gather(call, return_exceptions=True)
    await asyncio.sleep(0.1)
    names = [c["name"] for c in await client_direct.client_list()]
    assert f"{prefix}-closing" not in names


def test_urls_it_has_no_transport_for_are_left_to_redis_py() -> None:
    assert PipelinedRedis.from_url("rediss://cache.example:6380/0") is None
    assert PipelinedRedis.from_url("unix:///run/redis.sock") is None
    assert PipelinedRedis.from_url("redis://cache.example:6380/2") is not None
