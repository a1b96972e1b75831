"""The OpenAI provider end to end: the official SDK -> api -> dispatcher -> fake OpenAI.

Real processes on the real broker; the fake OpenAI runs as a process with a canary key, and
the dispatcher logs at DEBUG, so the last test can prove the key never leaks.
"""

from __future__ import annotations

import signal
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from tests.conftest import require_services
from tests.integration.conftest import STACK_ENV, sdk_client
from tests.support.procs import Stack, free_port, running_stack, wait_for, wait_http

KEY = f"sk-canary-{uuid.uuid4().hex}"
MESSAGES: Any = [{"role": "user", "content": "Say hello"}]
TOOLS: Any = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city", "days"],
            },
        },
    }
]


@dataclass
class Rig:
    stack: Stack
    api_url: str
    fake_url: str

    def script(self, *steps: dict[str, Any]) -> None:
        httpx.post(f"{self.fake_url}/_fake/script", json=list(steps), timeout=5).raise_for_status()

    def stats(self) -> dict[str, Any]:
        response = httpx.get(f"{self.fake_url}/_fake/stats", timeout=5)
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def direct(self, body: dict[str, Any]) -> httpx.Response:
        """The same request straight to the fake, for comparison."""
        return httpx.post(
            f"{self.fake_url}/v1/chat/completions",
            json=body,
            headers={"authorization": f"Bearer {KEY}"},
            timeout=10,
        )

    def reset(self) -> None:
        httpx.post(f"{self.fake_url}/_fake/reset", timeout=5).raise_for_status()


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    require_services()
    with running_stack({**STACK_ENV, "LOG_LEVEL": "DEBUG"}) as stack:
        port = free_port()
        fake = stack.start(
            "fake-openai",
            [
                "fake-openai",
                "--port",
                str(port),
                "--api-key",
                KEY,
                "--models",
                "gpt-4o-mini,gpt-4o",
            ],
        )
        fake_url = f"http://127.0.0.1:{port}"
        wait_http(f"{fake_url}/_fake/stats", service=fake)
        stack.start_dispatcher(
            tmp_path_factory.mktemp("openai"),
            OPENAI_API_KEY=KEY,
            OPENAI_BASE_URL=f"{fake_url}/v1",
            PROVIDER_BACKOFF_BASE="0.05",
            # The response cache (shared Redis) would answer repeated requests without a call.
            REDIS_URL="",
            # Few jobs-queue slots: a provider call holding one would block `dummy` at once.
            DISPATCHER_PREFETCH="2",
        )
        yield Rig(stack, stack.start_api(), fake_url)


@pytest.fixture
def fake(rig: Rig) -> Rig:
    rig.reset()
    return rig


@pytest.fixture
def client(rig: Rig) -> Iterator[openai.OpenAI]:
    with sdk_client(rig.api_url) as c:
        yield c


def comparable(completion: dict[str, Any]) -> list[Any]:
    """What must be equal between two answers of the fake (ids and times differ)."""
    choices = []
    for choice in completion["choices"]:
        message = dict(choice["message"])
        for call in message.get("tool_calls") or []:
            call.pop("id")
        choices.append((choice["index"], choice["finish_reason"], message))
    return [completion["model"], choices, completion["usage"]]


@pytest.mark.parametrize("model", ["gpt-4o-mini", "openai/gpt-4o-mini"])
def test_json_answers_equal_the_upstreams(fake: Rig, client: openai.OpenAI, model: str) -> None:
    extra = {"logprobs": True, "top_logprobs": 1}
    completion = client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        tools=TOOLS,
        n=2,
        response_format={"type": "json_object"},
        extra_body=extra,
    )
    assert completion.model == "gpt-4o-mini-2024-07-18"  # the upstream's snapshot, as OpenAI
    call = completion.choices[1].message.tool_calls[0]  # type: ignore[index]
    assert call.function.name == "get_weather"
    assert call.function.arguments == '{"city":"fake","days":1}'
    [sent] = fake.stats()["bodies"]
    assert sent == {
        "model": "gpt-4o-mini",
        "messages": MESSAGES,
        "tools": TOOLS,
        "n": 2,
        "response_format": {"type": "json_object"},
        **extra,
    }
    assert comparable(completion.model_dump(exclude_unset=True)) == comparable(
        fake.direct(sent).json()
    )


def test_a_field_the_router_does_not_know_reaches_the_provider_as_it_is(
    fake: Rig, client: openai.OpenAI
) -> None:
    """Unknown fields are passed on, untouched: OpenAI refuses one it does not know either
    (a vLLM sampling parameter sent to a cloud model, say), and its 400 reaches the client."""
    extra = {"top_k": 5, "x_unknown_param": {"kept": [1, 2.5, None]}}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, extra_body=extra)
    assert info.value.message.endswith("Unrecognized request argument supplied: top_k")
    assert (info.value.type, info.value.param, info.value.code) == (
        "invalid_request_error",
        None,
        None,
    )
    [sent] = fake.stats()["bodies"]
    assert {k: sent[k] for k in extra} == extra


def test_plain_content_and_rate_headers_are_relayed(fake: Rig, client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES)
    completion = raw.parse()
    direct = fake.direct({"model": "gpt-4o", "messages": MESSAGES}).json()
    assert completion.choices[0].message.content == direct["choices"][0]["message"]["content"]
    assert completion.usage is not None and completion.usage.total_tokens > 0
    assert raw.headers["x-ratelimit-limit-requests"] == "10000"
    assert raw.headers["x-upstream-request-id"].startswith("req_")
    assert len(raw.headers["x-request-id"]) == 32  # the router's own id


def test_streams_equal_the_upstreams(fake: Rig, client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="openai/gpt-4o",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    direct = fake.direct(
        {
            "model": "gpt-4o",
            "messages": MESSAGES,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).text
    expected = [
        orjson.loads(event[len("data: ") :])
        for event in direct.split("\n\n")
        if event.startswith("data: {")
    ]
    got = [c.model_dump(exclude_unset=True) for c in chunks]
    assert [(c["choices"], c["usage"]) for c in got] == [
        (c["choices"], c["usage"]) for c in expected
    ]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("Hello world The quick")
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 16
    assert all(c.usage is None for c in chunks[:-1])
    assert {c.model for c in chunks} == {"gpt-4o-2024-08-06"}  # the upstream's snapshot
    assert fake.stats()["bodies"][0]["stream_options"] == {"include_usage": True}


def test_streamed_tool_calls(fake: Rig, client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, tools=TOOLS, stream=True
        )
    )
    deltas = [c.choices[0].delta for c in chunks]
    assert deltas[0].tool_calls and deltas[0].tool_calls[0].function.name == "get_weather"  # type: ignore[union-attr]
    arguments = "".join(
        d.tool_calls[0].function.arguments or ""  # type: ignore[union-attr]
        for d in deltas
        if d.tool_calls
    )
    assert arguments == '{"city":"fake","days":1}'
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("stream", [False, True])
def test_a_400_reaches_the_sdk_with_the_upstreams_message(
    fake: Rig, client: openai.OpenAI, stream: bool
) -> None:
    # The API lets a tool without a name through; the fake (like OpenAI) refuses it.
    kwargs: Any = {"tools": [{"type": "function", "function": {}}]}
    if stream:
        fake.script({"status": 400})
        kwargs = {"stream": True}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, **kwargs)
    if not stream:
        assert "Each tool needs a function with a name." in info.value.message
        assert info.value.param == "tools"
    assert info.value.response.headers["x-should-retry"] == "false"
    assert fake.stats()["requests"] == 1


@pytest.mark.parametrize("stream", [False, True])
def test_a_429_keeps_its_message_and_rate_limit_headers(
    fake: Rig, client: openai.OpenAI, stream: bool
) -> None:
    fake.script({"status": 429, "headers": {"retry-after": "7", "retry-after-ms": "7000"}})
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=stream)
    assert "Rate limit reached for gpt-4o-mini" in info.value.message
    assert info.value.code == "rate_limit_exceeded"
    headers = info.value.response.headers
    assert headers["retry-after"] == "7" and headers["retry-after-ms"] == "7000"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-limit-tokens"] == "10000000"
    assert fake.stats()["requests"] == 1  # the client decides when to retry a 429


@pytest.mark.parametrize("stream", [False, True])
def test_two_500s_then_a_200_is_a_200(fake: Rig, client: openai.OpenAI, stream: bool) -> None:
    fake.script({"status": 500}, {"status": 502})
    answer = client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=stream)
    if stream:
        assert isinstance(answer, openai.Stream)
        text = "".join(c.choices[0].delta.content or "" for c in answer)
    else:
        assert isinstance(answer, openai.types.chat.ChatCompletion)
        text = answer.choices[0].message.content or ""
    assert text.startswith("Hello world")
    assert fake.stats()["requests"] == 3


@pytest.mark.parametrize("stream", [False, True])
def test_5xx_past_the_retries_is_a_502_with_the_upstreams_retry_after(
    fake: Rig, client: openai.OpenAI, stream: bool
) -> None:
    fake.script({"status": 500}, {"status": 503}, {"status": 503, "headers": {"retry-after": "1"}})
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=stream)
    assert info.value.status_code == 502
    assert info.value.response.headers["retry-after"] == "1"
    assert info.value.response.headers["x-should-retry"] == "false"  # the router retried
    assert "x-upstream-request-id" in info.value.response.headers
    assert fake.stats()["requests"] == 3


@pytest.mark.parametrize(
    ("stream", "step"),
    [
        (True, {"error_after_chunks": 0, "body": "overloaded"}),
        (False, {"status": 200, "body": "<html>hi</html>"}),
        (True, {"status": 200, "body": "<html>hi</html>"}),
    ],
    ids=["error-event-first", "json-not-json", "stream-not-a-stream"],
)
def test_an_upstream_failure_in_a_200_keeps_its_request_id_and_rate_limits(
    fake: Rig, stream: bool, step: dict[str, Any]
) -> None:
    """The 502 carried only the router's own headers: no `x-upstream-request-id`, which the
    provider's support asks for about a failure, nor the rate limits."""
    fake.script(step)
    response = httpx.post(
        f"{fake.api_url}/v1/chat/completions",
        json={"model": "gpt-4o", "messages": MESSAGES, "stream": stream},
        timeout=10,
    )
    assert response.status_code == 502
    assert response.headers["x-upstream-request-id"].startswith("req_")
    assert response.headers["x-ratelimit-limit-requests"] == "10000"
    assert fake.stats()["requests"] == 1


def test_an_error_answered_with_a_200_reaches_the_sdk_as_a_502(
    fake: Rig, client: openai.OpenAI
) -> None:
    """As some OpenAI-compatible servers fail: relayed as a 200, the SDK raised
    APIResponseValidationError, the upstream's message lost."""
    error = {"message": "The server is overloaded.", "type": "server_error"}
    fake.script({"status": 200, "body": {"error": error}})
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert info.value.status_code == 502
    assert info.value.body == {**error, "param": None, "code": None}
    assert info.value.response.headers["x-upstream-request-id"].startswith("req_")


def test_a_partial_upstream_error_reaches_the_client_with_all_four_fields(fake: Rig) -> None:
    fake.script({"status": 400, "body": {"error": {"message": "bad"}}})
    response = httpx.post(
        f"{fake.api_url}/v1/chat/completions",
        json={"model": "gpt-4o", "messages": MESSAGES},
        headers={"authorization": "Bearer sk-test"},
        timeout=10,
    )
    assert response.status_code == 400
    assert response.json() == {
        "error": {"message": "bad", "type": "invalid_request_error", "param": None, "code": None}
    }


def test_a_stream_cut_mid_way_is_an_error_not_a_hang(fake: Rig, client: openai.OpenAI) -> None:
    fake.script({"cut_after_chunks": 3})
    got: list[str] = []
    stream = client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    # The provider's "interrupted" error event: a hang would end otherwise (the API's "stopped
    # sending output in time", or the SDK's timeout), so no clock is needed to tell them apart.
    with pytest.raises(openai.APIError, match="interrupted"):
        for chunk in stream:
            got.append(chunk.choices[0].delta.content or "")
    assert "".join(got) == "Hello world"  # role chunk, "Hello", " world", then the cut
    assert fake.stats()["requests"] == 1  # output had started: too late to retry


def test_a_client_that_leaves_aborts_the_upstream_call(fake: Rig) -> None:
    fake.script({"delay": 10})
    body = {"model": "gpt-4o", "messages": MESSAGES}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{fake.api_url}/v1/chat/completions", json=body, timeout=1.0)
    wait_for(lambda: fake.stats()["aborted"] == 1, timeout=5, message="upstream call not aborted")


def test_slow_provider_streams_do_not_delay_dummy(fake: Rig) -> None:
    count = 20
    fake.script(*({"delay": 3} for _ in range(count)))
    texts: list[str] = []
    errors: list[BaseException] = []

    def slow_stream() -> None:
        try:
            with sdk_client(fake.api_url) as c:
                stream = c.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
                texts.append("".join(ch.choices[0].delta.content or "" for ch in stream))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=slow_stream) for _ in range(count)]
    for thread in threads:
        thread.start()
    try:
        wait_for(
            lambda: fake.stats()["in_flight"] == count,
            timeout=5,
            message="the slow streams did not all reach the upstream",
        )
        with sdk_client(fake.api_url) as c:
            answer = c.chat.completions.create(model="dummy", messages=MESSAGES)
        assert answer.choices[0].message.content == "Hello world"
        assert fake.stats()["in_flight"] == count  # answered while they were all still running
    finally:
        for thread in threads:
            thread.join(15)
    assert errors == []
    assert len(texts) == count and all(t.startswith("Hello world") for t in texts)


def test_models_include_the_upstreams(rig: Rig, client: openai.OpenAI) -> None:
    def listed() -> set[str]:
        return {model.id for model in client.models.list()}

    wait_for(lambda: {"gpt-4o", "gpt-4o-mini"} <= listed(), timeout=5, message=str(listed()))
    assert "dummy" in listed()
    assert client.models.retrieve("gpt-4o").owned_by == "provider"
    # A listed model is there under every name a chat request may use for it.
    assert client.models.retrieve("openai/gpt-4o").id == "openai/gpt-4o"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("openai/gpt-unlisted")


def test_without_a_key_openai_models_are_not_found(tmp_path: Path) -> None:
    require_services()
    with running_stack(STACK_ENV) as stack:
        stack.start_dispatcher(tmp_path, OPENAI_API_KEY="", REDIS_URL="")
        with sdk_client(stack.start_api()) as client:
            for model in ("gpt-4o", "openai/gpt-4o"):
                with pytest.raises(openai.NotFoundError) as info:
                    client.chat.completions.create(model=model, messages=MESSAGES)
                assert info.value.code == "model_not_found"
            assert {m.id for m in client.models.list()} == {"dummy"}


def test_a_stopping_dispatcher_ends_its_running_provider_stream_with_an_error(
    tmp_path: Path,
) -> None:
    """SIGTERM while a provider stream runs: past DRAIN_TIMEOUT the stream ends with a 503
    event at once, not with an idle error after STREAM_IDLE_TIMEOUT, and the process exits."""
    require_services()
    with running_stack({**STACK_ENV, "STREAM_IDLE_TIMEOUT": "15"}) as stack:
        port = free_port()
        args = ["fake-openai", "--port", str(port), "--api-key", KEY, "--token-rate", "5"]
        fake = stack.start("fake-openai", args)
        fake_url = f"http://127.0.0.1:{port}"
        wait_http(f"{fake_url}/_fake/stats", service=fake)
        dispatcher = stack.start_dispatcher(
            tmp_path,
            OPENAI_API_KEY=KEY,
            OPENAI_BASE_URL=f"{fake_url}/v1",
            REDIS_URL="",
            DRAIN_TIMEOUT="1",
        )
        with sdk_client(stack.start_api()) as client:
            stream = client.chat.completions.create(
                model="gpt-4o", messages=MESSAGES, stream=True, max_tokens=100
            )
            stopped = 0.0
            with pytest.raises(openai.APIError) as info:
                for received, _ in enumerate(stream, start=1):
                    if received == 2:
                        dispatcher.signal(signal.SIGTERM)
                        stopped = time.monotonic()
            assert stopped, f"the stream failed before the SIGTERM: {info.value}"
            waited = time.monotonic() - stopped
        # 100 tokens at 5 a second: had it run on, the stream would have lasted 20 s.
        assert "The dispatcher stopped" in info.value.message
        assert waited < 10, f"the stream ended {waited:.1f} s after the SIGTERM"
        assert dispatcher.process is not None and dispatcher.process.wait(10) == 0


def test_the_key_never_appears_in_logs_or_answers(fake: Rig) -> None:
    """Runs last: the logs then hold every request of this module, errors included."""
    fake.script(
        {"status": 401},
        {
            "status": 403,
            "body": {
                "error": {
                    "message": f"Key {KEY} may not use this model",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": None,
                }
            },
        },
        {"status": 500},
        {"status": 500},
        {"status": 500},
        {"cut_after_chunks": 2},
    )
    body: dict[str, Any] = {"model": "gpt-4o", "messages": MESSAGES}
    url = f"{fake.api_url}/v1/chat/completions"
    answers = [
        httpx.post(url, json=body, timeout=10),
        httpx.post(url, json=body, timeout=10),
        httpx.post(url, json=body, timeout=10),
        httpx.post(url, json={**body, "stream": True}, timeout=10),
        httpx.post(url, json={**body, "model": "gpt-unknown"}, timeout=10),
        httpx.get(f"{fake.api_url}/v1/models", timeout=10),
    ]
    assert [a.status_code for a in answers] == [502, 403, 502, 200, 404, 200]
    assert b"[redacted]" in answers[1].content
    for answer in answers:
        assert KEY not in answer.text
        assert all(KEY not in value for value in answer.headers.values())
    services = [s for s in fake.stack.services if s.name in ("api", "dispatcher")]
    logs = {s.name: s.log() for s in services}
    assert " DEBUG " in logs["dispatcher"]  # the strictest level really ran
    for name, text in logs.items():
        assert KEY not in text, f"the key leaked into the {name} log"
        assert KEY[-12:] not in text, f"part of the key leaked into the {name} log"
