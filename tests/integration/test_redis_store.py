"""`RedisStore` on the machine's Redis: batched probes and writes answer each request alone,
and single-flight locks are freed by their owners only, even when a probe times out.

Keys live under a prefix of their own, removed afterwards. The whole cache through real
services is tests/integration/test_cache.py; this checks the store's scripts themselves, and
`JobCache` on them where the lock's lifecycle depends on both.
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import cast

import orjson
import pytest
from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from services.dispatcher.cache import (
    FAIL,
    OK,
    CacheUnavailableError,
    Hit,
    JobCache,
    LockRequest,
    Probe,
    Proceed,
    RedisStore,
)
from services.dispatcher.cache_key import CachePolicy, done_channel, lock_key
from shared.amqp import Delivery
from shared.cancel import Cancellations
from shared.messages import Completed, Job, encode_completed
from tests.conftest import REDIS, require_services, skip_or_fail
from tests.faults.harness.nodes import RedisNode, redis_installed, spare_port
from tests.support.slow_redis import SlowRedis

pytestmark = pytest.mark.integration

URL = f"redis://{REDIS[0]}:{REDIS[1]}/0"


class Keys:
    """Key names under a prefix of this test's own; all of them (and their locks) are deleted."""

    def __init__(self) -> None:
        self.prefix = f"test-store-{uuid.uuid4().hex[:10]}"
        self.made: list[str] = []

    def __call__(self, name: str) -> str:
        key = f"{self.prefix}:{name}"
        self.made += (key, lock_key(key))
        return key


@pytest.fixture
async def redis() -> AsyncIterator[tuple[Redis, Keys]]:
    require_services()
    client = Redis.from_url(URL)
    keys = Keys()
    try:
        yield client, keys
    finally:
        if keys.made:
            await client.delete(*keys.made)
        await client.aclose()


@pytest.fixture(params=["pipelined", "redis-py"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[RedisStore]:
    """The store as it runs (commands on its pipelined connection), and on redis-py alone, as
    it runs where that connection has no transport (TLS)."""
    if request.param == "pipelined":
        store = RedisStore.from_url(URL, timeout=1.0)
    else:
        store = RedisStore(Redis.from_url(URL), timeout=1.0)
    try:
        yield store
    finally:
        await store.aclose()


async def test_probes_in_one_burst_are_one_call_with_each_its_own_answer(
    redis: tuple[Redis, Keys], store: RedisStore
) -> None:
    client, key_named = redis
    keys = [key_named(f"k{i}") for i in range(6)]
    await client.set(keys[0], b"entry-0")
    await client.set(keys[2], b"entry-2")
    await client.set(lock_key(keys[2]), "someone")  # entry and lock both: the entry counts
    await client.set(lock_key(keys[3]), "someone")
    probes = await asyncio.gather(*(store.probe(key) for key in keys))
    assert probes == [
        Probe(b"entry-0", False),
        Probe(None, False),
        Probe(b"entry-2", True),
        Probe(None, True),
        Probe(None, False),
        Probe(None, False),
    ]
    assert store._probes.batches == 1


async def test_a_probe_asking_for_the_lock_takes_it_only_where_nothing_is_there(
    redis: tuple[Redis, Keys], store: RedisStore
) -> None:
    client, key_named = redis
    empty, cached, held, twice = (key_named(name) for name in ("empty", "cached", "held", "twice"))
    await client.set(cached, b"entry")
    await client.set(lock_key(held), "other")
    probes = await asyncio.gather(
        store.probe(empty, LockRequest("r1", 5_000)),
        store.probe(cached, LockRequest("r2", 5_000)),
        store.probe(held, LockRequest("r3", 5_000)),
        store.probe(twice, LockRequest("r4", 5_000)),
        store.probe(twice, LockRequest("r5", 5_000)),  # identical job in the same batch
    )
    assert store._probes.batches == 1
    assert probes == [
        Probe(None, False, acquired=True),
        Probe(b"entry", False),
        Probe(None, True),
        Probe(None, False, acquired=True),
        Probe(None, True),
    ]
    assert await client.get(lock_key(empty)) == b"r1"
    assert 0 < await client.pttl(lock_key(empty)) <= 5_000
    assert not await client.exists(lock_key(cached))
    assert await client.get(lock_key(held)) == b"other"
    assert await client.get(lock_key(twice)) == b"r4"


async def test_probes_that_need_no_lock_state_read_the_entries_alone(
    redis: tuple[Redis, Keys], store: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, key_named = redis
    keys = [key_named(f"e{i}") for i in range(3)]
    await client.set(keys[0], b"entry-0")
    await client.set(lock_key(keys[1]), "someone")  # held, but no caller asks

    def no_script(*_: object) -> None:
        raise AssertionError("entry-only probes ran the probe script")

    monkeypatch.setattr(store, "_eval", no_script)
    probes = await asyncio.gather(*(store.probe(key, lock_state=False) for key in keys))
    assert probes == [Probe(b"entry-0", False), Probe(None, False), Probe(None, False)]
    assert store._probes.batches == 1
    assert await client.get(lock_key(keys[1])) == b"someone"


async def test_a_burst_of_one_entry_carries_it_once_and_answers_every_probe(
    redis: tuple[Redis, Keys], store: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A popular large answer asked for by many jobs at once: N copies of it in one reply
    used to outlast the batch's timeout and turn the cache off for everyone."""
    client, key_named = redis
    big, other, missing = key_named("big"), key_named("other"), key_named("missing")
    entry = b"x" * 100_000
    await client.set(big, entry)
    await client.set(other, b"small")
    replies: list[object] = []

    def recording(call: Callable[..., Awaitable[object]]) -> Callable[..., Awaitable[object]]:
        async def wrapped(*args: object) -> object:
            reply = await call(*args)
            replies.append(reply)
            return reply

        return wrapped

    monkeypatch.setattr(store, "_mget", recording(store._mget))
    monkeypatch.setattr(store, "_eval", recording(store._eval))

    def entries_sent() -> int:
        reply = cast(list[object], replies.pop())
        return sum(isinstance(item, bytes) and item == entry for item in reply)

    # Entries only (one MGET): each key asked for once.
    probes = await asyncio.gather(
        *(store.probe(key, lock_state=False) for key in [big, other, big, big, missing, big])
    )
    assert [probe.entry for probe in probes] == [entry, b"small", entry, entry, None, entry]
    assert entries_sent() == 1
    # With single flight (the probe script): every ask still gets its own lock state.
    probes = await asyncio.gather(
        store.probe(big),
        store.probe(missing, LockRequest("r1", 5_000)),
        store.probe(big, LockRequest("r2", 5_000)),
        store.probe(missing, LockRequest("r3", 5_000)),
        store.probe(big),
        store.probe(other, LockRequest("r4", 5_000)),
    )
    assert store._probes.batches == 2
    assert probes == [
        Probe(entry, False),
        Probe(None, False, acquired=True),
        Probe(entry, False),
        Probe(None, True),
        Probe(entry, False),
        Probe(b"small", False),
    ]
    assert entries_sent() == 1
    assert await client.get(lock_key(missing)) == b"r1"
    assert not await client.exists(lock_key(big))


async def test_a_batch_with_a_single_flight_probe_reads_locks_only_for_it(
    redis: tuple[Redis, Keys], store: RedisStore
) -> None:
    client, key_named = redis
    sampled, deterministic = key_named("sampled"), key_named("deterministic")
    await client.set(lock_key(sampled), "someone")
    await client.set(lock_key(deterministic), "someone")
    probes = await asyncio.gather(
        store.probe(sampled, lock_state=False), store.probe(deterministic)
    )
    assert store._probes.batches == 1
    assert probes == [Probe(None, False), Probe(None, True)]


async def test_writes_in_one_burst_store_each_entry_free_its_lock_and_say_ok(
    redis: tuple[Redis, Keys], store: RedisStore
) -> None:
    client, key_named = redis
    keys = [key_named(f"w{i}") for i in range(4)]
    for key in keys:
        await client.set(lock_key(key), "leader")
    async with subscribed(client, *(done_channel(key) for key in keys)) as pubsub:
        await asyncio.gather(
            *(
                store.write(key, f"body-{i}".encode(), 30 + i, "leader")
                for i, key in enumerate(keys)
            )
        )
        assert store._writes.batches == 1
        for i, key in enumerate(keys):
            assert await client.get(key) == f"body-{i}".encode()
            assert 0 < await client.ttl(key) <= 30 + i
            assert not await client.exists(lock_key(key))
        told = dict([await next_message(pubsub) for _ in keys])
        assert told == {done_channel(key).encode(): OK for key in keys}


async def test_a_probe_against_no_redis_fails_as_unavailable() -> None:
    store = RedisStore.from_url("redis://127.0.0.1:1/0", timeout=0.5)
    try:
        with pytest.raises(CacheUnavailableError):
            await asyncio.gather(store.probe("a"), store.probe("b"))
    finally:
        await store.aclose()


async def test_a_probe_from_the_locks_own_owner_takes_it_again(
    redis: tuple[Redis, Keys], store: RedisStore
) -> None:
    """The same job delivered again leads again (its expiry renewed) instead of waiting for
    itself; an unreadable entry found beside its own lock is not someone else's lock."""
    client, key_named = redis
    again, unreadable, other = (key_named(name) for name in ("again", "unreadable", "other"))
    for key in (again, unreadable, other):
        await client.set(lock_key(key), "r1", px=1_000)
    await client.set(unreadable, b"not json")
    probes = await asyncio.gather(
        store.probe(again, LockRequest("r1", 30_000)),
        store.probe(unreadable, LockRequest("r1", 30_000)),
        store.probe(other, LockRequest("r2", 30_000)),
    )
    assert probes == [
        Probe(None, False, acquired=True),
        Probe(b"not json", False),
        Probe(None, True),
    ]
    assert await client.pttl(lock_key(again)) > 1_000
    assert await client.get(lock_key(other)) == b"r1"


async def test_acquire_takes_a_free_lock_or_its_owners_own(
    redis: tuple[Redis, Keys], store: RedisStore
) -> None:
    client, key_named = redis
    free, held = key_named("free"), key_named("held")
    await client.set(lock_key(held), "r1", px=1_000)
    assert await store.acquire(free, "r2", 30_000)
    assert await store.acquire(held, "r1", 30_000)
    assert await client.pttl(lock_key(held)) > 1_000
    assert not await store.acquire(held, "r2", 30_000)
    assert await client.get(lock_key(held)) == b"r1"
    assert await client.get(lock_key(free)) == b"r2"


async def test_a_write_frees_the_lock_only_for_its_owner_but_always_says_ok(
    redis: tuple[Redis, Keys], store: RedisStore
) -> None:
    client, key_named = redis
    mine, theirs, legacy = (key_named(name) for name in ("mine", "theirs", "legacy"))
    for key in (mine, theirs, legacy):
        await client.set(lock_key(key), "leader")
    async with subscribed(client, done_channel(theirs)) as pubsub:
        await asyncio.gather(
            store.write(mine, b"body", 30, "leader"),
            store.write(theirs, b"body", 30, "no-cache-job"),
            store.write(legacy, b"body", 30, None),  # a producer that predates request ids
        )
        assert [await client.get(key) for key in (mine, theirs, legacy)] == [b"body"] * 3
        assert not await client.exists(lock_key(mine))
        assert await client.get(lock_key(theirs)) == b"leader"
        assert not await client.exists(lock_key(legacy))
        # The leader's waiters have their entry.
        assert await next_message(pubsub) == (done_channel(theirs).encode(), OK)


async def test_an_abandon_frees_the_lock_and_tells_the_waiters_only_for_its_owner(
    redis: tuple[Redis, Keys], store: RedisStore
) -> None:
    client, key_named = redis
    theirs, mine = key_named("theirs"), key_named("mine")
    for key in (theirs, mine):
        await client.set(lock_key(key), "leader")
    async with subscribed(client, done_channel(theirs), done_channel(mine)) as pubsub:
        await store.abandon(theirs, "no-cache-job")
        await store.abandon(mine, "leader")
        assert await client.get(lock_key(theirs)) == b"leader"
        assert not await client.exists(lock_key(mine))
        # One subscriber gets messages in the order they were published: `fail` for `mine`
        # first means nothing was published for `theirs` before it.
        assert await next_message(pubsub) == (done_channel(mine).encode(), FAIL)


async def test_on_redis_a_failed_job_without_the_lock_leaves_the_leaders_waiters_waiting(
    redis: tuple[Redis, Keys], store: RedisStore
) -> None:
    """A `no-cache` job carries the key but not the lock: its failure must not send the
    leader's waiters upstream while the leader still runs."""
    client, keys = redis
    cache = JobCache(
        store, CachePolicy(prefix=keys("cache:v1"), ttl=60), cancellations=Cancellations()
    )
    leader = await cache.lookup(deterministic_job("A"))
    assert isinstance(leader, Proceed) and leader.job.cache_key is not None
    key = leader.job.cache_key
    keys.made += (key, lock_key(key))
    follower = asyncio.create_task(cache.lookup(deterministic_job("C")))
    await eventually(lambda: answer(cache.waiting == 1))
    fresh = await cache.lookup(deterministic_job("B", cache_control="no-cache"))
    assert isinstance(fresh, Proceed) and fresh.job.cache_key == key
    await cache.on_completed(encode_completed([Completed(key, b"", 502, "B")]), NO_DELIVERY)
    assert await client.get(lock_key(key)) == b"A"
    await cache.on_completed(encode_completed([Completed(key, ANSWER, 200, "A")]), NO_DELIVERY)
    assert isinstance(await asyncio.wait_for(follower, 5), Hit)
    assert not await client.exists(lock_key(key))


async def test_a_probe_that_timed_out_frees_the_lock_redis_took_for_it(
    redis: tuple[Redis, Keys], slow_redis: SlowRedis
) -> None:
    """Redis runs a probe whose caller gave up (and bypassed the cache); once its late answer
    is back, the lock it took is freed instead of stalling identical requests."""
    client, key_named = redis
    key = key_named("late")
    store = RedisStore.from_url(slow_redis.url, timeout=0.1)
    try:
        await store.probe(key_named("warm"), LockRequest("warm", 1_000))  # connected, loaded
        slow_redis.reply_delay = 0.5
        with pytest.raises(CacheUnavailableError):
            await store.probe(key, LockRequest("r1", 30_000))
        assert await client.get(lock_key(key)) == b"r1"  # taken all the same
        await eventually(lambda: gone(client, lock_key(key)))
    finally:
        await store.aclose()


async def test_a_probe_that_never_got_an_answer_frees_the_locks_it_asked_for(
    redis: tuple[Redis, Keys], slow_redis: SlowRedis
) -> None:
    client, key_named = redis
    key = key_named("lost")
    store = RedisStore.from_url(slow_redis.url, timeout=0.1)
    try:
        await store.probe(key_named("warm"), LockRequest("warm", 1_000))
        slow_redis.swallow_replies()  # of the connection open now; new ones answer
        with pytest.raises(CacheUnavailableError):
            await store.probe(key, LockRequest("r1", 30_000))
        assert await client.get(lock_key(key)) == b"r1"
        await eventually(lambda: gone(client, lock_key(key)))
    finally:
        await store.aclose()


@pytest.mark.parametrize("lost", [False, True], ids=["late", "never"])
async def test_an_acquire_that_timed_out_frees_the_lock_redis_took_for_it(
    redis: tuple[Redis, Keys], slow_redis: SlowRedis, lost: bool
) -> None:
    """The lock taken on its own (a `no-cache` deterministic request) is freed like a probe's:
    its job bypasses the cache with no key, so no answer of its would ever free it, and an
    identical request would wait out the whole lock for a leader that never answers."""
    client, key_named = redis
    key = key_named("acquired")
    store = RedisStore.from_url(slow_redis.url, timeout=0.1)
    try:
        assert await store.acquire(key_named("warm"), "warm", 1_000)  # connected, loaded
        if lost:
            slow_redis.swallow_replies()
        else:
            slow_redis.reply_delay = 0.5
        with pytest.raises(CacheUnavailableError):
            await store.acquire(key, "r1", 30_000)
        assert await client.get(lock_key(key)) == b"r1"  # taken all the same
        await eventually(lambda: gone(client, lock_key(key)))
    finally:
        await store.aclose()


@pytest.fixture(params=["out-of-memory", "read-only"])
def refusing_redis(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[RedisNode, Callable[[], None]]]:
    """A redis-server of the test's own, and the way to make it refuse writes while it still
    answers reads: `maxmemory` reached under `noeviction` (Redis's default policy), or a
    replica whose primary is gone (`READONLY`, as after a failover)."""
    if not redis_installed():  # it is wherever Redis runs from Debian's packages, as in CI
        skip_or_fail("redis-server is not installed: no private Redis to make refuse writes")
    node = RedisNode(tmp_path)
    node.start()

    def refuse() -> None:
        with socket.create_connection(("127.0.0.1", node.port), timeout=5) as conn:
            if request.param == "out-of-memory":
                conn.sendall(b"CONFIG SET maxmemory 1\r\n")
            else:  # a primary on a port nobody listens on: the replica keeps its data
                conn.sendall(f"REPLICAOF 127.0.0.1 {spare_port()}\r\n".encode())
            assert conn.recv(64).startswith(b"+OK")

    try:
        yield node, refuse
    finally:
        node.kill()


async def test_a_redis_refusing_writes_still_serves_hits_and_frees_waiters_at_once(
    refusing_redis: tuple[RedisNode, Callable[[], None]],
) -> None:
    """Redis up but refusing writes: a leader's answer it will not store sends the leader's
    waiters upstream at once (not after the single-flight wait), a deterministic miss goes on
    without a lock, and the entries already stored are still served: no breaker opens."""
    node, refuse = refusing_redis
    store = RedisStore.from_url(node.url, timeout=1.0)
    cache = JobCache(
        store,
        CachePolicy(prefix="refusing:cache:v1", ttl=60),
        cancellations=Cancellations(),
        single_flight_wait=30,
    )
    try:
        stored = await cache.lookup(deterministic_job("S"))
        assert isinstance(stored, Proceed) and stored.job.cache_key is not None
        await cache.on_completed(
            encode_completed([Completed(stored.job.cache_key, ANSWER, 200, "S")]), NO_DELIVERY
        )
        leader = await cache.lookup(deterministic_job("A", question="other"))
        assert isinstance(leader, Proceed) and leader.job.cache_key is not None
        follower = asyncio.create_task(cache.lookup(deterministic_job("B", question="other")))
        await eventually(lambda: subscribers(node.url, done_channel(leader.job.cache_key)))
        refuse()

        started = time.monotonic()
        await cache.on_completed(
            encode_completed([Completed(leader.job.cache_key, ANSWER, 200, "A")]), NO_DELIVERY
        )
        routed = await asyncio.wait_for(follower, 5)
        assert isinstance(routed, Proceed) and routed.job.cache_status == "miss"
        # An identical request after the refusal does not wait on the lock a read-only replica
        # would not let anyone free either.
        late = await asyncio.wait_for(cache.lookup(deterministic_job("L", question="other")), 5)
        assert isinstance(late, Proceed) and late.job.cache_status == "miss"
        assert time.monotonic() - started < 2  # not the 30 s single-flight wait

        assert isinstance(await cache.lookup(deterministic_job("C")), Hit)  # still served
        fresh = await cache.lookup(deterministic_job("D", question="third"))
        assert isinstance(fresh, Proceed) and fresh.job.cache_status == "miss"
        assert isinstance(await cache.lookup(deterministic_job("E")), Hit)  # no breaker
    finally:
        await store.aclose()


# --- helpers -----------------------------------------------------------------------------------

NO_DELIVERY = cast(Delivery, None)
ANSWER = orjson.dumps(
    {
        "id": "chatcmpl-a",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "42"}, "finish_reason": "stop"}
        ],
    }
)


def deterministic_job(
    request_id: str, cache_control: str | None = None, *, question: str = "q"
) -> Job:
    body = {"model": "m", "messages": [{"role": "user", "content": question}], "temperature": 0}
    return Job(
        request_id=request_id,
        model="m",
        reply_to="reply.q",
        deadline=time.time() + 60,
        body=orjson.dumps(body),
        cache_control=cache_control,
    )


async def answer(value: bool) -> bool:
    return value


async def subscribers(url: str, channel: str) -> bool:
    """Whether anyone listens on `channel` (a follower waits there, past its subscribe)."""
    client = Redis.from_url(url)
    try:
        [(_, count)] = await client.pubsub_numsub(channel)
        return bool(count)
    finally:
        await client.aclose()


async def gone(client: Redis, key: str) -> bool:
    return not await client.exists(key)


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    """Let the loop run until `check()` holds (TimeoutError after `timeout`)."""
    async with asyncio.timeout(timeout):
        while True:
            if await check():
                return
            await asyncio.sleep(0.02)


@asynccontextmanager
async def subscribed(client: Redis, *channels: str) -> AsyncIterator[PubSub]:
    """A pub/sub connection listening on `channels`, closed after the block."""
    pubsub = client.pubsub()
    await pubsub.subscribe(*channels)
    try:
        yield pubsub
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]


async def next_message(pubsub: PubSub) -> tuple[bytes, bytes]:
    """The next message published to `pubsub`'s channels: (channel, data)."""
    async with asyncio.timeout(5):
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
            if message is not None:
                return message["channel"], message["data"]
