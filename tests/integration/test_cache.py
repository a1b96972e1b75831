"""The response cache on real Redis, through the real API, dispatcher and agent processes.

One stack for the module: the test's own `redis-server` (a spare port, started and stopped by
its pid), an API with two client keys (two tenants), two dispatchers, and an agent in front of
a fake vLLM whose `/_fake/stats` counts the upstream calls. Every test asks its own question (a
fresh uuid in the prompt), so tests never see each other's entries.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from services.dispatcher.cache_key import CachePolicy, cache_key
from tests.conftest import require_services, skip_or_fail
from tests.integration.conftest import STACK_ENV, sdk_client
from tests.support.procs import (
    LOG_DIR,
    Service,
    Stack,
    free_port,
    running_stack,
    wait_for,
    wait_http,
)

pytestmark = pytest.mark.integration

KEYS = {"alice": "key-alice-0001", "bob": "key-bob-0002"}
AGENT_TOKEN = "tok-cache-agent-1"
MODEL = "local_m"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


@dataclass
class RedisServer:
    """A private redis-server (no persistence: a restart empties it), controlled by its pid."""

    port: int
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        with (LOG_DIR / f"redis-{self.port}.log").open("ab") as log:
            self.process = subprocess.Popen(
                [
                    *("redis-server", "--port", str(self.port), "--bind", "127.0.0.1"),
                    *("--save", "", "--appendonly", "no"),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for(self._answers, timeout=5, message="redis-server did not start")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(5)
        self.process = None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2)

    def _answers(self) -> bool:
        try:
            with self.client() as r:
                return bool(r.ping())
        except redis.RedisError:
            return False


@dataclass
class CacheStack:
    stack: Stack
    api: str
    fake: str
    redis: RedisServer
    dispatchers: list[Service] = field(default_factory=list)

    def upstream_calls(self) -> int:
        return int(httpx.get(f"{self.fake}/_fake/stats", timeout=2).json()["requests"])

    def script(self, *steps: dict[str, Any]) -> None:
        httpx.post(f"{self.fake}/_fake/script", json=list(steps), timeout=2).raise_for_status()

    def chat(
        self, body: dict[str, Any], *, tenant: str = "alice", headers: dict[str, str] | None = None
    ) -> httpx.Response:
        return httpx.post(
            f"{self.api}/v1/chat/completions",
            json=body,
            headers={"authorization": f"Bearer {KEYS[tenant]}", **(headers or {})},
            timeout=25,
        )

    def key_of(self, body: dict[str, Any], tenant: str = "alice") -> str:
        policy = CachePolicy(prefix=f"{self.stack.namespace}:cache:v1", ttl=1)
        return cache_key(body, tenant=tenant, policy=policy)

    def wait_stored(self, body: dict[str, Any], tenant: str = "alice") -> None:
        """The entry is written just after the answer leaves (by the completed-event consumer)."""
        key = self.key_of(body, tenant)
        with self.redis.client() as r:
            wait_for(lambda: r.exists(key), timeout=5, interval=0.02, message=f"{key} not stored")

    def is_stored(self, body: dict[str, Any], tenant: str = "alice") -> bool:
        with self.redis.client() as r:
            return bool(r.exists(self.key_of(body, tenant)))


def question(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": uuid.uuid4().hex}], **extra}


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CacheStack]:
    require_services()
    if shutil.which("redis-server") is None:
        skip_or_fail("redis-server is not installed: the cache tests run their own")
    server = RedisServer(free_port())
    server.start()
    env = {
        **STACK_ENV,
        "CACHE_TTL": "600",
        # Generous on a shared, loaded test machine: a Redis op slower than this bypasses the
        # cache (and would add upstream calls); a stopped Redis refuses at once either way.
        "CACHE_TIMEOUT_MS": "1000",
        "REDIS_URL": f"redis://127.0.0.1:{server.port}/0",
        "CLIENT_KEYS": ",".join(f"{tenant}:{key}" for tenant, key in KEYS.items()),
        "AGENT_TOKENS": f"a1={AGENT_TOKEN}",
    }
    tmp: Path = tmp_path_factory.mktemp("cache")
    try:
        with running_stack(env) as stack:
            dispatchers = [stack.start_dispatcher(tmp) for _ in range(2)]
            api = stack.start_api()
            port = free_port()
            fake_service = stack.start(
                "fake-vllm", ["fake-vllm", "--port", str(port), "--models", "m", "--tokens", "5"]
            )
            fake = f"http://127.0.0.1:{port}"
            wait_http(f"{fake}/health", service=fake_service)
            agent_port = free_port()
            agent = stack.start(
                "agent-a1",
                ["agent"],
                AGENT_NAME="a1",
                AGENT_TOKEN=AGENT_TOKEN,
                ROUTER_URL=api,
                VLLM_URL=f"{fake}/v1",
                AGENT_MODELS=MODEL,
                AGENT_PORT=str(agent_port),
                AGENT_HOST="127.0.0.1",
                HEARTBEAT_INTERVAL="0.5",
                AGENT_CONCURRENCY="16",
            )
            wait_http(f"http://127.0.0.1:{agent_port}/ready", service=agent)
            built = CacheStack(stack, api, fake, server, dispatchers)
            # Both dispatchers must know the agent: ask the model list until each answered.
            wait_for(
                lambda: all(built.chat(question()).status_code == 200 for _ in range(4)),
                timeout=10,
                message="the agent's model is not routed by both dispatchers",
            )
            yield built
    finally:
        server.stop()


def content(response: httpx.Response) -> Any:
    return response.json()["choices"][0]["message"]


# --- hits --------------------------------------------------------------------------------------


def test_a_repeat_is_a_hit_equal_to_the_first_answer(cache: CacheStack) -> None:
    body = question(temperature=0.7)
    before = cache.upstream_calls()
    first = cache.chat(body)
    assert first.status_code == 200, first.text
    assert first.headers["x-cache"] == "miss"
    cache.wait_stored(body)

    second = cache.chat(body)
    assert second.status_code == 200
    assert second.headers["x-cache"] == "hit"
    assert cache.upstream_calls() == before + 1
    answer, repeat = first.json(), second.json()
    assert repeat["id"] == f"chatcmpl-{second.headers['x-request-id']}"
    assert {**repeat, "id": answer["id"]} == answer  # the same answer, under its own id


def test_cache_control_skips_the_lookup_or_the_write(cache: CacheStack) -> None:
    body = question()
    assert cache.chat(body, headers={"cache-control": "no-store"}).headers["x-cache"] == "miss"
    time.sleep(0.3)
    assert not cache.is_stored(body)
    assert cache.chat(body).headers["x-cache"] == "miss"
    cache.wait_stored(body)
    before = cache.upstream_calls()
    fresh = cache.chat(body, headers={"cache-control": "no-cache"})
    assert fresh.status_code == 200 and fresh.headers["x-cache"] == "bypass"
    assert cache.upstream_calls() == before + 1
    assert cache.chat(body).headers["x-cache"] == "hit"


@pytest.mark.parametrize(
    "lines",
    [
        [("cache-control", "max-stale"), ("cache-control", "no-store")],  # a line of its own
        [("cache-control", f'private="{"x" * 300}", no-store')],  # after a long directive
    ],
    ids=["second-line", "after-300-characters"],
)
def test_no_store_is_heard_wherever_the_client_put_it(
    cache: CacheStack, lines: list[tuple[str, str]]
) -> None:
    body = question()
    first = httpx.post(
        f"{cache.api}/v1/chat/completions",
        json=body,
        headers=[("authorization", f"Bearer {KEYS['alice']}"), *lines],
        timeout=25,
    )
    assert first.status_code == 200 and first.headers["x-cache"] == "miss"
    time.sleep(0.3)
    assert not cache.is_stored(body)


def test_max_age_refuses_an_answer_older_than_it(cache: CacheStack) -> None:
    body = question()
    assert cache.chat(body).headers["x-cache"] == "miss"
    cache.wait_stored(body)
    assert cache.chat(body, headers={"cache-control": "max-age=60"}).headers["x-cache"] == "hit"
    time.sleep(2.1)  # `created` counts whole seconds
    assert cache.chat(body, headers={"cache-control": "max-age=1"}).headers["x-cache"] == "miss"
    assert cache.chat(body, headers={"cache-control": "max-age=00"}).headers["x-cache"] == (
        "bypass"  # zero, however written: no stored answer at all
    )


@pytest.mark.parametrize("shape", ["text", "tool-calls", "logprobs"])
def test_a_stream_after_a_json_call_is_replayed_from_the_cache(
    cache: CacheStack, shape: str
) -> None:
    tools = shape == "tool-calls"
    extra = {"logprobs": True, "top_logprobs": 2} if shape == "logprobs" else {}
    body = question(tools=[WEATHER_TOOL], **extra) if tools else question(**extra)
    first = cache.chat(body)
    assert first.status_code == 200
    answer = first.json()
    cache.wait_stored(body)
    before = cache.upstream_calls()

    with sdk_client(cache.api, api_key=KEYS["alice"]) as client:
        raw = client.chat.completions.with_raw_response.create(
            **body, stream=True, stream_options={"include_usage": True}
        )
        assert raw.headers["x-cache"] == "hit"
        assert raw.headers["content-type"].startswith("text/event-stream")
        chunks = list(raw.parse())

    assert cache.upstream_calls() == before
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert [usage.prompt_tokens, usage.completion_tokens, usage.total_tokens] == [
        answer["usage"][name] for name in ("prompt_tokens", "completion_tokens", "total_tokens")
    ]
    choices = [c.choices[0] for c in chunks if c.choices]
    assert choices[-1].finish_reason == answer["choices"][0]["finish_reason"]
    message = answer["choices"][0]["message"]
    if not tools:
        assert "".join(c.delta.content or "" for c in choices) == message["content"]
        # The upstream's own logprobs (the fake vLLM's, as vLLM writes them), replayed.
        replayed = [
            entry.model_dump()
            for c in choices
            if c.logprobs is not None and c.logprobs.content
            for entry in c.logprobs.content
        ]
        stored = (answer["choices"][0]["logprobs"] or {}).get("content") or []
        assert replayed == stored and bool(stored) == bool(extra)
        return
    calls = [call for c in choices for call in c.delta.tool_calls or []]
    assert [(c.id, c.function.name, c.function.arguments) for c in calls] == [  # type: ignore[union-attr]
        (call["id"], call["function"]["name"], call["function"]["arguments"])
        for call in message["tool_calls"]
    ]
    assert choices[-1].finish_reason == "tool_calls"


def test_two_tenants_never_share_an_entry(cache: CacheStack) -> None:
    body = question()
    before = cache.upstream_calls()
    assert cache.chat(body, tenant="alice").headers["x-cache"] == "miss"
    cache.wait_stored(body, "alice")
    assert cache.chat(body, tenant="alice").headers["x-cache"] == "hit"
    assert cache.chat(body, tenant="bob").headers["x-cache"] == "miss"
    cache.wait_stored(body, "bob")
    assert cache.chat(body, tenant="bob").headers["x-cache"] == "hit"
    assert cache.upstream_calls() == before + 2
    assert cache.key_of(body, "alice") != cache.key_of(body, "bob")


# --- what is never stored ----------------------------------------------------------------------


def test_an_upstream_error_is_not_cached(cache: CacheStack) -> None:
    body = question()
    before = cache.upstream_calls()
    cache.script({"status": 500})
    failed = cache.chat(body)
    assert failed.status_code >= 500
    assert failed.headers["x-cache"] == "miss"
    time.sleep(0.3)
    assert not cache.is_stored(body)
    retried = cache.chat(body)
    assert retried.status_code == 200 and retried.headers["x-cache"] == "miss"
    assert cache.upstream_calls() == before + 2


def test_a_truncated_answer_is_not_cached(cache: CacheStack) -> None:
    body = question(max_tokens=2)
    before = cache.upstream_calls()
    first = cache.chat(body)
    assert first.status_code == 200 and first.json()["choices"][0]["finish_reason"] == "length"
    time.sleep(0.3)
    assert cache.chat(body).headers["x-cache"] == "miss"
    assert cache.upstream_calls() == before + 2


# --- single flight -----------------------------------------------------------------------------


def test_identical_deterministic_requests_in_flight_make_one_upstream_call(
    cache: CacheStack,
) -> None:
    body = question(temperature=0)
    cache.script({"delay": 1.5})  # the one upstream call is slow: all ten are in flight at once
    before = cache.upstream_calls()
    with ThreadPoolExecutor(max_workers=10) as pool:
        responses = list(pool.map(lambda _: cache.chat(body), range(10)))
    assert [r.status_code for r in responses] == [200] * 10
    assert cache.upstream_calls() == before + 1
    assert sorted(r.headers["x-cache"] for r in responses) == ["hit"] * 9 + ["miss"]
    assert len({str(content(r)) for r in responses}) == 1
    assert len({r.json()["id"] for r in responses}) == 10
    # Spread over both dispatchers: each logged some of the ten.
    ids = [r.headers["x-request-id"] for r in responses]
    for dispatcher in cache.dispatchers:
        assert any(i in dispatcher.log() for i in ids), f"{dispatcher.log_path} saw none"


def test_followers_of_a_failed_leader_are_routed_at_once(cache: CacheStack) -> None:
    body = question(seed=7)
    cache.script({"delay": 1.0, "status": 500})  # the leader's call fails after a second
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=4) as pool:
        responses = list(pool.map(lambda _: cache.chat(body), range(4)))
    elapsed = time.monotonic() - started
    assert sorted(r.status_code for r in responses)[:3] == [200] * 3
    assert max(r.status_code for r in responses) >= 500
    # A behavioural bound (README, "Single flight": a failed leader's followers are routed at
    # once) that only time shows: without the failure event they would be routed just the same,
    # after waiting out the lock (10 s here: half their time left). The leader fails after 1 s;
    # 5 s leaves 4 s for a loaded machine.
    assert elapsed < 5.0, elapsed


def test_a_retry_does_not_wait_for_the_call_its_client_gave_up(cache: CacheStack) -> None:
    body = question(temperature=0)
    cache.script({"delay": 3.0})
    with pytest.raises(httpx.ReadTimeout):  # the client gives up: the API broadcasts a cancel
        httpx.post(
            f"{cache.api}/v1/chat/completions",
            json=body,
            headers={"authorization": f"Bearer {KEYS['alice']}"},
            timeout=0.5,
        )
    started = time.monotonic()
    retry = cache.chat(body)
    assert retry.status_code == 200 and retry.headers["x-cache"] == "miss"
    # A behavioural bound (README, "Single flight": a client's retry never waits for the call it
    # gave up on) that only time shows: with the lock kept, the retry would be answered just the
    # same, after waiting it out (10 s here: half its time left). Its own call is instant, so
    # 5 s leaves a loaded machine ample room.
    assert time.monotonic() - started < 5.0


# --- fail-open ---------------------------------------------------------------------------------


def test_requests_bypass_a_stopped_redis_and_hits_resume_when_it_returns(
    cache: CacheStack,
) -> None:
    body = question()
    assert cache.chat(body).headers["x-cache"] == "miss"
    cache.wait_stored(body)
    cache.redis.stop()
    try:
        for stream in (False, True, False, False):
            started = time.monotonic()
            response = cache.chat({**body, "stream": stream})
            assert response.status_code == 200, response.text
            assert response.headers["x-cache"] == "bypass"
            # Fail-open with bounded added latency (README, "Redis down or slow"): at most one
            # CACHE_TIMEOUT_MS (1 s here), plus 2 s for a loaded machine.
            assert time.monotonic() - started < 1.0 + 2.0
    finally:
        cache.redis.start()
    # The restarted Redis is empty: the next answer is stored again, then served from it.
    seen: list[str] = []

    def hit() -> bool:
        response = cache.chat(body)
        assert response.status_code == 200
        seen.append(response.headers["x-cache"])
        return seen[-1] == "hit"

    wait_for(hit, timeout=8, interval=0.2, message="hits did not resume")
    assert "miss" in seen
