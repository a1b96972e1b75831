"""`RedisStore` on the machine's Redis: batched probes and writes answer each request alone.

Keys live under a prefix of their own, removed afterwards. The whole cache through real
services is tests/integration/test_cache.py; this checks the two batched scripts themselves.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from services.dispatcher.cache import OK, CacheUnavailableError, LockRequest, Probe, RedisStore
from services.dispatcher.cache_key import done_channel, lock_key
from tests.conftest import REDIS, require_services

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


@pytest.fixture
async def store() -> AsyncIterator[RedisStore]:
    store = RedisStore.from_url(URL, timeout=1.0)
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

    def no_script(**_: object) -> None:
        raise AssertionError("entry-only probes ran the probe script")

    monkeypatch.setattr(store, "_probe_script", no_script)
    probes = await asyncio.gather(*(store.probe(key, lock_state=False) for key in keys))
    assert probes == [Probe(b"entry-0", False), Probe(None, False), Probe(None, False)]
    assert store._probes.batches == 1
    assert await client.get(lock_key(keys[1])) == b"someone"


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
    pubsub = client.pubsub()
    await pubsub.subscribe(*(done_channel(key) for key in keys))
    try:
        await asyncio.gather(
            *(store.write(key, f"body-{i}".encode(), 30 + i) for i, key in enumerate(keys))
        )
        assert store._writes.batches == 1
        for i, key in enumerate(keys):
            assert await client.get(key) == f"body-{i}".encode()
            assert 0 < await client.ttl(key) <= 30 + i
            assert not await client.exists(lock_key(key))
        told: dict[bytes, bytes] = {}
        async with asyncio.timeout(5):
            while len(told) < len(keys):
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
                if message is not None:
                    told[message["channel"]] = message["data"]
        assert told == {done_channel(key).encode(): OK for key in keys}
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]


async def test_a_probe_against_no_redis_fails_as_unavailable() -> None:
    store = RedisStore.from_url("redis://127.0.0.1:1/0", timeout=0.5)
    try:
        with pytest.raises(CacheUnavailableError):
            await asyncio.gather(store.probe("a"), store.probe("b"))
    finally:
        await store.aclose()
