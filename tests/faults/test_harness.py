"""The ledger's judge catches what a duplicated reply looks like to a client (no broker needed).

One HTTP request gets one response, so a duplicate shows only inside it: a stream with a
repeated or reordered chunk, a JSON body that is not the model's answer. Each case feeds
`assert_ledger` such a response, as `send` records it, and checks it is flagged.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

import fakes.openai
import fakes.vllm
from fakes.cli import build_parser, config_from_args
from tests.faults.harness.load import Entry, Ledger, assert_ledger, classify_json, classify_stream
from tests.faults.harness.router import (
    LOCAL,
    MODEL,
    OPENAI_MODELS,
    Fake,
    FaultRouter,
    fake_answer,
)

ANSWERS = {"dummy": "Hello world"}
TIMEOUT = 10.0


@pytest.fixture(autouse=True)
def healthy_servers() -> Iterator[None]:
    """Replaces the suite's fixture that starts the RabbitMQ node and Redis: not needed here."""
    yield


def chunk(delta: dict[str, str], finish: str | None = None) -> bytes:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    payload = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": [choice]}
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def stream_of(*pieces: str) -> bytes:
    """A whole SSE body: role chunk, one chunk per piece, finish chunk, [DONE]."""
    contents = [chunk({"content": piece}) for piece in pieces]
    role, finish = chunk({"role": "assistant", "content": ""}), chunk({}, "stop")
    return role + b"".join(contents) + finish + b"data: [DONE]\n\n"


def completion_of(text: str) -> bytes:
    message = {"role": "assistant", "content": text}
    choice = {"index": 0, "message": message, "finish_reason": "stop"}
    return orjson.dumps({"id": "chatcmpl-1", "object": "chat.completion", "choices": [choice]})


def recorded(ledger: Ledger, *, stream: bool, body: bytes, model: str = "dummy") -> Entry:
    """An entry as `send` leaves it for a 200 with this body, answered in one second."""
    entry = ledger.new(model, stream, TIMEOUT)
    entry.sent, entry.accepted, entry.finished, entry.status = 100.0, 100.5, 101.0, 200
    if stream:
        classify_stream(entry, body)
    else:
        classify_json(entry, 200, body)
    return entry


def test_the_right_answers_pass() -> None:
    ledger = Ledger()
    recorded(ledger, stream=True, body=stream_of("Hello", " world"))
    recorded(ledger, stream=False, body=completion_of("Hello world"))
    assert_ledger(ledger, allowed_errors=(), answers=ANSWERS)


@pytest.mark.parametrize(
    "pieces",
    [("Hello", " world", " world"), ("Hello", "Hello", " world"), (" world", "Hello")],
    ids=["last-chunk-twice", "first-chunk-twice", "reordered"],
)
def test_a_repeated_or_reordered_content_chunk_is_flagged(pieces: tuple[str, ...]) -> None:
    ledger = Ledger()
    entry = recorded(ledger, stream=True, body=stream_of(*pieces))
    assert entry.outcome == "ok"  # one role and one finish chunk: only the text gives it away
    with pytest.raises(AssertionError, match="answered"):
        assert_ledger(ledger, allowed_errors=(), answers=ANSWERS)


def test_a_repeated_role_or_finish_chunk_is_flagged() -> None:
    role, finish = chunk({"role": "assistant", "content": ""}), chunk({}, "stop")
    twice = role + chunk({"content": "Hello world"}) + finish + role + finish
    ledger = Ledger()
    entry = recorded(ledger, stream=True, body=twice + b"data: [DONE]\n\n")
    assert entry.outcome == "bad"
    with pytest.raises(AssertionError, match="duplicated stream"):
        assert_ledger(ledger, allowed_errors=(), answers=ANSWERS)


def test_a_json_body_that_is_not_the_answer_is_flagged() -> None:
    ledger = Ledger()
    recorded(ledger, stream=False, body=completion_of("Hello worldHello world"))
    with pytest.raises(AssertionError, match="answered 'Hello worldHello world'"):
        assert_ledger(ledger, allowed_errors=(), answers=ANSWERS)


def test_a_router_checks_the_answers_of_its_fakes(tmp_path: Path) -> None:
    """`FaultRouter.check` judges `dummy` and each model by what the router's fakes answer."""
    stack = SimpleNamespace(services=[])  # no process: the check only reads their logs
    router = FaultRouter(stack, tmp_path, rabbit=None)  # type: ignore[arg-type]
    router.fakes.append(Fake(service=None, url="", answer="Hello world The"))  # type: ignore[arg-type]
    assert router.answers() == {"dummy": "Hello world", LOCAL: "Hello world The"}
    ledger = Ledger()
    recorded(ledger, stream=True, body=stream_of("Hello", " world", " The"), model=LOCAL)
    router.check(ledger, allowed_errors=())
    recorded(ledger, stream=True, body=stream_of("Hello", " world", " world"), model=LOCAL)
    with pytest.raises(AssertionError, match="answered 'Hello world world'"):
        router.check(ledger, allowed_errors=())


def test_a_model_without_a_known_answer_is_not_judged_by_its_text() -> None:
    ledger = Ledger()
    recorded(ledger, stream=False, body=completion_of("anything"), model=LOCAL)
    assert_ledger(ledger, allowed_errors=(), answers=ANSWERS)


@pytest.mark.parametrize(
    "flags", [[], ["--latency", "0.1", "--tokens", "8"], ["--reply", "fixed text"]]
)
@pytest.mark.parametrize("flavour", ["vllm", "openai"])
async def test_fake_answer_is_what_the_fake_serves(flags: list[str], flavour: str) -> None:
    models = MODEL if flavour == "vllm" else OPENAI_MODELS
    config = config_from_args(build_parser("fake", port=0, models=models).parse_args(flags))
    config.api_key = None  # the OpenAI flavour's key check is not what this is about
    app = (fakes.vllm if flavour == "vllm" else fakes.openai).create_app(config)
    body = {"model": config.models[0], "messages": [{"role": "user", "content": "hi"}]}
    async with TestClient(TestServer(app)) as client:
        response = await client.post("/v1/chat/completions", json=body)
        served = (await response.json())["choices"][0]["message"]["content"]
    assert served == fake_answer(flags, models=models)


def test_an_echoing_fake_has_no_one_answer() -> None:
    assert fake_answer(["--echo"]) is None
