"""The `dummy` model answers in the request's shape: `n` choices, cut at the token limit."""

from __future__ import annotations

import orjson
import pytest

from services.dispatcher.dummy import PLACEHOLDER, DummyAnswer, completion, stream_events


def request(**fields: object) -> bytes:
    return orjson.dumps(
        {"model": "dummy", "messages": [{"role": "user", "content": "hi"}]} | fields
    )


def test_the_plain_answer_is_the_placeholder() -> None:
    body = orjson.loads(completion("r1", "dummy", 1, DummyAnswer.for_request(request())))
    [choice] = body["choices"]
    assert (choice["message"]["content"], choice["finish_reason"]) == (PLACEHOLDER, "stop")
    assert body["usage"]["completion_tokens"] == 2


def test_n_choices_each_indexed_and_counted_in_usage() -> None:
    body = orjson.loads(completion("r1", "dummy", 1, DummyAnswer.for_request(request(n=3))))
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert {c["message"]["content"] for c in body["choices"]} == {PLACEHOLDER}
    assert body["usage"]["completion_tokens"] == 6


@pytest.mark.parametrize("limit", ["max_tokens", "max_completion_tokens"])
def test_a_token_limit_below_the_answer_stops_it_with_length(limit: str) -> None:
    answer = DummyAnswer.for_request(request(**{limit: 1}))
    body = orjson.loads(completion("r1", "dummy", 1, answer))
    [choice] = body["choices"]
    assert (choice["message"]["content"], choice["finish_reason"]) == ("Hello", "length")
    assert body["usage"]["completion_tokens"] == 1


@pytest.mark.parametrize(
    ("stop", "content"),
    [
        (["world"], "Hello "),  # OpenAI's own example of a stop sequence
        ("o w", "Hell"),
        (["xyz", "lo"], "Hel"),
        (["Hello"], ""),
        (["xyz"], PLACEHOLDER),  # not in the answer: no effect
    ],
)
def test_a_stop_sequence_ends_the_answer_before_it(stop: object, content: str) -> None:
    answer = DummyAnswer.for_request(request(stop=stop))
    body = orjson.loads(completion("r1", "dummy", 1, answer))
    [choice] = body["choices"]
    assert (choice["message"]["content"], choice["finish_reason"]) == (content, "stop")
    events = stream_events("r1", "dummy", 1, answer, include_usage=False)
    deltas = [orjson.loads(e[6:])["choices"][0]["delta"] for e in events]
    assert "".join(d.get("content", "") for d in deltas) == content


def test_a_token_limit_reached_before_a_stop_sequence_is_a_length_stop() -> None:
    answer = DummyAnswer.for_request(request(max_tokens=1, stop=["world"]))
    body = orjson.loads(completion("r1", "dummy", 1, answer))
    assert body["choices"][0]["finish_reason"] == "length"


def test_a_stream_of_n_choices_rebuilds_each_answer() -> None:
    events = stream_events(
        "r1", "dummy", 1, DummyAnswer.for_request(request(n=2, max_tokens=1)), include_usage=True
    )
    texts: dict[int, str] = {}
    finishes: dict[int, str] = {}
    for event in events[:-1]:
        [choice] = orjson.loads(event.removeprefix(b"data: "))["choices"]
        texts[choice["index"]] = texts.get(choice["index"], "") + choice["delta"].get("content", "")
        if choice["finish_reason"]:
            finishes[choice["index"]] = choice["finish_reason"]
    assert texts == {0: "Hello", 1: "Hello"} and finishes == {0: "length", 1: "length"}
    usage = orjson.loads(events[-1].removeprefix(b"data: "))
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 2


def test_a_whole_number_written_as_a_decimal_counts_as_that_integer() -> None:
    # The API accepts `2.0` as 2 and the cache key writes it as 2: one answer for both.
    def shape(**fields: object) -> tuple[int, tuple[str, ...], str]:
        answer = DummyAnswer.for_request(request(**fields))
        return answer.choices, answer.pieces, answer.finish_reason

    assert shape(n=2.0) == shape(n=2) == (2, ("Hello", " world"), "stop")
    assert shape(max_tokens=1.0) == shape(max_tokens=1) == (1, ("Hello",), "length")
    assert shape(n=2.5) == shape() == (1, ("Hello", " world"), "stop")


def test_the_prompt_count_follows_the_messages_not_the_rest_of_the_request() -> None:
    def prompt_tokens(body: bytes) -> int:
        return DummyAnswer.for_request(body).usage()["prompt_tokens"]

    plain = prompt_tokens(request())
    options = {"stream": True, "stream_options": {"include_usage": True}, "temperature": 0.5}
    assert prompt_tokens(request(**options)) == plain
    longer = [{"role": "user", "content": "hi " * 100}]
    assert prompt_tokens(request(messages=longer)) > plain + 50
