"""Agents in front of fake vLLM servers, through the real API and dispatcher processes.

Each test gets its own stack (fresh broker namespace): API with agent tokens, a dispatcher with a
short heartbeat TTL, fake vLLM servers and agents as processes.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionChunk

from fakes.core import FakeConfig, reply_tokens
from tests.integration.conftest import sdk_client
from tests.support.procs import free_port, wait_for, wait_http
from tests.support.rig import MESSAGES, TTL, Router

pytestmark = pytest.mark.integration


def content_of(tokens: int) -> str:
    return "".join(reply_tokens(FakeConfig(), tokens))


def fire(router: Router, count: int, model: str, **body: Any) -> list[httpx.Response]:
    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(lambda _: router.chat(model, **body), range(count)))


@contextmanager
def local_m_stream(router: Router) -> Iterator[openai.Stream[ChatCompletionChunk]]:
    """A stream of `local_m` through the strict SDK, open for the block."""
    with sdk_client(router.api) as client:
        yield client.chat.completions.create(
            model="local_m",
            messages=MESSAGES,  # type: ignore[arg-type]
            stream=True,
        )


# --- the SDK through an agent ----------------------------------------------------------------


def test_sdk_completion_and_stream_through_an_agent(router: Router) -> None:
    fake = router.fake("--tokens", "12", "--token-rate", "200", models="mistral-7b")
    router.agent("a1", fake)  # AGENT_MODELS empty: discovered as local_mistral-7b
    router.wait_listed("local_mistral-7b")
    with sdk_client(router.api) as client:
        completion = client.chat.completions.create(model="local_mistral-7b", messages=MESSAGES)  # type: ignore[arg-type]
        assert completion.model == "local_mistral-7b"
        assert completion.choices[0].message.content == content_of(12)

        stream = client.chat.completions.create(
            model="local_mistral-7b",
            messages=MESSAGES,  # type: ignore[arg-type]
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
    assert {c.model for c in chunks} == {"local_mistral-7b"}
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == content_of(12)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12
    assert [body["model"] for body in fake.stats()["bodies"]] == ["mistral-7b", "mistral-7b"]


def test_empty_stream_options_bring_no_usage_chunk_from_vllm(router: Router) -> None:
    """vLLM reads `stream_options: {}` as asking for usage; OpenAI, the SDK and the router as
    not: the agent spells `include_usage` out, so the client gets what it asked for."""
    fake = router.fake("--tokens", "3", models="m")
    router.agent("a1", fake, AGENT_MODELS="local_m")
    router.wait_listed("local_m")
    with sdk_client(router.api) as client:
        stream = client.chat.completions.create(
            model="local_m",
            messages=MESSAGES,  # type: ignore[arg-type]
            stream=True,
            stream_options={},  # type: ignore[typeddict-item]
        )
        chunks = list(stream)
    assert chunks and all(c.choices and c.usage is None for c in chunks)
    assert fake.stats()["bodies"][0]["stream_options"] == {"include_usage": False}


def test_configured_model_names_are_rewritten_both_ways(router: Router) -> None:
    fake = router.fake("--tokens", "3", models="served-x")
    router.agent("a1", fake, AGENT_MODELS="local_x=served-x")
    router.wait_listed("local_x")
    response = router.chat("local_x")
    assert response.status_code == 200, response.text
    assert response.json()["model"] == "local_x"
    assert fake.stats()["bodies"][0]["model"] == "served-x"


def test_a_photo_sized_request_reaches_the_server_whole(router: Router) -> None:
    """About 10 MiB, the size of a phone photo in base64 with the conversation around it: under
    MAX_BODY_BYTES, through the broker twice and the agent, byte for byte."""
    fake = router.fake("--tokens", "3", models="vl")
    router.agent("a1", fake, AGENT_MODELS="local_vl=vl")
    router.wait_listed("local_vl")
    image = "data:image/jpeg;base64," + "A" * (10 * 1024 * 1024)
    parts = [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": image}},
    ]
    with sdk_client(router.api) as client:
        completion = client.chat.completions.create(
            model="local_vl",
            messages=[{"role": "user", "content": parts}],  # type: ignore[list-item]
        )
    assert completion.choices[0].message.content == content_of(3)
    [body] = fake.stats()["bodies"]
    assert body["messages"][0]["content"][1]["image_url"]["url"] == image


def test_an_answer_past_the_reply_limit_is_a_502_that_spares_the_streams_beside_it(
    router: Router,
) -> None:
    """An answer larger than a reply message may carry (`MAX_REPLY_BYTES`; the broker would
    close the publishing channel under every other reply on it): a prompt the fake echoes
    back, past an 8 MiB limit. It is answered 502 once, and a stream of the same agent goes on."""
    fake = router.fake("--echo", "--token-rate", "40")
    router.agent("a1", fake, AGENT_MODELS="local_m=m", MAX_REPLY_BYTES=str(8 * 1024 * 1024))
    router.wait_listed("local_m")
    words = " ".join(f"w{i}" for i in range(60))  # 60 tokens at 40 a second: 1.5 s
    with ThreadPoolExecutor(max_workers=1) as pool:
        stream = pool.submit(
            router.chat, "local_m", stream=True, messages=[{"role": "user", "content": words}]
        )
        wait_for(lambda: fake.stats()["in_flight"] == 1, timeout=5, message="no stream")
        big = router.chat("local_m", messages=[{"role": "user", "content": "x" * 9_000_000}])
        assert big.status_code == 502, big.text[:300]
        assert big.json()["error"]["code"] == "answer_too_large"
        # Streamed, the role chunk is out before the event that is too large: an error event.
        big = router.chat(
            "local_m", stream=True, messages=[{"role": "user", "content": "y" * 9_000_000}]
        )
        last = big.text.strip().rsplit("\n\n", 1)[-1]
        assert last.startswith("data: ") and "[DONE]" not in last, last[:300]
        assert json.loads(last[len("data: ") :])["error"]["code"] == "answer_too_large"
        streamed = stream.result()
    assert streamed.status_code == 200
    assert streamed.text.endswith("data: [DONE]\n\n")
    assert "error" not in streamed.text
    assert fake.stats()["completed"] == 3  # each ran once: nothing requeued


def test_a_vllm_failing_mid_stream_reaches_the_client_as_its_error_event(
    router: Router,
) -> None:
    """vLLM ends a stream whose generation failed with an error event and `[DONE]`: the
    client gets the tokens before it, then that error, and no `[DONE]` of a stream that
    succeeded."""
    fake = router.fake("--tokens", "8")
    router.agent("a1", fake, AGENT_MODELS="local_m=m")
    router.wait_listed("local_m")
    step = {"error_after_chunks": 3, "body": "CUDA error: out of memory"}
    httpx.post(f"{fake.url}/_fake/script", json=[step], timeout=5).raise_for_status()
    received = []
    with sdk_client(router.api) as client:
        stream = client.chat.completions.create(model="local_m", messages=MESSAGES, stream=True)
        with pytest.raises(openai.APIError, match="CUDA error: out of memory"):
            for chunk in stream:
                received.append(chunk)
    assert "".join(c.choices[0].delta.content or "" for c in received if c.choices)
    assert all(c.model == "local_m" for c in received)


def test_upstream_error_keeps_its_status(router: Router) -> None:
    fake = router.fake(models="m")
    router.agent("a1", fake, AGENT_MODELS="local_m")
    router.wait_listed("local_m")
    body = {"error": {"message": "prompt too long", "type": "BadRequestError", "code": 400}}
    httpx.post(f"{fake.url}/_fake/script", json=[{"status": 400, "body": body}] * 2, timeout=2)
    response = router.chat("local_m")
    assert response.status_code == 400
    assert response.json()["error"] == {
        "message": "prompt too long",
        "type": "invalid_request_error",  # in OpenAI's words, not vLLM's
        "param": None,
        "code": None,
    }
    response = router.chat("local_m", stream=True)
    assert response.status_code == 400
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_an_agent_serves_a_server_that_wants_a_key(router: Router) -> None:
    fake = router.fake("--api-key", "sk-vllm", models="m")
    router.agent("a1", fake, VLLM_API_KEY="sk-vllm")  # discovered through the guarded list
    router.wait_listed("local_m")
    with sdk_client(router.api) as client:
        completion = client.chat.completions.create(model="local_m", messages=MESSAGES)  # type: ignore[arg-type]
        assert completion.choices[0].message.content
        stream = client.chat.completions.create(model="local_m", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert fake.stats()["auth"][-2:] == ["Bearer sk-vllm"] * 2


# --- sharing and failure -----------------------------------------------------------------------


def test_three_agents_share_the_work(router: Router) -> None:
    fakes = [router.fake("--latency", "0.3", "--tokens", "4") for _ in range(3)]
    for name, fake in zip(("a1", "a2", "a3"), fakes, strict=True):
        router.agent(name, fake, AGENT_MODELS="local_m")
    router.wait_listed("local_m")
    responses = fire(router, 60, "local_m")
    assert [r.status_code for r in responses] == [200] * 60
    served = [fake.stats()["completed"] for fake in fakes]
    assert sum(served) == 60
    assert min(served) >= 10, served


def test_killed_agent_loses_no_job(router: Router) -> None:
    slow = router.fake("--latency", "5", "--tokens", "4")
    fast = router.fake("--latency", "0.1", "--tokens", "4")
    doomed = router.agent("a1", slow, AGENT_MODELS="local_m")
    router.agent("a2", fast, AGENT_MODELS="local_m")
    router.wait_listed("local_m")
    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(router.chat, "local_m") for _ in range(8)]
        wait_for(lambda: slow.stats()["in_flight"] >= 2, timeout=5, message="a1 holds no jobs")
        doomed.service.kill()  # SIGKILL with two jobs unacked
        responses = [f.result() for f in futures]
    assert [r.status_code for r in responses] == [200] * 8
    assert len({r.json()["id"] for r in responses}) == 8
    assert all(r.json()["choices"][0]["message"]["content"] == content_of(4) for r in responses)
    assert slow.stats()["completed"] == 0
    assert fast.stats()["completed"] == 8


def test_silent_agent_leaves_the_model_list_and_requests_fail_fast(router: Router) -> None:
    fake = router.fake()
    agent = router.agent("a1", fake, AGENT_MODELS="local_m")
    router.wait_listed("local_m")
    os.kill(agent.service.pid, signal.SIGSTOP)
    try:
        stopped = time.monotonic()
        wait_for(lambda: "local_m" not in router.models(), timeout=TTL + 3, interval=0.2)
        assert time.monotonic() - stopped >= TTL - 1.0  # not before the TTL (minus one interval)
        response = router.chat("local_m")
        # Refused by the dispatcher at once: a job queued for the frozen agent would end in
        # `no_agent_available` (its queue TTL) or a 504 (the deadline) instead.
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "no_live_agent"
    finally:
        agent.service.kill()


def test_an_agent_that_stops_leaves_the_registry_at_once(router: Router) -> None:
    """Not one TTL after its last heartbeat: meanwhile its model's jobs would wait in a queue
    nobody consumes, until AGENT_QUEUE_TTL answered them 503."""
    agent = router.agent("a1", router.fake(), AGENT_MODELS="local_m")
    router.wait_listed("local_m")
    agent.service.signal(signal.SIGTERM)
    stopped = time.monotonic()
    wait_for(lambda: "local_m" not in router.models(), timeout=TTL + 3, interval=0.05)
    assert time.monotonic() - stopped < TTL / 2
    response = router.chat("local_m")
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "no_live_agent"  # known: not a 404
    wait_for(lambda: not agent.service.is_running(), timeout=10, message="agent still up")
    assert "left the registry" in agent.service.log()


def test_a_replica_that_stops_leaves_its_model_to_the_replica_of_the_same_name(
    router: Router,
) -> None:
    """Replicas share a name and its token (`--scale agent=N`, a rolling restart). The one
    leaving marked the whole name dead: its model answered 503 `no_live_agent` until the
    other's next heartbeat (review 2026-11-29)."""
    fake = router.fake()
    # Heartbeats far apart: a wrong 503 would last until the survivor's next one.
    staying = router.agent("a1", fake, AGENT_MODELS="local_m", HEARTBEAT_INTERVAL="1.2")
    leaving = router.agent("a1", fake, AGENT_MODELS="local_m", HEARTBEAT_INTERVAL="1.2")
    router.wait_listed("local_m")
    leaving.service.signal(signal.SIGTERM)
    wait_for(lambda: "left the registry" in leaving.service.log(), timeout=10, interval=0.05)
    statuses = [router.chat("local_m").status_code for _ in range(5)]
    assert statuses == [200] * 5
    assert "local_m" in router.models()
    assert staying.service.is_running()


def test_a_restarted_dispatcher_routes_the_jobs_that_waited_for_it(router: Router) -> None:
    """The agents kept serving while the only dispatcher was down for longer than the TTL:
    the job queued meanwhile goes to them, though the registry the dispatcher reloads has
    heard from none of them since, and no heartbeat has reached it yet."""
    fake = router.fake()
    router.agent("a1", fake, AGENT_MODELS="local_m", HEARTBEAT_INTERVAL="2.5")
    router.wait_listed("local_m")
    [dispatcher] = [s for s in router.stack.services if s.name == "dispatcher"]
    dispatcher.stop()
    time.sleep(TTL + 1)
    with ThreadPoolExecutor(max_workers=1) as pool:
        waiting = pool.submit(router.chat, "local_m")
        time.sleep(0.5)  # in the jobs queue, waiting for a dispatcher
        router.stack.start("dispatcher", ["dispatcher"], **dispatcher.env)
        response = waiting.result()
    assert response.status_code == 200, response.text
    assert fake.stats()["completed"] == 1


def test_services_that_disagree_on_the_agent_queue_ttl_say_so_and_answer_at_once(
    router: Router,
) -> None:
    """AGENT_QUEUE_TTL is part of the agent queues' arguments. A dispatcher with another one
    used to log a traceback per heartbeat and leave jobs to their 120 s deadline; an agent
    stopped with a traceback."""
    fake = router.fake()
    router.agent("a1", fake, AGENT_MODELS="local_m")
    router.wait_listed("local_m")
    [first] = [s for s in router.stack.services if s.name == "dispatcher"]
    first.stop()
    other = router.stack.start("dispatcher", ["dispatcher"], **first.env, AGENT_QUEUE_TTL="10")
    router.wait_listed("local_m")  # it heard a heartbeat, and tried to declare the queue
    started = time.monotonic()
    response = router.chat("local_m")
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "queue_misconfigured"
    assert time.monotonic() - started < 5
    assert router.chat("dummy").status_code == 200
    log = other.log()
    assert log.count("exists with other arguments") == 1
    assert "AGENT_QUEUE_TTL" in log and "Traceback" not in log

    agent = router.agent("a2", fake, ready=False, AGENT_MODELS="local_m", AGENT_QUEUE_TTL="10")
    wait_for(lambda: not agent.service.is_running(), timeout=15, message="agent still up")
    assert agent.service.process is not None and agent.service.process.returncode == 1
    log = agent.service.log()
    assert "cannot start: queue" in log and "AGENT_QUEUE_TTL" in log
    assert "Traceback" not in log


def test_agent_tokens_are_checked(router: Router) -> None:
    heartbeat = httpx.post(
        f"{router.api}/heartbeat",
        json={"name": "a1"},
        headers={"authorization": "Bearer tok-b1"},
        timeout=5,
    )
    assert heartbeat.status_code == 403
    register = httpx.post(
        f"{router.api}/register", json={"name": "a1", "models": ["local_m"]}, timeout=5
    )
    assert register.status_code == 401
    assert register.json()["error"]["code"] == "invalid_api_key"

    # An agent process holding another agent's token never gets in, and does not stay to take
    # jobs from its model's queue either: it stops, non-zero.
    impostor = router.agent(
        "a1", router.fake(), token="tok-b1", ready=False, AGENT_MODELS="local_m"
    )
    wait_for(lambda: not impostor.service.is_running(), timeout=15, message="impostor still up")
    assert impostor.service.process is not None and impostor.service.process.returncode != 0
    log = impostor.service.log()
    assert "registration refused (/register answered 403" in log
    assert "Traceback" not in log  # an operator's mistake, said once: not a bug's stack
    assert "local_m" not in router.models()


def test_a_dispatcher_added_beside_a_running_one_fails_no_live_models_request(
    router: Router,
) -> None:
    """A new dispatcher (a fresh registry file) answered 503 `registry_warming_up` for a live
    model until the agents' next heartbeat reached it (review 2026-11-29)."""
    router.agent("a1", router.fake(), AGENT_MODELS="local_m", HEARTBEAT_INTERVAL="2.5")
    router.wait_listed("local_m")
    port = free_port()
    added = router.stack.start_dispatcher(router.tmp, HEARTBEAT_TTL=str(TTL), HEALTH_PORT=str(port))
    wait_http(f"http://127.0.0.1:{port}/ready", service=added)
    with ThreadPoolExecutor(max_workers=8) as pool:  # both dispatchers take some
        statuses = [r.status_code for r in pool.map(lambda _: router.chat("local_m"), range(8))]
    assert statuses == [200] * 8
    assert "route=ToAgent" in added.log()  # the new one took its share


def test_two_apis_and_two_dispatchers_agree(router: Router) -> None:
    router.add_dispatcher()
    router.add_api()
    fake = router.fake("--tokens", "3")
    router.agent("a1", fake, AGENT_MODELS="local_m")
    # Either dispatcher may answer the model list: ask often enough to hear from both.
    wait_for(
        lambda: all("local_m" in router.models(api) for api in router.apis for _ in range(4)),
        timeout=5,
    )
    lists = {tuple(router.models(api)) for api in router.apis for _ in range(6)}
    assert lists == {("dummy", "local_m")}
    # Every API sends both kinds of request: the dummy model and the agent's.
    with ThreadPoolExecutor(max_workers=20) as pool:
        responses = list(
            pool.map(
                lambda i: router.chat("local_m" if i % 2 else "dummy", api=router.apis[i // 2 % 2]),
                range(20),
            )
        )
    assert [r.status_code for r in responses] == [200] * 20
    assert {r.json()["model"] for r in responses} == {"dummy", "local_m"}


# --- streams: cancel and agent death -----------------------------------------------------------


def test_a_busy_agents_running_stream_keeps_new_jobs_away_from_it(router: Router) -> None:
    """An agent whose slots are all streaming takes no further job while another agent of the
    model is free: the stream holds its delivery (and so its prefetch slot) until it ends."""
    fakes = [router.fake("--tokens", "400", "--token-rate", "20") for _ in range(2)]
    for name, fake in zip(("a1", "a2"), fakes, strict=True):
        router.agent(name, fake, AGENT_MODELS="local_m", AGENT_CONCURRENCY="1")
    router.wait_listed("local_m")
    with ThreadPoolExecutor(max_workers=1) as pool:
        # 400 tokens at 20 a second: 20 s, longer than every short call below put together.
        long = pool.submit(router.chat, "local_m", stream=True, max_tokens=300)
        wait_for(
            lambda: sum(fake.stats()["in_flight"] for fake in fakes) == 1,
            timeout=5,
            message="the long stream never started",
        )
        busy = next(fake for fake in fakes if fake.stats()["in_flight"] == 1)
        idle = next(fake for fake in fakes if fake is not busy)
        started = time.monotonic()
        for _ in range(6):
            short = router.chat("local_m", max_tokens=2)
            assert short.status_code == 200, short.text
        took = time.monotonic() - started
        assert idle.stats()["completed"] == 6
        assert busy.stats()["completed"] == 0
        assert took < 5, took  # a call that waited behind the long stream would take 15 s
        assert long.result().status_code == 200


def read_to_an_error(stream: openai.Stream[ChatCompletionChunk], kill: Callable[[], None]) -> int:
    """Read `stream`, calling `kill()` once three chunks are in; the stream must end in an
    error. Returns how many chunks were read."""
    received = 0
    with pytest.raises(openai.APIError):
        for _ in stream:
            received += 1
            if received == 3:
                kill()
    return received


def test_client_leaving_a_stream_aborts_the_upstream_call(router: Router) -> None:
    fake = router.fake("--tokens", "400", "--token-rate", "20")
    router.agent("a1", fake, AGENT_MODELS="local_m")
    router.wait_listed("local_m")
    with local_m_stream(router) as stream:
        for i, _ in enumerate(stream):
            if i == 3:
                break
        stream.close()
    # 400 tokens at 20 a second take 20 s: aborted well before then, and never completed, the
    # call was cut by the client's leaving.
    wait_for(lambda: fake.stats()["aborted"] >= 1, timeout=10, message="upstream never aborted")
    assert fake.stats()["completed"] == 0


def test_agent_killed_mid_stream_ends_the_stream_with_an_error(router: Router) -> None:
    fake = router.fake("--tokens", "400", "--token-rate", "20")
    agent = router.agent("a1", fake, AGENT_MODELS="local_m")
    router.wait_listed("local_m")
    killed: list[float] = []

    def kill() -> None:
        agent.service.kill()
        killed.append(time.monotonic())

    with local_m_stream(router) as stream:
        received = read_to_an_error(stream, kill)
        ended = time.monotonic() - killed[0]
    # A behavioural bound: a stream gone silent ends within the API's STREAM_IDLE_TIMEOUT (3 s
    # here), plus 2 s for a loaded machine; only time tells it from the 20 s deadline's error.
    assert ended < 3 + 2, ended
    assert received < 100


def test_a_stream_cut_by_its_agents_death_is_not_run_again_for_its_client(router: Router) -> None:
    """The dead agent's stream is delivered again (it was not acked) and another agent starts
    it; the api, whose client already has part of the first attempt, ends the stream with an
    error and cancels the job, so the second call is cut off after its first chunk."""
    fakes = [router.fake("--tokens", "400", "--token-rate", "20") for _ in range(2)]
    agents = [
        router.agent(name, fake, AGENT_MODELS="local_m", AGENT_CONCURRENCY="1")
        for name, fake in zip(("a1", "a2"), fakes, strict=True)
    ]
    router.wait_listed("local_m")
    streaming: list[int] = []  # the fake (and agent) the stream went to

    def kill() -> None:
        streaming.append(next(i for i, fake in enumerate(fakes) if fake.stats()["in_flight"]))
        agents[streaming[0]].service.kill()

    with local_m_stream(router) as stream:
        received = read_to_an_error(stream, kill)
    second = fakes[1 - streaming[0]]
    wait_for(lambda: second.stats()["aborted"] >= 1, timeout=10, message="never cut off")
    assert second.stats()["completed"] == 0
    assert received < 100


def test_a_restarted_agent_does_not_run_a_dead_agents_stream_for_nobody(router: Router) -> None:
    """The agent dies mid-stream and its client leaves: the cancel reaches no agent, and the
    job waits unacked in the queue. The restarted agent takes it; its first chunk reaches the
    api, which knows the call ended and cancels the job: the call is cut off, not run to the end."""
    fake = router.fake("--tokens", "400", "--token-rate", "20")
    agent = router.agent("a1", fake, AGENT_MODELS="local_m")
    router.wait_listed("local_m")
    with local_m_stream(router) as stream:
        for received, _ in enumerate(stream):
            if received == 3:
                agent.service.kill()
                break
        stream.close()  # the client leaves
    router.agent("a1", fake, AGENT_MODELS="local_m")
    wait_for(lambda: fake.stats()["requests"] >= 2, timeout=10, message="the job was not re-run")
    # 400 tokens at 20 a second: run to the end, the second call would take 20 s.
    wait_for(lambda: fake.stats()["aborted"] >= 2, timeout=10, message="never cut off")
    assert fake.stats()["completed"] == 0


def test_a_stopping_api_answers_what_still_waits_503_and_cancels_those_jobs(
    router: Router,
) -> None:
    """uvicorn waited for the connections of requests still waiting, then cut them off: their
    clients saw the connection drop and their jobs ran on for nobody (review 2026-11-29)."""
    fake = router.fake("--latency", "30", models="m")  # answers long after the drain
    router.agent("a1", fake, AGENT_MODELS="local_m")
    router.wait_listed("local_m")
    api = router.add_api(DRAIN_TIMEOUT="1")
    [service] = [s for s in router.stack.services if s.name == "api"][-1:]
    with ThreadPoolExecutor(max_workers=2) as pool:
        waiting = [pool.submit(router.chat, "local_m", api=api, stream=s) for s in (False, True)]
        wait_for(lambda: fake.stats()["in_flight"] == 2, timeout=5, message="never called")
        stopped_at = time.monotonic()
        service.signal(signal.SIGTERM)
        answers = [future.result() for future in waiting]
    assert [a.status_code for a in answers] == [503, 503]
    assert {a.json()["error"]["code"] for a in answers} == {"api_stopping"}
    assert {a.headers["retry-after"] for a in answers} == {"1"}
    assert time.monotonic() - stopped_at < 1 + 3, "not answered at DRAIN_TIMEOUT"
    assert service.process is not None
    service.process.wait(5)  # exits on its own, its connections closed
    wait_for(lambda: fake.stats()["aborted"] == 2, timeout=5, message="the jobs ran on")


def test_sigterm_lets_a_running_stream_finish(router: Router) -> None:
    fake = router.fake("--tokens", "20", "--token-rate", "20")
    agent = router.agent("a1", fake, AGENT_MODELS="local_m")
    router.wait_listed("local_m")
    with local_m_stream(router) as stream:
        parts: list[str] = []
        for chunk in stream:
            parts.extend(c.delta.content or "" for c in chunk.choices)
            if len(parts) == 3:
                agent.service.signal(signal.SIGTERM)
    assert "".join(parts) == content_of(20)
    assert agent.service.process is not None
    assert agent.service.process.wait(5) == 0
    wait_for(lambda: "local_m" not in router.models(), timeout=TTL + 3, interval=0.2)
