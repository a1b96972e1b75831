"""The cache in front of routing: hits, misses, the write path, fail-open and single flight.

`JobCache` runs here on an in-memory `CacheStore` (the same contract as `RedisStore`), so every
decision is checked without a socket; tests/integration/test_cache.py runs it on real Redis.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

import orjson
import pytest

from services.dispatcher.cache import (
    Breaker,
    CacheUnavailableError,
    Hit,
    JobCache,
    LockRequest,
    Probe,
    Proceed,
    single_flight_waiters,
)
from services.dispatcher.cache_key import CachePolicy
from services.dispatcher.handler import DispatcherHandler
from services.dispatcher.registry import AgentTable, Registry, SqliteStore
from services.dispatcher.routing import ProviderRule
from shared.amqp import Broker, Delivery
from shared.cancel import Cancellations
from shared.completed import CompletedBatcher
from shared.errors import BrokerUnavailableError
from shared.messages import (
    AgentRegistration,
    Completed,
    Envelope,
    Job,
    Reply,
    ReplyKind,
    decode_completed,
    decode_reply,
    encode_cancel,
    encode_completed,
    encode_job,
)
from shared.replies import ReplyPublisher
from shared.reply_trust import ReplyTrust
from shared.topology import Topology

POLICY = CachePolicy(prefix="ns:cache:v1", ttl=60)
ANSWER = orjson.dumps(
    {
        "id": "chatcmpl-leader",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "42"}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
)
NO_DELIVERY = cast(Delivery, None)


class MemoryStore:
    """`CacheStore` in memory, with `RedisStore`'s lock owners; `down` makes every operation
    fail like a dead Redis."""

    def __init__(self) -> None:
        self.entries: dict[str, bytes] = {}
        self.locks: dict[str, str] = {}
        self.calls = 0
        self.waits: list[float] = []
        self.down = False
        self.lock_reads: list[bool] = []  # per probe: whether it asked for the lock's state
        self._changed = asyncio.Condition()

    def _use(self) -> None:
        self.calls += 1
        if self.down:
            raise CacheUnavailableError("redis: ConnectionError")

    async def probe(
        self, key: str, lock: LockRequest | None = None, *, lock_state: bool = True
    ) -> Probe:
        self._use()
        self.lock_reads.append(lock_state)
        entry, holder = self.entries.get(key), self.locks.get(key)
        mine = lock is not None and holder == lock.owner
        if lock is not None and entry is None and (holder is None or mine):
            self.locks[key] = lock.owner
            return Probe(None, False, acquired=True)
        return Probe(entry, holder is not None and not mine and lock_state)

    async def acquire(self, key: str, owner: str, ttl_ms: int) -> bool:
        self._use()
        return self.locks.setdefault(key, owner) == owner

    async def wait(self, key: str, timeout: float) -> bytes | None:
        self._use()
        self.waits.append(timeout)
        async with self._changed:
            try:
                async with asyncio.timeout(timeout):
                    await self._changed.wait_for(
                        lambda: key in self.entries or key not in self.locks
                    )
            except TimeoutError:
                return None
        return self.entries.get(key)

    async def write(self, key: str, body: bytes, ttl: int, owner: str | None) -> None:
        self._use()
        self.entries[key] = body
        if owner is None or self.locks.get(key) == owner:
            self.locks.pop(key, None)
        async with self._changed:
            self._changed.notify_all()

    async def abandon(self, key: str, owner: str | None) -> None:
        self._use()
        if owner is None or self.locks.get(key) == owner:
            self.locks.pop(key, None)
            async with self._changed:
                self._changed.notify_all()

    async def release(self, key: str, owner: str) -> None:
        await self.abandon(key, owner)

    async def aclose(self) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_cache(
    store: MemoryStore | None = None, policy: CachePolicy = POLICY, **kwargs: Any
) -> JobCache:
    return JobCache(
        store if store is not None else MemoryStore(),
        policy,
        cancellations=kwargs.pop("cancellations", Cancellations()),
        **kwargs,
    )


def job(request_id: str = "r1", **changes: Any) -> Job:
    body = changes.pop("body", {"model": "m", "messages": [{"role": "user", "content": "q"}]})
    return Job(
        request_id=request_id,
        model="m",
        reply_to="reply.q",
        deadline=changes.pop("deadline", 1e12),
        body=orjson.dumps(body),
        **changes,
    )


DETERMINISTIC = {"model": "m", "messages": [{"role": "user", "content": "q"}], "temperature": 0}


async def complete(
    cache: JobCache, proceeded: Proceed, body: bytes = ANSWER, status: int = 200
) -> None:
    """What the producer and the writer do for a routed job: publish and consume the event."""
    assert proceeded.job.cache_key is not None
    event = Completed(proceeded.job.cache_key, body, status, proceeded.job.request_id)
    env = encode_completed([event])
    await cache.on_completed(env, NO_DELIVERY)


# --- hit and miss ------------------------------------------------------------------------------


async def test_a_miss_carries_its_key_and_the_repeat_is_a_hit() -> None:
    cache = make_cache()
    first = await cache.lookup(job("r1"))
    assert isinstance(first, Proceed)
    assert first.job.cache_status == "miss"
    assert first.job.cache_key is not None and first.job.cache_key.startswith(
        "ns:cache:v1:anonymous:"
    )
    await complete(cache, first)

    second = await cache.lookup(job("r2"))
    assert isinstance(second, Hit)
    assert second.job.cache_status == "hit" and second.job.cache_key is None
    served = orjson.loads(second.payload)
    assert served["id"] == "chatcmpl-r2"
    assert served["choices"] == orjson.loads(ANSWER)["choices"]


async def test_a_stream_is_served_from_a_json_answer_but_never_stored() -> None:
    cache = make_cache()
    miss = await cache.lookup(job("r1", stream=True))
    assert isinstance(miss, Proceed)
    assert miss.job.cache_status == "miss" and miss.job.cache_key is None

    stored = await cache.lookup(job("r2"))
    assert isinstance(stored, Proceed)
    await complete(cache, stored)
    hit = await cache.lookup(job("r3", stream=True, include_usage=True))
    assert isinstance(hit, Hit)
    assert hit.payload.startswith(b"data: {") and b'"chat.completion.chunk"' in hit.payload
    assert b'"usage":{"prompt_tokens"' in hit.payload
    assert b"[DONE]" not in hit.payload  # the API adds it on the end message


async def test_two_tenants_never_share_an_entry() -> None:
    cache = make_cache()
    alice = await cache.lookup(job("r1", tenant="alice"))
    assert isinstance(alice, Proceed)
    await complete(cache, alice)
    assert isinstance(await cache.lookup(job("r2", tenant="alice")), Hit)
    bob = await cache.lookup(job("r3", tenant="bob"))
    assert isinstance(bob, Proceed) and bob.job.cache_status == "miss"
    assert bob.job.cache_key != alice.job.cache_key


async def test_a_shared_namespace_is_shared() -> None:
    cache = make_cache(policy=CachePolicy(prefix="ns:cache:v1", ttl=60, shared_namespace=True))
    alice = await cache.lookup(job("r1", tenant="alice"))
    assert isinstance(alice, Proceed)
    await complete(cache, alice)
    assert isinstance(await cache.lookup(job("r2", tenant="bob")), Hit)


async def test_no_cache_refreshes_and_no_store_reads_only() -> None:
    cache = make_cache()
    stored = await cache.lookup(job("r1"))
    assert isinstance(stored, Proceed)
    await complete(cache, stored)

    fresh = await cache.lookup(job("r2", cache_control="no-cache"))
    assert isinstance(fresh, Proceed)
    assert fresh.job.cache_status == "bypass" and fresh.job.cache_key == stored.job.cache_key

    read_only = await cache.lookup(job("r3", cache_control="no-store"))
    assert isinstance(read_only, Hit)
    other = job("r4", cache_control="no-store", body={**DETERMINISTIC, "seed": 3})
    missed = await cache.lookup(other)
    assert isinstance(missed, Proceed)
    assert missed.job.cache_status == "miss" and missed.job.cache_key is None


async def test_an_inactive_cache_says_bypass_and_touches_nothing() -> None:
    store = MemoryStore()
    cache = make_cache(store, policy=CachePolicy(prefix="p", ttl=0))
    result = await cache.lookup(job())
    assert isinstance(result, Proceed)
    assert result.job.cache_status == "bypass" and result.job.cache_key is None
    assert store.calls == 0


# --- the write path ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"", 500),
        (b"", 400),
        (ANSWER.replace(b'"stop"', b'"length"'), 200),
        (b'{"error": {"message": "x"}}', 200),
    ],
    ids=["error-500", "error-400", "truncated", "not-a-completion"],
)
async def test_errors_and_truncated_answers_are_not_stored(body: bytes, status: int) -> None:
    store = MemoryStore()
    cache = make_cache(store)
    miss = await cache.lookup(job("r1"))
    assert isinstance(miss, Proceed)
    await complete(cache, miss, body, status)
    assert store.entries == {}
    assert isinstance(await cache.lookup(job("r2")), Proceed)


async def test_a_completed_event_for_a_foreign_key_writes_nothing() -> None:
    store = MemoryStore()
    cache = make_cache(store)
    for key in (
        "other:cache:v1:anonymous:m:" + "a" * 64,
        "ns:cache:v1:anonymous:m:" + "a" * 64 + ":lock",
        "ns:cache:v1:anonymous:" + "a" * 64,  # no model
    ):
        await cache.on_completed(encode_completed([Completed(key, ANSWER)]), NO_DELIVERY)
    assert store.entries == {} and store.calls == 0


async def test_every_event_of_a_message_is_written_on_its_own_merits() -> None:
    store = MemoryStore()
    cache = make_cache(store)
    good = [f"{POLICY.prefix}:anonymous:m:" + c * 64 for c in "bcd"]
    events = [
        Completed(good[0], ANSWER),
        Completed("other:cache:v1:anonymous:m:" + "a" * 64, ANSWER),  # foreign: dropped alone
        Completed(good[1], ANSWER[:-1]),  # truncated: not stored
        Completed(good[2], ANSWER),
    ]
    await cache.on_completed(encode_completed(events), NO_DELIVERY)
    assert set(store.entries) == {good[0], good[2]}


async def test_only_a_sender_allowed_to_answer_the_model_writes_its_entry() -> None:
    """With REPLY_USERS set, an agent's broker user cannot poison another model's entries."""
    store = MemoryStore()
    trust = ReplyTrust.parse("router=*,gpu-a=local_a")
    cache = make_cache(store, trust=trust)
    keys = {model: f"{POLICY.prefix}:anonymous:{model}:" + "b" * 64 for model in ("local_a", "m")}

    async def send(key: str, user: str | None) -> None:
        env = dataclasses.replace(encode_completed([Completed(key, ANSWER)]), user_id=user)
        await cache.on_completed(env, NO_DELIVERY)

    await send(keys["m"], "gpu-a")  # not its model
    await send(keys["m"], None)  # no sender
    await send(keys["local_a"], "gpu-b")  # unknown user
    assert store.entries == {}
    await send(keys["local_a"], "gpu-a")
    await send(keys["m"], "router")
    assert set(store.entries) == set(keys.values())


# --- fail-open ---------------------------------------------------------------------------------


async def test_a_dead_redis_means_bypass_and_the_breaker_spares_the_next_requests() -> None:
    store = MemoryStore()
    clock = Clock()
    cache = make_cache(store, breaker=Breaker(cooldown=1.0, clock=clock))
    store.down = True
    first = await cache.lookup(job("r1"))
    assert isinstance(first, Proceed)
    assert first.job.cache_status == "bypass" and first.job.cache_key is None
    calls = store.calls
    second = await cache.lookup(job("r2"))
    assert isinstance(second, Proceed) and second.job.cache_status == "bypass"
    assert store.calls == calls  # the breaker is open: Redis is not even tried

    store.down = False
    clock.now += 1.0
    third = await cache.lookup(job("r3"))
    assert isinstance(third, Proceed) and third.job.cache_status == "miss"


async def test_a_write_to_a_dead_redis_is_dropped_quietly() -> None:
    store = MemoryStore()
    cache = make_cache(store)
    miss = await cache.lookup(job("r1"))
    assert isinstance(miss, Proceed)
    store.down = True
    await complete(cache, miss)  # no exception: the client has its answer already
    assert store.entries == {}


async def test_the_writer_still_frees_locks_while_lookups_skip_redis() -> None:
    """The event may be another dispatcher's leader's: its waiters must not wait out the lock
    because this dispatcher's lookups had a hiccup."""
    store = MemoryStore()
    cache = make_cache(store, breaker=Breaker(cooldown=1.0, clock=Clock()))
    leader = await cache.lookup(job("r1", body=DETERMINISTIC))
    assert isinstance(leader, Proceed) and leader.job.cache_key is not None
    store.down = True
    await cache.lookup(job("r2"))
    assert not cache.breaker.allows()  # lookups skip Redis for a while now
    store.down = False
    await complete(cache, leader)
    assert store.entries == {leader.job.cache_key: ANSWER} and store.locks == {}


def test_the_breaker_opens_for_its_cooldown() -> None:
    clock = Clock()
    breaker = Breaker(cooldown=1.0, clock=clock)
    assert breaker.allows()
    breaker.failed()
    assert not breaker.allows()
    clock.now += 0.99
    assert not breaker.allows()
    clock.now += 0.01
    assert breaker.allows()


# --- single flight -----------------------------------------------------------------------------


async def test_an_identical_deterministic_job_waits_for_the_one_in_flight() -> None:
    store = MemoryStore()
    cache = make_cache(store)
    leader = await cache.lookup(job("r1", body=DETERMINISTIC))
    assert isinstance(leader, Proceed) and leader.job.cache_key in store.locks

    follower = asyncio.create_task(cache.lookup(job("r2", body=DETERMINISTIC)))
    streamer = asyncio.create_task(cache.lookup(job("r3", body=DETERMINISTIC, stream=True)))
    await asyncio.sleep(0.01)
    assert not follower.done() and cache.waiting == 2
    await complete(cache, leader)
    answered, streamed = await follower, await streamer
    assert isinstance(answered, Hit) and orjson.loads(answered.payload)["id"] == "chatcmpl-r2"
    assert isinstance(streamed, Hit) and streamed.payload.startswith(b"data: ")
    assert cache.waiting == 0


async def test_a_deterministic_miss_takes_its_lock_in_the_lookup_itself() -> None:
    store = MemoryStore()
    cache = make_cache(store)
    leader = await cache.lookup(job("r1", body=DETERMINISTIC))
    assert isinstance(leader, Proceed) and store.locks == {leader.job.cache_key: "r1"}
    assert store.calls == 1  # one round trip: no separate acquire


async def test_without_a_lookup_a_deterministic_job_still_takes_the_lock() -> None:
    store = MemoryStore()
    cache = make_cache(store)
    leader = await cache.lookup(job("r1", body=DETERMINISTIC, cache_control="no-cache"))
    assert isinstance(leader, Proceed) and leader.job.cache_status == "bypass"
    assert store.locks == {leader.job.cache_key: "r1"}


async def test_an_unreadable_entry_is_a_miss_that_leads() -> None:
    store = MemoryStore()
    cache = make_cache(store)
    first = await cache.lookup(job("r0", body=DETERMINISTIC))
    assert isinstance(first, Proceed) and first.job.cache_key is not None
    store.entries[first.job.cache_key] = b"not json"
    store.locks.clear()
    leader = await cache.lookup(job("r1", body=DETERMINISTIC))
    assert isinstance(leader, Proceed) and leader.job.cache_status == "miss"
    assert store.locks == {first.job.cache_key: "r1"}


async def test_followers_are_routed_at_once_when_the_leader_fails() -> None:
    cache = make_cache()
    leader = await cache.lookup(job("r1", body=DETERMINISTIC))
    assert isinstance(leader, Proceed)
    follower = asyncio.create_task(cache.lookup(job("r2", body=DETERMINISTIC)))
    await asyncio.sleep(0.01)
    await complete(cache, leader, b"", 502)
    result = await asyncio.wait_for(follower, 1)
    assert isinstance(result, Proceed)
    assert result.job.cache_status == "miss" and result.job.cache_key == leader.job.cache_key


async def test_a_job_delivered_again_leads_again_instead_of_waiting_for_itself() -> None:
    store = MemoryStore()
    await make_cache(store).lookup(job("r1", body=DETERMINISTIC))  # then its dispatcher died
    again = make_cache(store)  # the dispatcher it is delivered to next
    result = await asyncio.wait_for(again.lookup(job("r1", body=DETERMINISTIC)), 1)
    assert isinstance(result, Proceed) and result.job.cache_status == "miss"
    assert store.waits == [] and store.locks == {result.job.cache_key: "r1"}
    await again.on_cancel("r1")  # it leads there: its cancel frees the lock
    assert store.locks == {}


async def leader_follower_and_fresh(
    cache: JobCache,
) -> tuple[Proceed, asyncio.Task[Hit | Proceed], Proceed]:
    """A leader holding the lock, a follower waiting on it, and a `no-cache` job (r3) that
    carries the same key but not the lock."""
    leader = await cache.lookup(job("r1", body=DETERMINISTIC))
    assert isinstance(leader, Proceed)
    follower = asyncio.create_task(cache.lookup(job("r2", body=DETERMINISTIC)))
    fresh = await cache.lookup(job("r3", body=DETERMINISTIC, cache_control="no-cache"))
    assert isinstance(fresh, Proceed) and fresh.job.cache_key == leader.job.cache_key
    return leader, follower, fresh


async def test_a_job_without_the_lock_never_sends_the_leaders_waiters_upstream() -> None:
    """A `no-cache` job carries the key but not the lock: its failure frees nobody."""
    store = MemoryStore()
    cache = make_cache(store)
    leader, follower, fresh = await leader_follower_and_fresh(cache)
    await complete(cache, fresh, b"", 502)
    assert store.locks == {leader.job.cache_key: "r1"}
    await complete(cache, leader)
    assert isinstance(await asyncio.wait_for(follower, 1), Hit)
    assert store.locks == {}


async def test_an_answer_without_the_lock_is_stored_and_wakes_the_waiters() -> None:
    store = MemoryStore()
    cache = make_cache(store)
    leader, follower, fresh = await leader_follower_and_fresh(cache)
    await complete(cache, fresh)
    assert isinstance(await asyncio.wait_for(follower, 1), Hit)
    assert store.locks == {leader.job.cache_key: "r1"}  # the leader frees it when it ends


async def test_sampled_requests_do_not_wait_for_each_other() -> None:
    store = MemoryStore()
    cache = make_cache(store)
    first = await cache.lookup(job("r1"))
    second = await cache.lookup(job("r2"))
    assert isinstance(first, Proceed) and isinstance(second, Proceed)
    assert store.locks == {}


async def test_only_single_flight_lookups_read_the_lock() -> None:
    store = MemoryStore()
    cache = make_cache(store)
    await cache.lookup(job("r1"))
    await cache.lookup(job("r2", body=DETERMINISTIC))
    assert store.lock_reads == [False, True]


async def test_waiting_is_bounded_by_the_wait_and_by_the_number_of_waiters() -> None:
    cache = make_cache(single_flight_wait=0.05, max_waiters=1)
    await cache.lookup(job("r1", body=DETERMINISTIC))
    waiting = asyncio.create_task(cache.lookup(job("r2", body=DETERMINISTIC)))
    await asyncio.sleep(0.01)
    over = await asyncio.wait_for(cache.lookup(job("r3", body=DETERMINISTIC)), 0.02)
    assert isinstance(over, Proceed)  # no second waiter: routed at once
    timed_out = await asyncio.wait_for(waiting, 1)
    assert isinstance(timed_out, Proceed) and timed_out.job.cache_status == "miss"


def test_at_most_half_the_prefetch_waits_and_none_of_a_prefetch_of_one() -> None:
    assert [single_flight_waiters(n) for n in (1, 2, 3, 64)] == [0, 1, 1, 32]


async def test_with_no_waiters_allowed_an_identical_request_is_routed_at_once() -> None:
    cache = make_cache(single_flight_wait=5, max_waiters=0)
    await cache.lookup(job("r1", body=DETERMINISTIC))
    follower = await asyncio.wait_for(cache.lookup(job("r2", body=DETERMINISTIC)), 0.5)
    assert isinstance(follower, Proceed) and follower.job.cache_status == "miss"


async def test_a_follower_waits_at_most_half_its_time_left() -> None:
    store = MemoryStore()
    clock = Clock()
    cache = make_cache(store, clock=clock)
    await cache.lookup(job("r1", body=DETERMINISTIC))
    result = await cache.lookup(job("r2", body=DETERMINISTIC, deadline=clock.now + 0.1))
    assert isinstance(result, Proceed)
    assert store.waits == [pytest.approx(0.05)]


async def test_a_cancelled_follower_stops_waiting() -> None:
    cancellations = Cancellations()
    cache = make_cache(cancellations=cancellations)
    await cache.lookup(job("r1", body=DETERMINISTIC))
    follower = asyncio.create_task(cache.lookup(job("r2", body=DETERMINISTIC)))
    await asyncio.sleep(0.01)
    assert cancellations.cancel("r2", 0.0)
    result = await asyncio.wait_for(follower, 1)
    assert isinstance(result, Proceed)
    assert cache.waiting == 0


async def test_a_cancelled_leader_releases_its_waiters_at_once() -> None:
    store = MemoryStore()
    cache = make_cache(store)
    leader = await cache.lookup(job("r1", body=DETERMINISTIC))
    assert isinstance(leader, Proceed)
    retry = asyncio.create_task(cache.lookup(job("r2", body=DETERMINISTIC)))
    await asyncio.sleep(0.01)
    assert not retry.done()
    await cache.on_cancel("r2")  # not a leader: nothing to release
    await cache.on_cancel("r1")
    result = await asyncio.wait_for(retry, 1)
    assert isinstance(result, Proceed) and result.job.cache_status == "miss"
    assert store.locks == {}


async def test_a_cancel_never_releases_a_lock_another_job_took() -> None:
    store = MemoryStore()
    cache = make_cache(store)
    await cache.lookup(job("r1", body=DETERMINISTIC))
    key = next(iter(store.locks))
    store.locks[key] = "someone-else"  # r1's lock expired and another job took the key
    await cache.on_cancel("r1")
    assert store.locks == {key: "someone-else"}


async def test_a_lock_past_its_expiry_is_not_even_tried() -> None:
    store = MemoryStore()
    clock = Clock()
    cache = make_cache(store, clock=clock, single_flight_wait=5)
    await cache.lookup(job("r1", body=DETERMINISTIC))
    clock.now += 5
    calls = store.calls
    await cache.on_cancel("r1")
    assert store.calls == calls


async def test_a_job_cancelled_during_its_lookup_releases_the_lock_it_took() -> None:
    """The cancel arrives while the probe is in flight: nothing to release yet then, so the
    handler releases the lock when it drops the job."""
    cancellations = Cancellations()
    broker = RecordingBroker()
    store = CancelledDuringProbe()
    handler = DispatcherHandler(
        topology=Topology(namespace="test"),
        broker=cast(Broker, broker),
        registry=Registry(AgentTable(ttl=10), SqliteStore(":memory:")),
        cancellations=cancellations,
        ensure_queue=no_queue,
        providers=(ProviderRule("", "openai"),),  # model "m" is a provider's
        cache=make_cache(store, cancellations=cancellations),
    )
    store.during_probe = lambda: handler.on_cancel(encode_cancel("r1"), NO_DELIVERY)
    await handler.on_job(encode_job(job("r1", body=DETERMINISTIC), now=0.0), NO_DELIVERY)
    assert cancellations.is_cancelled("r1") and broker.sent == []  # dropped
    assert len(store.lock_reads) == 1 and store.locks == {}


@pytest.mark.parametrize(
    ("model", "status"),
    [("m", 404), ("local-gone", 200)],
    ids=["unknown-model", "known-model-without-a-live-agent"],
)
async def test_a_cached_answer_is_served_only_for_a_model_the_router_still_knows(
    model: str, status: int
) -> None:
    """A model the router does not serve (404) gets no cached answer either: retired, it stops
    answering at once. One it knows but cannot reach right now (503) is still served hits."""
    store = MemoryStore()
    cache = make_cache(store)
    asked = dataclasses.replace(job("r1", body={**DETERMINISTIC, "model": model}), model=model)
    looked = await cache.lookup(asked)
    assert isinstance(looked, Proceed)
    await complete(cache, looked)
    registry = Registry(AgentTable(ttl=10), SqliteStore(":memory:"))
    registry.table.register(AgentRegistration(name="a1", models=["local-gone"]), now=0.0)
    broker = RecordingBroker()
    handler = DispatcherHandler(
        topology=Topology(namespace="test"),
        broker=cast(Broker, broker),
        registry=registry,
        cancellations=Cancellations(),
        ensure_queue=no_queue,
        cache=cache,
    )
    again = dataclasses.replace(asked, request_id="r2")
    await handler.on_job(encode_job(again, now=time.time()), NO_DELIVERY)
    (answer, _, _), *_ = broker.sent
    assert decode_reply(answer).status == status


class CancelledDuringProbe(MemoryStore):
    """Runs `during_probe` after the probe took effect and before its answer is back."""

    def __init__(self) -> None:
        super().__init__()
        self.during_probe: Callable[[], Awaitable[None]] | None = None

    async def probe(
        self, key: str, lock: LockRequest | None = None, *, lock_state: bool = True
    ) -> Probe:
        found = await super().probe(key, lock, lock_state=lock_state)
        if self.during_probe is not None:
            await self.during_probe()
        return found


async def no_queue(_: object) -> None:
    pass


# --- the reply side: x-cache and job.completed -------------------------------------------------


class RecordingBroker:
    publish_timeout = 5.0

    def __init__(self, fail_exchange: str | None = None) -> None:
        self.sent: list[tuple[Envelope, str, str]] = []
        self.fail_exchange = fail_exchange

    async def publish(
        self,
        env: Envelope,
        routing_key: str,
        *,
        exchange: str = "",
        mandatory: bool = True,
        persistent: bool = False,
        timeout: float | None = None,
    ) -> None:
        if exchange and exchange == self.fail_exchange:
            raise BrokerUnavailableError()
        self.sent.append((env, routing_key, exchange))


def publisher(broker: RecordingBroker) -> ReplyPublisher:
    async def publish_completed(env: Envelope) -> None:
        await broker.publish(env, "", exchange="completed", mandatory=False)

    completed = CompletedBatcher(publish_completed, delay=60.0)  # sent by flush() alone
    return ReplyPublisher(cast(Broker, broker), persistent=False, completed=completed)


async def test_the_first_reply_carries_the_cache_verdict() -> None:
    broker = RecordingBroker()
    reply = publisher(broker)
    stream_job = job(cache_status="miss", stream=True)
    await reply(stream_job, Reply(ReplyKind.CHUNK, "r1", "a", body=b"data: {}\n\n", seq=0))
    await reply(stream_job, Reply(ReplyKind.END, "r1", "a", seq=1))
    headers = [orjson.loads(env.headers.get("x-http-headers", "{}")) for env, _, _ in broker.sent]
    assert headers == [{"x-cache": "miss"}, {}]


async def test_a_cacheable_answer_is_published_to_the_completed_exchange() -> None:
    broker = RecordingBroker()
    reply = publisher(broker)
    cacheable = job(cache_key="k1", cache_status="miss")
    await reply.final(cacheable, ANSWER, attempt="a")
    assert len(broker.sent) == 1  # the event waits for others
    await reply.flush()
    (answer, queue, _), (event, _, exchange) = broker.sent
    assert queue == "reply.q" and exchange == "completed"
    assert orjson.loads(answer.headers["x-http-headers"]) == {"x-cache": "miss"}
    assert decode_completed(event) == [Completed("k1", ANSWER, request_id="r1")]


async def test_a_cacheable_job_that_fails_says_so_without_a_body() -> None:
    broker = RecordingBroker()
    reply = publisher(broker)
    await reply.error(job(cache_key="k1"), BrokerUnavailableError(), attempt="a")
    await reply.flush()
    assert decode_completed(broker.sent[-1][0]) == [Completed("k1", b"", 503, "r1")]


async def test_other_jobs_cost_no_extra_message() -> None:
    broker = RecordingBroker()
    reply = publisher(broker)
    await reply.final(job(), ANSWER, attempt="a")
    await reply.final(job(cache_status="hit"), ANSWER, attempt="a")
    await reply.flush()
    assert [exchange for _, _, exchange in broker.sent] == ["", ""]


async def test_a_failed_completed_publish_does_not_fail_the_reply() -> None:
    broker = RecordingBroker(fail_exchange="completed")
    reply = publisher(broker)
    await reply.final(job(cache_key="k1"), ANSWER, attempt="a")
    await reply.flush()
    assert len(broker.sent) == 1


async def test_the_answers_of_several_jobs_reach_the_cache_writer_in_one_message() -> None:
    broker = RecordingBroker()
    reply = publisher(broker)
    await reply.final(job("r1", cache_key="k1", cache_status="miss"), ANSWER, attempt="a")
    await reply.error(job("r2", cache_key="k2"), BrokerUnavailableError(), attempt="a")
    await reply.final(job("r3"), ANSWER, attempt="a")  # not cacheable: no event
    await reply.flush()
    assert [exchange for _, _, exchange in broker.sent] == ["", "", "", "completed"]
    events = decode_completed(broker.sent[-1][0])
    assert events == [Completed("k1", ANSWER, request_id="r1"), Completed("k2", b"", 503, "r2")]
