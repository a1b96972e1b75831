"""The response cache: Redis in front of routing, and the writer fed by `job.completed` events.

`JobCache.lookup(job)` runs before a job is routed. A hit is answered from Redis; a miss goes on
with its cache verdict (`x-cache`) and, when its answer may be stored, the cache key, which asks
whoever finishes the job to publish a `job.completed` event (several travel in one message:
`shared.completed`); `JobCache.on_completed` (fed by the `completed` queue, one dispatcher per
message) writes the entries. The decisions are the pure functions of `cache_key` and
`cache_replay`; `RedisStore` is the thin Redis shell.

Single flight: a deterministic job whose key is not cached takes a lock (`SET NX PX`) before it is
routed, in the same script call as the lookup. The lock's value is the leader's request id: the
same job delivered again (its handler failed, or its dispatcher died) finds its own lock and
leads again, renewing it, instead of waiting for itself. An identical job that finds the lock
held waits, holding its job message unacked, for the writer's `ok` on the key's pub/sub channel,
then answers from the cache. It stops waiting when the leader ends without a storable answer
(`fail`: its producer published that too), when the leader's client cancels (the leader's
dispatcher, which sees the cancel, releases its lock), when the lock expires, after
`single_flight_wait` seconds or half its own time left, or when its own client cancels; then it
is routed like any miss. At most `max_waiters` jobs wait at once per dispatcher, so waiting never
takes more than part of the jobs queue's prefetch: past it, a job is routed at once (one more
upstream call rather than a stalled jobs queue).

Only its owner frees a lock: `job.completed` events carry the finished job's request id, and the
writer deletes the lock only if that job holds it (a failed one says `fail` only then). Any
complete answer is still stored and wakes the key's waiters with `ok`. So a `no-cache` job or a
leader that outlived its lock, which carry the key but not the lock, never send another leader's
waiters upstream. A lock is also freed when its job is cancelled, even during its own lookup, and
when the probe that took it failed on this side (a timeout, the job bypassing the cache): Redis
runs the script anyway, so the locks its late answer says it took (all it asked for, if no answer
comes) are released in the background.

Fail-open: every Redis operation is bounded by `timeout`; a failed lookup makes the job bypass the
cache (`x-cache: bypass`) and opens a breaker that skips lookups for `BREAKER_COOLDOWN` seconds,
so a dead Redis costs at most one timeout per second and not one per request. Writes are not
skipped: the locks they free may be other dispatchers' leaders'. redis-py reconnects on the next
command once Redis is back.

Refused writes: Redis may answer reads while it refuses writes (out of memory under
`noeviction`, its default policy; a replica after a failover, `READONLY`; an ACL). The scripts
write through `redis.pcall`, so a refusal costs only what it touches: a lock not taken is a miss
without single flight, and an entry not stored wakes its waiters with `fail`, so they are
routed at once rather than after `single_flight_wait`. Neither opens the breaker: the entries
already stored are still served.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from services.dispatcher.batching import Batcher
from services.dispatcher.cache_key import (
    CachePlan,
    CachePolicy,
    done_channel,
    lock_key,
    plan_request,
)
from services.dispatcher.cache_replay import (
    EntryError,
    NotReplayableError,
    hit_payload,
    is_storable,
    stored_age,
)
from services.dispatcher.resp import PipelinedRedis
from services.dispatcher.settings import DispatcherSettings
from shared.amqp import Delivery
from shared.cancel import Cancellations
from shared.messages import Completed, Envelope, Job, decode_completed
from shared.reply_trust import ReplyTrust

log = logging.getLogger(__name__)

T = TypeVar("T")

BREAKER_COOLDOWN = 1.0
# After Redis refused a write, no single flight for this long: a refused lock or entry also means
# a lock nobody can free (a read-only replica refuses the DEL too), and waiting on one would
# cost an identical request its whole `single_flight_wait`.
REFUSED_COOLDOWN = 5.0
# Delete the lock only if this owner still holds it, and tell its waiters. Owner "": a
# `job.completed` event from a producer that predates request ids, which frees the lock
# whoever holds it (as every event did then).
_RELEASE = """
if ARGV[1] == "" or redis.call("GET", KEYS[1]) == ARGV[1] then
    redis.pcall("DEL", KEYS[1])
    redis.call("PUBLISH", KEYS[2], ARGV[2])
end
return 0
"""
# KEYS: lock; ARGV: owner, ttl in ms. Takes a free lock, or one this owner holds already (its
# job delivered again): the job leads again instead of waiting for itself. 1: taken; 0: another
# owner holds it; -1: Redis refused to write it (see "Refused writes" in the module docstring).
_ACQUIRE = """
local holder = redis.call("GET", KEYS[1])
if holder == ARGV[1] then
    redis.pcall("PEXPIRE", KEYS[1], ARGV[2])
    return 1
end
if holder then
    return 0
end
local set = redis.pcall("SET", KEYS[1], ARGV[1], "NX", "PX", ARGV[2])
if type(set) == "table" and set.err then
    return -1
end
if set then
    return 1
end
return 0
"""
# The two operations on every cacheable request, each one call for a whole batch of requests
# (`Batcher`): redis-py's MULTI/EXEC pipelines cost the dispatcher about twice the CPU of a
# script, and a call per request costs more than a share of a batch under load. A batch whose
# jobs neither lead nor follow identical ones (not deterministic: most traffic) only reads the
# entries, with one MGET: no script for Redis to run, and a flat reply to parse.
# KEYS: entry, lock, entry, lock, ...; ARGV: owner, ttl in ms per entry (owner "": only look).
# Returns per entry: the entry (or nil), whether another owner holds the lock, whether this
# call took it. A deterministic miss takes its single-flight lock in the same call that found
# no entry: one round trip, and two identical jobs in one batch still get one leader (the
# script runs in order). A lock this owner holds already (its job delivered again, after a
# crash or a requeue) counts as taken, its expiry renewed, as in `_ACQUIRE`. An entry asked
# for again in the same batch (a burst of one popular request) is sent once: the later asks
# get the number of the first instead, so a large answer is not copied N times into a reply
# that must arrive within one timeout.
_PROBE = """
local found = {}
local first = {}
for i = 1, #KEYS / 2 do
    local key = KEYS[2 * i - 1]
    local entry
    local present
    if first[key] then
        present = found[3 * first[key] - 2] ~= false
        entry = present and first[key]
    else
        entry = redis.call("GET", key)
        present = entry ~= false
        first[key] = i
    end
    local holder = redis.call("GET", KEYS[2 * i])
    local owner = ARGV[2 * i - 1]
    local mine = owner ~= "" and holder == owner
    local locked = 0
    if holder and not mine then
        locked = 1
    end
    local taken = 0
    if not present and mine then
        redis.pcall("PEXPIRE", KEYS[2 * i], ARGV[2 * i])
        taken = 1
    elseif not present and not holder and owner ~= "" then
        local set = redis.pcall("SET", KEYS[2 * i], owner, "NX", "PX", ARGV[2 * i])
        if set and not set.err then
            taken = 1
        end
    end
    found[3 * i - 2] = entry
    found[3 * i - 1] = locked
    found[3 * i] = taken
end
return found
"""
# KEYS: entry, lock, ...; ARGV: the `ok` and `fail` messages, then body, ttl, done channel,
# owner per entry. Any finished job may store the entry and wake the key's waiters (the entry is
# there for them), but it frees the lock only if it holds it: another leader may hold it by now.
# Owner "": as in `_RELEASE`. An entry Redis refuses to store ("Refused writes" above) wakes
# its waiters with `fail`, so they are routed at once, and the script goes on with the others;
# it returns the first refusal's message, or "" when every entry was stored.
_WRITE = """
local refused = ""
for i = 1, #KEYS / 2 do
    local a = 3 + (i - 1) * 4
    local set = redis.pcall("SET", KEYS[2 * i - 1], ARGV[a], "EX", ARGV[a + 1])
    local news = ARGV[1]
    if type(set) == "table" and set.err then
        news = ARGV[2]
        if refused == "" then
            refused = set.err
        end
    end
    local owner = ARGV[a + 3]
    if owner == "" or redis.call("GET", KEYS[2 * i]) == owner then
        redis.pcall("DEL", KEYS[2 * i])
    end
    redis.call("PUBLISH", ARGV[a + 2], news)
end
return refused
"""
OK = b"ok"
FAIL = b"fail"

HIT = "hit"
MISS = "miss"
BYPASS = "bypass"


class CacheUnavailableError(Exception):
    """Redis did not answer in time, or at all."""


class CacheWriteRefusedError(Exception):
    """Redis answered, but refused to store an entry (see "Refused writes" above)."""


class Breaker:
    """Skips Redis for `cooldown` seconds after a failure; the next call after it tries again."""

    def __init__(
        self, cooldown: float = BREAKER_COOLDOWN, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._cooldown = cooldown
        self._clock = clock
        self._open_until = 0.0

    def allows(self) -> bool:
        return self._clock() >= self._open_until

    def failed(self) -> None:
        self._open_until = self._clock() + self._cooldown


@dataclass(frozen=True, slots=True)
class Probe:
    """What a lookup found: the entry, whether another job holds its lock, or that this one
    took the lock (asked for with a `LockRequest`, taken only when there was no entry and no
    lock but its own)."""

    entry: bytes | None
    locked: bool
    acquired: bool = False


@dataclass(frozen=True, slots=True)
class LockRequest:
    owner: str
    ttl_ms: int


def _entry(found: object) -> bytes | None:
    """A cache entry as Redis returned it: bytes, or nil for none."""
    return found if isinstance(found, bytes) else None


def _first_copy(entries: Sequence[object], found: object) -> object:
    """`_PROBE` sends an entry asked for twice in one batch once: later asks get the number
    (from 1) of the ask that holds it."""
    if isinstance(found, int) and 1 <= found <= len(entries):
        return entries[found - 1]
    return found


@dataclass(frozen=True, slots=True)
class ProbeAsk:
    """One lookup of a batch: the lock to take if nothing is there, and whether the caller
    reads `Probe.locked` at all (only single flight does)."""

    key: str
    lock: LockRequest | None = None
    lock_state: bool = True

    @property
    def entry_only(self) -> bool:
        return self.lock is None and not self.lock_state


class CacheStore(Protocol):
    """The Redis operations of the cache; each raises CacheUnavailableError on failure."""

    async def probe(
        self, key: str, lock: LockRequest | None = None, *, lock_state: bool = True
    ) -> Probe: ...
    async def acquire(self, key: str, owner: str, ttl_ms: int) -> bool | None: ...
    async def wait(self, key: str, timeout: float) -> bytes | None: ...
    async def write(self, key: str, body: bytes, ttl: int, owner: str | None) -> None: ...
    async def abandon(self, key: str, owner: str | None) -> None: ...
    async def release(self, key: str, owner: str) -> None: ...
    async def aclose(self) -> None: ...


class RedisStore:
    """`CacheStore` on redis-py's asyncio client, every operation bounded by `timeout`."""

    def __init__(
        self, redis: Redis, *, timeout: float, pipelined: PipelinedRedis | None = None
    ) -> None:
        self._redis = redis
        self._timeout = timeout
        # Every command but pub/sub goes over one pipelined connection (services/dispatcher/
        # resp.py): through redis-py's command path, a lookup on a process that has idled
        # through a stream takes 2-3 times as long. redis-py keeps pub/sub, and every command
        # where the lean client has no transport (a TLS URL).
        self._pipelined = pipelined
        # Sent by digest (EVALSHA), and again in full if the server lost it.
        self._scripts = {
            source: redis.register_script(source) for source in (_PROBE, _ACQUIRE, _WRITE, _RELEASE)
        }
        self._probes: Batcher[ProbeAsk, Probe] = Batcher(self._probe_many)
        # Writes come in batches already (a `job.completed` message holds a process's events
        # of 10 ms, shared.completed): submitted together, a message's writes share one call.
        self._writes: Batcher[tuple[str, bytes, int, str], None] = Batcher(self._write_many)
        self._freeing: set[asyncio.Task[None]] = set()  # see `_free_when_answered`

    @classmethod
    def from_url(cls, url: str, *, timeout: float) -> RedisStore:
        # No retries inside redis-py: the breaker decides when to try again.
        redis = Redis.from_url(
            url,
            socket_connect_timeout=timeout,
            socket_timeout=max(timeout, 1.0),
            retry=Retry(NoBackoff(), 0),
        )
        pipelined = PipelinedRedis.from_url(
            url, connect_timeout=timeout, reply_timeout=max(timeout, 1.0)
        )
        return cls(redis, timeout=timeout, pipelined=pipelined)

    async def aclose(self) -> None:
        for task in self._freeing:
            task.cancel()
        if self._pipelined is not None:
            await self._pipelined.aclose()
        with contextlib.suppress(RedisError, OSError):
            await self._redis.aclose()

    def _mget(self, keys: list[str]) -> Awaitable[Any]:
        if self._pipelined is None:
            return self._redis.mget(keys)
        return self._pipelined.call("MGET", *keys)

    def _eval(
        self, source: str, keys: list[str], args: Sequence[str | bytes | int]
    ) -> Awaitable[Any]:
        script = self._scripts[source]
        if self._pipelined is None:
            return script(keys=keys, args=list(args))
        return self._pipelined.run_script(script.sha, source, keys, args)

    async def _bounded(self, operation: Awaitable[T]) -> T:
        try:
            async with asyncio.timeout(self._timeout):
                return await operation
        except (RedisError, OSError, TimeoutError) as e:
            raise CacheUnavailableError(f"redis: {type(e).__name__}: {e}") from e

    async def probe(
        self, key: str, lock: LockRequest | None = None, *, lock_state: bool = True
    ) -> Probe:
        """The entry, and whether a lock is held; `lock` is taken if there is neither.
        `lock_state=False` (no `lock`): `locked` is not read, and is False."""
        return await self._probes.submit(ProbeAsk(key, lock, lock_state))

    async def _probe_many(self, asks: Sequence[ProbeAsk]) -> list[Probe]:
        if all(ask.entry_only for ask in asks):
            # Each distinct key once (see `_PROBE` for why).
            distinct = list(dict.fromkeys(ask.key for ask in asks))
            found = await self._bounded(self._mget(distinct))
            entries = dict(zip(distinct, found, strict=True))
            return [Probe(_entry(entries[ask.key]), False) for ask in asks]
        # The reads in one script: a write landing between them would look like a leader
        # that failed (no entry, no lock) and send a follower upstream.
        keys: list[str] = []
        args: list[str | int] = []
        for ask in asks:
            keys += (ask.key, lock_key(ask.key))
            args += (ask.lock.owner, ask.lock.ttl_ms) if ask.lock is not None else ("", 0)
        call = asyncio.ensure_future(self._eval(_PROBE, keys, args))
        found = await self._locking(call, asks, taken=lambda found: found[2::3])
        entries = found[::3]
        return [
            Probe(_entry(_first_copy(entries, entry)), ask.lock_state and bool(locked), bool(taken))
            for ask, entry, locked, taken in zip(
                asks, entries, found[1::3], found[2::3], strict=True
            )
        ]

    async def _locking(
        self,
        call: asyncio.Future[Any],
        asks: Sequence[ProbeAsk],
        taken: Callable[[Any], Sequence[object]],
    ) -> Any:
        """Await a script that may take the asks' locks (`taken(answer)`: one flag per ask).

        Not cancelled when its callers stop waiting: Redis runs a script it was sent either
        way. If it answers too late, its callers bypass the cache and their jobs carry no
        cache key, so no answer of theirs will ever free a lock it took: it is freed here, in
        the background, once the late answer says which (see `_free_taken`).
        """
        try:
            return await self._bounded(asyncio.shield(call))
        except CacheUnavailableError:
            if any(ask.lock is not None for ask in asks):
                task = asyncio.create_task(self._free_taken(call, asks, taken))
                self._freeing.add(task)
                task.add_done_callback(self._freeing.discard)
            else:
                call.cancel()
            raise
        except asyncio.CancelledError:
            call.cancel()
            raise

    async def _free_taken(
        self,
        call: asyncio.Future[Any],
        asks: Sequence[ProbeAsk],
        taken: Callable[[Any], Sequence[object]],
    ) -> None:
        asked = [(ask.key, ask.lock) for ask in asks if ask.lock is not None]
        try:
            # Past the locks' expiry there is nothing left to free.
            async with asyncio.timeout(max(lock.ttl_ms for _, lock in asked) / 1000):
                found = await call
            held = [
                (ask.key, ask.lock)
                for ask, took in zip(asks, taken(found), strict=True)
                if took and ask.lock is not None
            ]
        except (RedisError, OSError, TimeoutError):
            # No answer: the script may have run or not. Freeing a lock its owner does not
            # hold changes nothing (the release is owner-checked), so free them all.
            held = asked
        for key, lock in held:
            try:
                await self.release(key, lock.owner)
            except CacheUnavailableError as e:
                # Redis does not answer: one timeout here, not one per lock; they expire.
                log.info("locks a script took too late are left to expire: %s", e)
                return

    async def acquire(self, key: str, owner: str, ttl_ms: int) -> bool | None:
        """Take the lock if it is free or `owner` holds it already (renewing its expiry).
        False: another owner holds it; None: Redis refused to write it."""
        call = asyncio.ensure_future(self._eval(_ACQUIRE, [lock_key(key)], [owner, ttl_ms]))
        ask = ProbeAsk(key, LockRequest(owner, ttl_ms))
        took = await self._locking(call, [ask], taken=lambda took: [took == 1])
        return None if took == -1 else took == 1

    async def wait(self, key: str, timeout: float) -> bytes | None:
        """The entry once another job wrote it; None when its lock went away without one
        (the leader failed or outlived its lock) or after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        pubsub = self._redis.pubsub()
        try:
            # Subscribe before looking: an `ok` published in between is not missed.
            await self._bounded(pubsub.subscribe(done_channel(key)))
            while True:
                probe = await self.probe(key)
                if probe.entry is not None:
                    return probe.entry
                left = deadline - time.monotonic()
                if not probe.locked or left <= 0:
                    return None
                try:
                    message = await pubsub.get_message(
                        ignore_subscribe_messages=True, timeout=min(left, 1.0)
                    )
                except (RedisError, OSError) as e:
                    raise CacheUnavailableError(f"redis: {type(e).__name__}") from e
                if message is not None and message.get("data") == FAIL:
                    return None
        finally:
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                async with asyncio.timeout(self._timeout):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def write(self, key: str, body: bytes, ttl: int, owner: str | None) -> None:
        """Store the answer of job `owner` and wake the key's waiters; free the lock if `owner`
        holds it (None: an event from a producer that predates request ids, see `_RELEASE`)."""
        await self._writes.submit((key, body, ttl, owner or ""))

    async def _write_many(self, entries: Sequence[tuple[str, bytes, int, str]]) -> list[None]:
        keys: list[str] = []
        args: list[bytes | str | int] = [OK, FAIL]
        for key, body, ttl, owner in entries:
            keys += (key, lock_key(key))
            args += (body, ttl, done_channel(key), owner)
        refused = await self._bounded(self._eval(_WRITE, keys, args))
        if refused:
            raise CacheWriteRefusedError(f"redis: {refused.decode(errors='replace')}")
        return [None] * len(entries)

    async def abandon(self, key: str, owner: str | None) -> None:
        """Job `owner` ended without a storable answer: if it holds the lock, free it and tell
        its waiters to go upstream (None: as in `write`)."""
        await self.release(key, owner or "")

    async def release(self, key: str, owner: str) -> None:
        """Give up the lock `owner` holds (its job was cancelled, or ended without an answer):
        its waiters are routed. Owner "": whoever holds it (see `_RELEASE`)."""
        await self._bounded(self._eval(_RELEASE, [lock_key(key), done_channel(key)], [owner, FAIL]))


@dataclass(frozen=True, slots=True)
class Hit:
    """Answer from the cache: `payload` is the JSON body, or the SSE events of the replay."""

    job: Job
    payload: bytes


@dataclass(frozen=True, slots=True)
class Proceed:
    """Route the job; it carries its cache verdict, and its cache key when it may be stored."""

    job: Job


class JobCache:
    def __init__(
        self,
        store: CacheStore | None,
        policy: CachePolicy,
        *,
        cancellations: Cancellations,
        single_flight_wait: float = 30.0,
        max_waiters: int = 32,
        breaker: Breaker | None = None,
        clock: Callable[[], float] = time.time,
        trust: ReplyTrust | None = None,
    ) -> None:
        self.store = store
        self.trust = trust or ReplyTrust()
        self.policy = policy
        self.cancellations = cancellations
        self.single_flight_wait = single_flight_wait
        self.max_waiters = max_waiters
        self.breaker = breaker or Breaker()
        self.clock = clock
        self.waiting = 0
        self._refused_until = -math.inf  # see REFUSED_COOLDOWN
        # Locks this process took, by request id, with their expiry: released on a cancel.
        self._leading: OrderedDict[str, tuple[str, float]] = OrderedDict()

    @property
    def is_active(self) -> bool:
        return self.store is not None and self.policy.is_active

    async def aclose(self) -> None:
        if self.store is not None:
            await self.store.aclose()

    async def lookup(self, job: Job) -> Hit | Proceed:
        """The cache's answer to a job, or the job to route. Never raises for Redis."""
        plan = plan_request(
            job.body,
            stream=job.stream,
            tenant=job.tenant,
            cache_control=job.cache_control,
            policy=self.policy,
        )
        if plan.key is None or self.store is None or not self.breaker.allows():
            return Proceed(job.with_changes(cache_status=BYPASS, cache_key=None))
        try:
            return await self._lookup(job, self.store, plan)
        except CacheUnavailableError as e:
            self.breaker.failed()
            log.warning("job %s bypasses the cache: %s", job.request_id, e)
            return Proceed(job.with_changes(cache_status=BYPASS, cache_key=None))

    async def _lookup(self, job: Job, store: CacheStore, plan: CachePlan) -> Hit | Proceed:
        key = plan.key
        assert key is not None
        now = self.clock()
        ttl = min(self.single_flight_wait, max(job.remaining(now), 0.1))
        # A deterministic job leads (if it may be stored) or follows the identical jobs in flight.
        single_flight = (
            plan.deterministic and self.single_flight_wait > 0 and now >= self._refused_until
        )
        lock = (
            LockRequest(job.request_id, int(ttl * 1000)) if single_flight and plan.store else None
        )
        locked = acquired = False
        if plan.lookup:
            # Takes the lock too when nothing is there; reads the lock only for single flight.
            probe = await store.probe(key, lock, lock_state=single_flight)
            if probe.entry is not None and (hit := self._hit(job, probe.entry, plan.max_age)):
                return hit
            locked, acquired = probe.locked, probe.acquired
        if lock is not None and not locked and not acquired:
            # Not looked up (`no-cache`), an unreadable entry was found, or Redis refused the
            # probe's lock: lock on its own (a refusal again: no single flight, nobody to follow).
            took = await store.acquire(key, lock.owner, lock.ttl_ms)
            acquired, locked = took is True, took is False
            if took is None:
                self._refused_until = now + REFUSED_COOLDOWN
        if acquired:
            self._lead(job.request_id, key, now=now, expires=now + ttl)
        if locked and plan.lookup and single_flight:
            entry = await self._follow(job, store, key)
            if entry is not None and (hit := self._hit(job, entry, plan.max_age)):
                return hit
        status = MISS if plan.lookup else BYPASS
        return Proceed(job.with_changes(cache_status=status, cache_key=key if plan.store else None))

    def _lead(self, request_id: str, key: str, *, now: float, expires: float) -> None:
        self._leading[request_id] = (key, expires)
        while self._leading:  # forget expired locks (each lives single_flight_wait at most)
            _, (_, first_expiry) = next(iter(self._leading.items()))
            if first_expiry > now:
                break
            self._leading.popitem(last=False)

    async def on_cancel(self, request_id: str) -> None:
        """A cancelled job (or one given up on) computes no answer: release its lock now, so
        its waiters (such as the same request retried by its client) are routed at once
        instead of waiting it out."""
        lead = self._leading.pop(request_id, None)
        if lead is None or self.store is None or lead[1] <= self.clock():
            return
        try:
            await self.store.release(lead[0], request_id)
        except CacheUnavailableError as e:
            log.info("lock of cancelled job %s left to expire: %s", request_id, e)

    def _hit(self, job: Job, entry: bytes, max_age: int | None = None) -> Hit | None:
        if max_age is not None:
            age = stored_age(entry, self.clock())
            if age is None or age > max_age:  # older than the client accepts: a miss
                return None
        try:
            payload = hit_payload(
                entry, job.request_id, stream=job.stream, include_usage=job.include_usage
            )
        except NotReplayableError as e:
            log.info("job %s: cached answer not served as a stream (%s)", job.request_id, e)
            return None
        except EntryError as e:
            log.warning("job %s: unreadable cache entry treated as a miss (%s)", job.request_id, e)
            return None
        return Hit(job.with_changes(cache_status=HIT, cache_key=None), payload)

    async def _follow(self, job: Job, store: CacheStore, key: str) -> bytes | None:
        """Wait for the identical job in flight (see the module docstring); None: route it."""
        timeout = min(self.single_flight_wait, job.remaining(self.clock()) / 2)
        if self.waiting >= self.max_waiters or timeout <= 0:
            return None
        found: list[bytes | None] = []

        async def wait() -> None:
            found.append(await store.wait(key, timeout))

        self.waiting += 1
        started = time.monotonic()
        try:
            await self.cancellations.run(job.request_id, wait())
        finally:
            self.waiting -= 1
        entry = found[0] if found else None
        log.info(
            "job %s waited %.0fms for an identical job: %s",
            job.request_id,
            (time.monotonic() - started) * 1000,
            "answered" if entry is not None else "routing it",
        )
        return entry

    async def on_completed(self, env: Envelope, _: Delivery) -> None:
        """Write the finished jobs' answers (the complete ones) and wake their waiters. Acked
        either way: the clients have their answers, and a cache write is worth no retry."""
        events = decode_completed(env)
        if self.store is None or not self.policy.is_active:
            return
        # Submitted together, the writes of one message share a Redis round trip (`Batcher`).
        await asyncio.gather(*(self._write(e) for e in events if self._may_write(e, env.user_id)))

    def _may_write(self, event: Completed, user_id: str | None) -> bool:
        model = self.policy.model_of(event.cache_key)
        if model is None:
            log.warning("job.completed for a foreign key dropped")
            return False
        if not self.trust.may_answer(user_id, model):
            # An agent's broker user may write entries only for the models it serves.
            log.warning("job.completed for model %s from broker user %r dropped", model, user_id)
            return False
        return True

    async def _write(self, event: Completed) -> None:
        # Not skipped while the lookup breaker is open: the lock this event frees may be
        # another dispatcher's leader's, with followers waiting on it. Each write is bounded
        # by the cache timeout, and a dead Redis soon stops the events coming: jobs that
        # bypass the cache carry no key.
        assert self.store is not None
        try:
            if event.status == 200 and is_storable(event.body):
                await self.store.write(
                    event.cache_key, event.body, self.policy.ttl, event.request_id
                )
            else:
                await self.store.abandon(event.cache_key, event.request_id)
        except CacheWriteRefusedError as e:
            self._refused_until = self.clock() + REFUSED_COOLDOWN
            # Redis still answers: the entries it holds are still worth serving.
            log.warning("cache write refused: %s", e)
        except CacheUnavailableError as e:
            self.breaker.failed()
            log.warning("cache write skipped: %s", e)


def single_flight_waiters(prefetch: int) -> int:
    """How many jobs may wait for a leader at once: half the prefetch, rounded down, so the
    other half keeps the dispatcher routing. With a prefetch of 1 none may (a waiter would
    hold the only slot, and every other request would wait behind it)."""
    return prefetch // 2


def cache_for(settings: DispatcherSettings, *, cancellations: Cancellations) -> JobCache:
    """The cache of one dispatcher process; inactive without REDIS_URL or with CACHE_TTL=0."""
    policy = CachePolicy(
        prefix=f"{settings.broker_namespace}:cache:v1",
        ttl=settings.cache_ttl,
        enabled=bool(settings.redis_url),
        deterministic_only=settings.cache_deterministic_only,
        shared_namespace=settings.cache_shared_namespace,
    )
    store = None
    if policy.is_active and settings.redis_url:
        store = RedisStore.from_url(settings.redis_url, timeout=settings.cache_timeout_ms / 1000)
    return JobCache(
        store,
        policy,
        cancellations=cancellations,
        single_flight_wait=settings.cache_single_flight_wait,
        max_waiters=single_flight_waiters(settings.dispatcher_prefetch),
        trust=ReplyTrust.parse(settings.reply_users),
    )
