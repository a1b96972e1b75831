"""The fake upstreams, driven by the official OpenAI SDK and by raw HTTP.

Each test starts the fake in-process on a free port. The SDK runs with
`_strict_response_validation=True` so any shape drift fails here, not in the
router's tests.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import openai
import pytest

from fakes import FakeConfig, running
from fakes import openai as fake_openai
from fakes import vllm as fake_vllm
from fakes.core import fake_arguments, reply_tokens, split_tokens
from fakes.faults import FaultStep
from fakes.openai import snapshot_of
from fakes.testing import FakeControl, sse_payloads

API_KEY = "sk-test-key-0123456789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MESSAGES: list[Any] = [{"role": "user", "content": "Say hello"}]
DEFAULT_TEXT = "Hello world The quick brown fox jumps over the lazy dog. The quick brown fox"
WEATHER_TOOL: Any = {
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

pytestmark = pytest.mark.timeout(10)


@dataclass
class Fake:
    """One running fake plus clients pointed at it."""

    flavour: str
    url: str
    model: str
    client: openai.AsyncOpenAI
    http: aiohttp.ClientSession  # sends AUTH on every request
    control: FakeControl

    async def raw_chat(
        self, body: Any, headers: dict[str, str] | None = None
    ) -> tuple[int, Any, bytes]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        all_headers = {"Content-Type": "application/json", **(headers or {})}
        url = f"{self.url}/v1/chat/completions"
        async with self.http.post(url, data=data, headers=all_headers) as resp:
            return resp.status, resp.headers, await resp.read()


def sdk_client(url: str, api_key: str = API_KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"{url}/v1",
        api_key=api_key,
        max_retries=0,
        timeout=5.0,
        _strict_response_validation=True,
    )


@contextlib.asynccontextmanager
async def started(flavour: str) -> AsyncIterator[Fake]:
    """Run one fake in-process on a free port for the duration of a test."""
    if flavour == "vllm":
        model = "mistral-7b-instruct"
        app = fake_vllm.create_app(FakeConfig(models=[model]))
    else:
        model = "gpt-4o-mini"
        app = fake_openai.create_app(FakeConfig(models=[model, "gpt-4o"], api_key=API_KEY))
    async with running(app) as url, aiohttp.ClientSession(headers=AUTH) as http:
        client = sdk_client(url)
        try:
            yield Fake(flavour, url, model, client, http, FakeControl(url, http))
        finally:
            await client.close()


@pytest.fixture(params=["vllm", "openai"])
async def fake(request: pytest.FixtureRequest) -> AsyncIterator[Fake]:
    async with started(request.param) as running_fake:
        yield running_fake


@pytest.fixture
async def vllm_fake() -> AsyncIterator[Fake]:
    async with started("vllm") as running_fake:
        yield running_fake


@pytest.fixture
async def openai_fake() -> AsyncIterator[Fake]:
    async with started("openai") as running_fake:
        yield running_fake


# --- pure engine -------------------------------------------------------------


def test_reply_tokens_are_deterministic_and_rejoin() -> None:
    assert "".join(reply_tokens(FakeConfig())) == DEFAULT_TEXT
    assert reply_tokens(FakeConfig(tokens=3)) == ["Hello", " world", " The"]
    config = FakeConfig(reply="Bonjour  tout le monde ")
    assert "".join(reply_tokens(config)) == "Bonjour  tout le monde "
    assert reply_tokens(config, 6) == ["Bonjour", "  tout", " le", " monde", " ", "Bonjour"]
    assert split_tokens("") == []


def test_fake_arguments_fill_required_properties() -> None:
    schema = WEATHER_TOOL["function"]["parameters"]
    assert fake_arguments(schema) == {"city": "fake", "days": 1}
    assert fake_arguments({"type": "object", "properties": {"x": {"type": "string"}}}) == {}
    assert fake_arguments(None) == {}


def test_fault_step_parsing() -> None:
    assert FaultStep.parse({"ok": True}) == FaultStep()
    step = FaultStep.parse({"status": 429, "headers": {"retry-after": "1"}, "delay": 0.5})
    assert (step.status, step.headers, step.delay) == (429, {"retry-after": "1"}, 0.5)
    for bad in ({"status": 42}, {"delay": -1}, {"cut_after_chunks": "3"}, {"oops": 1}, [1]):
        with pytest.raises(ValueError):
            FaultStep.parse(bad)


# --- chat completions through the SDK ---------------------------------------


async def test_json_completion(fake: Fake) -> None:
    result = await fake.client.chat.completions.create(model=fake.model, messages=MESSAGES)
    assert result.id.startswith("chatcmpl-")
    # OpenAI names the snapshot an alias resolved to; vLLM echoes the name asked for.
    assert result.model == (snapshot_of(fake.model) if fake.flavour == "openai" else fake.model)
    [choice] = result.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == DEFAULT_TEXT
    assert choice.finish_reason == "stop"
    assert result.usage is not None
    assert result.usage.completion_tokens == 16
    assert result.usage.total_tokens == result.usage.prompt_tokens + 16
    stats = await fake.control.stats()
    assert (stats["requests"], stats["completed"], stats["in_flight"]) == (1, 1, 0)
    assert stats["bodies"] == [{"model": fake.model, "messages": MESSAGES}]
    assert stats["auth"] == [f"Bearer {API_KEY}"]


async def test_max_tokens_cuts_with_length(fake: Fake) -> None:
    short = await fake.client.chat.completions.create(
        model=fake.model, messages=MESSAGES, max_tokens=5
    )
    assert short.choices[0].message.content == "Hello world The quick brown"
    assert short.choices[0].finish_reason == "length"
    assert short.usage is not None and short.usage.completion_tokens == 5
    roomy = await fake.client.chat.completions.create(
        model=fake.model, messages=MESSAGES, max_completion_tokens=100, max_tokens=1
    )
    assert roomy.choices[0].finish_reason == "stop"  # max_completion_tokens wins


async def test_stream_chunks_join_to_the_reply(fake: Fake) -> None:
    stream = await fake.client.chat.completions.create(
        model=fake.model, messages=MESSAGES, stream=True
    )
    chunks = [chunk async for chunk in stream]
    assert len({(c.id, c.created, c.model) for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""  # both upstreams open with ""
    assert all(c.choices[0].delta.role is None for c in chunks[1:])
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == DEFAULT_TEXT
    finishes = [c.choices[0].finish_reason for c in chunks]
    assert finishes[-1] == "stop" and finishes.count("stop") == 1
    assert all(c.usage is None for c in chunks)


async def test_stream_include_usage(fake: Fake) -> None:
    stream = await fake.client.chat.completions.create(
        model=fake.model,
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
        max_tokens=4,
    )
    chunks = [chunk async for chunk in stream]
    *body, last = chunks
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens == 4
    assert last.usage.total_tokens == last.usage.prompt_tokens + 4
    assert all(c.usage is None and len(c.choices) == 1 for c in body)
    assert body[-1].choices[0].finish_reason == "length"


async def test_tool_call_streamed_deltas_join(fake: Fake) -> None:
    stream = await fake.client.chat.completions.create(
        model=fake.model, messages=MESSAGES, tools=[WEATHER_TOOL], stream=True
    )
    calls: dict[int, dict[str, str]] = {}
    finish = None
    async for chunk in stream:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
                if delta.id:
                    assert not call["id"], "the id comes once, in the first delta"
                    call["id"] = delta.id
                if delta.function and delta.function.name:
                    call["name"] += delta.function.name
                if delta.function and delta.function.arguments:
                    call["arguments"] += delta.function.arguments
    assert finish == "tool_calls"
    [call] = calls.values()
    assert call["id"].startswith("chatcmpl-tool-" if fake.flavour == "vllm" else "call_")
    assert call["name"] == "get_weather"
    assert json.loads(call["arguments"]) == {"city": "fake", "days": 1}


async def test_tool_call_json_and_tool_choice_none(fake: Fake) -> None:
    result = await fake.client.chat.completions.create(
        model=fake.model, messages=MESSAGES, tools=[WEATHER_TOOL]
    )
    [choice] = result.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls or []
    assert call.type == "function"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "fake", "days": 1}
    plain = await fake.client.chat.completions.create(
        model=fake.model, messages=MESSAGES, tools=[WEATHER_TOOL], tool_choice="none"
    )
    assert plain.choices[0].message.tool_calls is None or plain.choices[0].message.tool_calls == []
    assert plain.choices[0].message.content == DEFAULT_TEXT


async def test_n_choices_json_and_stream(fake: Fake) -> None:
    result = await fake.client.chat.completions.create(
        model=fake.model, messages=MESSAGES, n=2, max_tokens=3
    )
    assert [c.index for c in result.choices] == [0, 1]
    assert {c.message.content for c in result.choices} == {"Hello world The"}
    assert result.usage is not None and result.usage.completion_tokens == 6
    stream = await fake.client.chat.completions.create(
        model=fake.model, messages=MESSAGES, n=2, max_tokens=3, stream=True
    )
    texts = {0: "", 1: ""}
    finishes: dict[int, str] = {}
    async for chunk in stream:
        [choice] = chunk.choices  # one choice per chunk, told apart by index
        texts[choice.index] += choice.delta.content or ""
        if choice.finish_reason:
            finishes[choice.index] = choice.finish_reason
    assert texts == {0: "Hello world The", 1: "Hello world The"}
    assert finishes == {0: "length", 1: "length"}


# --- scripted faults ----------------------------------------------------------


async def test_rate_limit_step_reaches_sdk_with_headers(fake: Fake) -> None:
    limit_headers = {
        "retry-after": "1",
        "retry-after-ms": "1000",
        "x-ratelimit-remaining-requests": "0",
    }
    await fake.control.script({"status": 429, "headers": limit_headers})
    with pytest.raises(openai.RateLimitError) as caught:
        await fake.client.chat.completions.create(model=fake.model, messages=MESSAGES)
    error = caught.value
    assert error.status_code == 429
    for name, value in limit_headers.items():
        assert error.response.headers[name] == value
    assert isinstance(error.body, dict)
    if fake.flavour == "openai":
        assert error.code == "rate_limit_exceeded"
        assert error.type == "requests"
    else:
        assert error.body["code"] == 429
    ok = await fake.client.chat.completions.create(model=fake.model, messages=MESSAGES)
    assert ok.choices[0].message.content == DEFAULT_TEXT  # the script was consumed


async def test_server_error_then_ok(fake: Fake) -> None:
    await fake.control.script({"status": 500}, {"ok": True})
    with pytest.raises(openai.InternalServerError) as caught:
        await fake.client.chat.completions.create(model=fake.model, messages=MESSAGES)
    expected_type = "server_error" if fake.flavour == "openai" else "InternalServerError"
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["type"] == expected_type
    ok = await fake.client.chat.completions.create(model=fake.model, messages=MESSAGES)
    assert ok.choices[0].finish_reason == "stop"
    stats = await fake.control.stats()
    assert (stats["requests"], stats["completed"]) == (2, 2)
    assert len(stats["bodies"]) == 2  # recorded even when the fault answered


async def test_stream_cut_raises_connection_error_without_done(fake: Fake) -> None:
    await fake.control.script({"cut_after_chunks": 3})
    stream = await fake.client.chat.completions.create(
        model=fake.model, messages=MESSAGES, stream=True
    )
    received = []
    with pytest.raises(openai.APIConnectionError):
        async for chunk in stream:
            received.append(chunk)
    # The role chunk and two tokens arrive, then the connection drops.
    assert "".join(c.choices[0].delta.content or "" for c in received) == "Hello world"
    assert len(received) == 3
    stats = await fake.control.stats()
    assert (stats["cut"], stats["completed"], stats["aborted"]) == (1, 0, 0)


async def test_a_stream_failing_mid_generation_ends_as_its_server_ends_it(fake: Fake) -> None:
    """vLLM: an error event (400, BadRequestError), then `[DONE]`; OpenAI: an error event,
    and the stream's end. The SDK raises the server's message either way."""
    await fake.control.script({"error_after_chunks": 3, "body": "CUDA error: out of memory"})
    status, _, raw = await fake.raw_chat(
        {"model": fake.model, "messages": MESSAGES, "stream": True}
    )
    assert status == 200
    events = raw.decode().split("\n\n")
    assert events[-1] == ""
    tail = events[3:-1]
    error = json.loads(tail[0].removeprefix("data: "))["error"]
    assert error["message"] == "CUDA error: out of memory"
    if fake.flavour == "vllm":
        assert (error["type"], error["code"], tail[1:]) == (
            "BadRequestError",
            400,
            ["data: [DONE]"],
        )
    else:
        assert (error["type"], error["code"], tail[1:]) == ("server_error", None, [])
    await fake.control.script({"error_after_chunks": 1})
    stream = await fake.client.chat.completions.create(
        model=fake.model, messages=MESSAGES, stream=True
    )
    with pytest.raises(openai.APIError, match="The engine failed while generating"):
        async for _ in stream:
            pass


async def test_json_cut_closes_without_response(fake: Fake) -> None:
    await fake.control.script({"cut_after_chunks": 0})
    with pytest.raises(openai.APIConnectionError):
        await fake.client.chat.completions.create(model=fake.model, messages=MESSAGES)
    stats = await fake.control.stats()
    assert (stats["cut"], stats["completed"], stats["aborted"]) == (1, 0, 0)


async def test_delay_step_slows_the_first_byte(fake: Fake) -> None:
    await fake.control.script({"delay": 0.3})
    start = time.monotonic()
    await fake.client.chat.completions.create(model=fake.model, messages=MESSAGES)
    assert time.monotonic() - start >= 0.3


async def test_script_rejects_bad_steps_and_reset_clears(fake: Fake) -> None:
    with pytest.raises(ValueError, match="status"):
        await fake.control.script({"status": "x"})
    assert await fake.control.script({"status": 500}, {"status": 502}) == 2
    await fake.control.reset()
    ok = await fake.client.chat.completions.create(model=fake.model, messages=MESSAGES)
    assert ok.choices[0].finish_reason == "stop"
    stats = await fake.control.stats()
    assert stats["requests"] == 1


# --- aborts and pacing ------------------------------------------------------------


async def test_abort_of_slow_stream_is_recorded(fake: Fake) -> None:
    stream = await fake.client.chat.completions.create(
        model=fake.model,
        messages=MESSAGES,
        stream=True,
        extra_headers={"x-fake-tokens": "100", "x-fake-token-rate": "10"},
    )
    first = await stream.__anext__()
    second = await stream.__anext__()
    assert second.id == first.id
    await stream.close()
    # 100 tokens at 10 a second take 10 s: seen aborted before then, it was the client's leaving.
    stats = await fake.control.wait_for(lambda st: st["aborted"] > 0, timeout=5)
    assert stats["aborted"] == 1
    assert stats["aborted_ids"] == [first.id]
    assert stats["in_flight"] == 0 and stats["completed"] == 0


async def test_abort_while_waiting_for_first_byte(fake: Fake) -> None:
    with pytest.raises(openai.APITimeoutError):
        await fake.client.chat.completions.create(
            model=fake.model,
            messages=MESSAGES,
            timeout=0.2,
            extra_headers={"x-fake-latency": "30"},
        )
    # The first byte is 30 s away: an abort seen before then was noticed while waiting for it.
    stats = await fake.control.wait_for(lambda st: st["aborted"] > 0, timeout=10)
    assert stats["aborted"] == 1
    assert stats["in_flight"] == 0 and stats["completed"] == 0


async def test_header_overrides_pace_one_request(fake: Fake) -> None:
    start = time.monotonic()
    stream = await fake.client.chat.completions.create(
        model=fake.model,
        messages=MESSAGES,
        stream=True,
        extra_headers={"x-fake-tokens": "5", "x-fake-token-rate": "20", "x-fake-latency": "0.1"},
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    elapsed = time.monotonic() - start
    assert text == "Hello world The quick brown"
    assert elapsed >= 0.3  # paced: 0.1 s latency + 4 gaps of 50 ms (the defaults send at once)
    status, _, body = await fake.raw_chat(
        {"model": fake.model, "messages": MESSAGES}, {"x-fake-tokens": "nope"}
    )
    assert status == 400 and b"x-fake-tokens" in body


# --- raw wire format ------------------------------------------------------------


async def test_raw_sse_framing(fake: Fake) -> None:
    body = {"model": fake.model, "messages": MESSAGES, "stream": True, "max_tokens": 3}
    status, headers, raw = await fake.raw_chat(body)
    assert status == 200
    assert headers["Content-Type"] == "text/event-stream; charset=utf-8"
    payloads = sse_payloads(raw)
    assert raw.endswith(b"\n\ndata: [DONE]\n\n")
    assert payloads[-1] == b"[DONE]" and payloads.count(b"[DONE]") == 1
    chunks = [json.loads(p) for p in payloads[:-1]]
    for payload, chunk in zip(payloads, chunks, strict=False):
        compact = json.dumps(chunk, separators=(",", ":"), ensure_ascii=False).encode()
        assert payload == compact  # compact JSON, key order as sent
        assert chunk["object"] == "chat.completion.chunk"
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    if fake.flavour == "openai":
        assert chunks[0]["choices"][0]["delta"] == {
            "role": "assistant",
            "content": "",
            "refusal": None,
        }
        assert chunks[-1]["choices"][0]["delta"] == {}  # finish_reason in its own chunk
        assert all("obfuscation" in c and "system_fingerprint" in c for c in chunks)
        assert all("usage" not in c for c in chunks)
    else:
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert chunks[-1]["choices"][0]["delta"] == {"content": " The"}
        assert all("usage" not in c for c in chunks)


@pytest.mark.parametrize("options", [{}, {"include_usage": None}, {"include_usage": False}])
async def test_stream_options_without_include_usage_as_each_server_reads_them(
    fake: Fake, options: dict[str, object]
) -> None:
    """vLLM's `StreamOptions` defaults `include_usage` to true, so `{}` brings the usage
    chunk; OpenAI's to false. An explicit null or false asks for none from either."""
    body = {"model": fake.model, "messages": MESSAGES, "stream": True, "stream_options": options}
    status, _, raw = await fake.raw_chat(body)
    chunks = [json.loads(p) for p in sse_payloads(raw)[:-1]]
    assert status == 200
    usage_chunks = [c for c in chunks if c["choices"] == []]
    expected = 1 if fake.flavour == "vllm" and options == {} else 0
    assert len(usage_chunks) == expected


async def test_openai_raw_usage_chunks_and_obfuscation_opt_out(openai_fake: Fake) -> None:
    fake = openai_fake
    options = {"include_usage": True, "include_obfuscation": False}
    body = {"model": fake.model, "messages": MESSAGES, "stream": True, "stream_options": options}
    _, _, raw = await fake.raw_chat(body)
    chunks = [json.loads(p) for p in sse_payloads(raw)[:-1]]
    assert all("obfuscation" not in c for c in chunks)
    assert all(c["usage"] is None for c in chunks[:-1])  # explicit null, as OpenAI sends
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 16
    assert set(chunks[-1]["usage"]) >= {"prompt_tokens_details", "completion_tokens_details"}


async def test_openai_json_shape_and_headers(openai_fake: Fake) -> None:
    fake = openai_fake
    status, headers, raw = await fake.raw_chat({"model": fake.model, "messages": MESSAGES})
    assert status == 200
    assert raw.startswith(b'{\n  "id": "chatcmpl-')  # pretty-printed like the real API
    body = json.loads(raw)
    assert re.fullmatch(r"chatcmpl-[A-Za-z0-9]{29}", body["id"])
    assert body["service_tier"] == "default"
    assert body["system_fingerprint"].startswith("fp_")
    message = body["choices"][0]["message"]
    assert message["refusal"] is None and message["annotations"] == []
    assert re.fullmatch(r"req_[0-9a-f]{32}", headers["x-request-id"])
    assert int(headers["openai-processing-ms"]) >= 0
    assert headers["x-ratelimit-remaining-requests"] == "9999"


async def test_vllm_json_shape_and_request_id(vllm_fake: Fake) -> None:
    fake = vllm_fake
    _, _, raw = await fake.raw_chat({"messages": MESSAGES})  # model is optional on vLLM
    body = json.loads(raw)
    assert re.fullmatch(r"chatcmpl-[0-9a-f]{32}", body["id"])
    assert body["model"] == "mistral-7b-instruct"
    for key in ("prompt_logprobs", "prompt_token_ids", "kv_transfer_params", "system_fingerprint"):
        assert key in body and body[key] is None
    assert body["choices"][0]["stop_reason"] is None
    _, _, raw = await fake.raw_chat({"messages": MESSAGES}, {"X-Request-Id": "req-42"})
    assert json.loads(raw)["id"] == "chatcmpl-req-42"


# --- errors, auth, models ------------------------------------------------------


async def test_unknown_model_is_404_in_flavour_shape(fake: Fake) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await fake.client.chat.completions.create(model="nope", messages=MESSAGES)
    body = caught.value.body
    assert isinstance(body, dict)
    if fake.flavour == "openai":
        assert body == {
            "message": "The model `nope` does not exist or you do not have access to it.",
            "type": "invalid_request_error",
            "param": None,
            "code": "model_not_found",
        }
    else:
        assert body == {
            "message": "The model `nope` does not exist.",
            "type": "NotFoundError",
            "param": "model",
            "code": 404,
        }


async def test_malformed_json_and_missing_messages_are_400(fake: Fake) -> None:
    for request in (b"{not json", {"model": fake.model}):
        status, headers, raw = await fake.raw_chat(request)
        assert status == 400
        assert headers["Content-Type"] == "application/json"
        error = json.loads(raw)["error"]
        assert set(error) == {"message", "type", "param", "code"}
    with pytest.raises(openai.BadRequestError):
        await fake.client.chat.completions.create(model=fake.model, messages=[])


async def test_a_whole_decimal_is_an_integer_and_a_fraction_is_refused(fake: Fake) -> None:
    """Both servers read `2.0` as 2 (vLLM through pydantic's lax int), and refuse `2.5`."""
    status, _, raw = await fake.raw_chat({"model": fake.model, "messages": MESSAGES, "n": 2.0})
    assert status == 200, raw
    assert [choice["index"] for choice in json.loads(raw)["choices"]] == [0, 1]
    status, _, raw = await fake.raw_chat({"model": fake.model, "messages": MESSAGES, "n": 2.5})
    assert status == 400
    assert json.loads(raw)["error"]["param"] == "n"


async def test_stream_options_without_stream(fake: Fake) -> None:
    """OpenAI refuses any `stream_options` without `stream`; vLLM only a truthy one."""
    body = {"model": fake.model, "messages": MESSAGES, "stream_options": {}}
    status, _, raw = await fake.raw_chat(body)
    assert status == (200 if fake.flavour == "vllm" else 400), raw
    status, _, raw = await fake.raw_chat({**body, "stream_options": {"include_usage": True}})
    assert status == 400
    error = json.loads(raw)["error"]
    if fake.flavour == "openai":
        assert error == {
            "message": "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            "type": "invalid_request_error",
            "param": "stream_options",
            "code": "invalid_value",
        }
    else:
        assert error == {
            "message": "Stream options can only be defined when `stream=True`.",
            "type": "BadRequestError",
            "param": "stream_options",
            "code": 400,
        }


async def test_openai_requires_the_bearer_key(openai_fake: Fake) -> None:
    bad = sdk_client(openai_fake.url, "sk-wrong-key-000000000")
    try:
        with pytest.raises(openai.AuthenticationError) as caught:
            await bad.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    finally:
        await bad.close()
    assert caught.value.code == "invalid_api_key"
    assert "sk-wrong-key-000000000" not in str(caught.value)  # the key is masked
    url = f"{openai_fake.url}/v1/chat/completions"
    async with aiohttp.ClientSession() as anonymous, anonymous.post(url, json={}) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"]["code"] is None  # no key at all
    stats = await openai_fake.control.stats()
    assert stats["auth"] == ["Bearer sk-wrong-key-000000000", None]


async def test_models_list(fake: Fake) -> None:
    models = await fake.client.models.list()
    ids = [m.id for m in models.data]
    async with fake.http.get(f"{fake.url}/v1/models") as resp:
        raw = await resp.json()
    if fake.flavour == "openai":
        assert ids == ["gpt-4o-mini", "gpt-4o"]
        assert set(raw["data"][0]) == {"id", "object", "created", "owned_by"}
    else:
        assert ids == ["mistral-7b-instruct"]
        card = raw["data"][0]
        assert card["owned_by"] == "vllm" and card["root"] == "mistral-7b-instruct"
        assert (
            card["max_model_len"] == 32768 and card["permission"][0]["object"] == "model_permission"
        )


async def test_vllm_health_is_empty_200(vllm_fake: Fake) -> None:
    async with vllm_fake.http.get(f"{vllm_fake.url}/health") as resp:
        assert resp.status == 200
        assert await resp.read() == b""


async def test_vllm_refuses_what_does_not_fit_its_context_as_vllm_does(vllm_fake: Fake) -> None:
    """`max_model_len` (32768 here) bounds the prompt and the tokens asked for: vLLM's most
    common 400 in production, in its words and shape."""
    status, _, raw = await vllm_fake.raw_chat(
        {"model": vllm_fake.model, "messages": MESSAGES, "max_tokens": 40_000}
    )
    assert status == 400
    assert json.loads(raw) == {
        "error": {
            "message": "'max_tokens' or 'max_completion_tokens' is too large: 40000. This "
            "model's maximum context length is 32768 tokens and your request has 8 input "
            "tokens (40000 > 32768 - 8). None",
            "type": "BadRequestError",
            "param": None,
            "code": 400,
        }
    }
    long_prompt = [{"role": "user", "content": "word " * 40_000}]
    with pytest.raises(openai.BadRequestError, match="However, your request has 40007 input"):
        await vllm_fake.client.chat.completions.create(model=vllm_fake.model, messages=long_prompt)
    answer = await vllm_fake.client.chat.completions.create(
        model=vllm_fake.model, messages=MESSAGES, max_tokens=32_760
    )
    assert answer.choices[0].message.content


async def test_logprobs_asked_for_come_with_each_token(fake: Fake) -> None:
    """Both servers give each content token its logprob, bytes and `top_logprobs`
    alternatives, in the answer and in each stream chunk; the strict SDK reads them."""
    answer = await fake.client.chat.completions.create(
        model=fake.model, messages=MESSAGES, logprobs=True, top_logprobs=2
    )
    [choice] = answer.choices
    assert choice.logprobs is not None and choice.logprobs.content is not None
    tokens = choice.logprobs.content
    assert "".join(t.token for t in tokens) == choice.message.content
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].token == t.token for t in tokens)
    assert all(t.bytes == list(t.token.encode()) for t in tokens)
    stream = await fake.client.chat.completions.create(
        model=fake.model, messages=MESSAGES, logprobs=True, stream=True
    )
    streamed = [
        entry.token
        async for chunk in stream
        for c in chunk.choices
        if c.logprobs is not None and c.logprobs.content
        for entry in c.logprobs.content
    ]
    assert "".join(streamed) == choice.message.content
    plain = await fake.client.chat.completions.create(model=fake.model, messages=MESSAGES)
    assert plain.choices[0].logprobs is None


async def test_openai_refuses_a_field_it_does_not_know_and_vllm_takes_it(fake: Fake) -> None:
    body = {"model": fake.model, "messages": MESSAGES, "top_k": 5}
    status, _, raw = await fake.raw_chat(body)
    if fake.flavour == "vllm":
        assert status == 200
        return
    assert status == 400
    assert json.loads(raw) == {
        "error": {
            "message": "Unrecognized request argument supplied: top_k",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
    }


async def test_an_error_after_more_chunks_than_the_stream_has_still_ends_it(fake: Fake) -> None:
    await fake.control.script({"error_after_chunks": 500})
    status, _, raw = await fake.raw_chat(
        {"model": fake.model, "messages": MESSAGES, "stream": True}
    )
    events = raw.decode().split("\n\n")[:-1]
    assert status == 200 and events.count("data: [DONE]") == (1 if fake.flavour == "vllm" else 0)
    error_at = next(i for i, e in enumerate(events) if e.startswith('data: {"error"'))
    assert all("[DONE]" not in e for e in events[:error_at])
    with pytest.raises(ValueError, match="two ways"):
        FaultStep.parse({"error_after_chunks": 1, "cut_after_chunks": 2})


async def test_vllm_generates_no_further_than_its_context_by_default() -> None:
    """Without `max_tokens` vLLM asks for what the context has room for: past it, `length`."""
    async with running(fake_vllm.create_app(FakeConfig(max_model_len=40))) as url:
        client = sdk_client(url)
        try:
            answer = await client.chat.completions.create(
                model="mistral-7b-instruct", messages=[{"role": "user", "content": "w " * 30}]
            )
        finally:
            await client.close()
    assert answer.usage is not None and answer.usage.total_tokens == 40
    assert answer.choices[0].finish_reason == "length"


async def test_top_logprobs_without_logprobs_is_a_400(fake: Fake) -> None:
    status, _, raw = await fake.raw_chat(
        {"model": fake.model, "messages": MESSAGES, "top_logprobs": 3}
    )
    assert status == 400
    assert json.loads(raw)["error"]["param"] == "top_logprobs"


@pytest.mark.parametrize("fake", ["fake-vllm", "fake-openai"])
def test_a_fake_on_a_port_in_use_says_so_in_one_line(fake: str) -> None:
    """It died with aiohttp's OSError traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "services.cli", fake, "--port", str(port)],
            check=False,
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert done.returncode == 1, done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith(f"{fake}: cannot listen on 127.0.0.1:{port}: ")
    assert line.endswith("(choose another --port)")
