"""What may be stored, and how a stored completion is served: JSON, and SSE the SDK accepts."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from services.dispatcher.cache_replay import (
    MAX_ENTRY_BYTES,
    EntryError,
    NotReplayableError,
    hit_body,
    hit_payload,
    is_storable,
    replay_events,
)


def completion(*choices: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-first",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": "local_m",
        "choices": list(choices)
        or [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello there"},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
        **extra,
    }


TOOL_CHOICE = {
    "index": 0,
    "message": {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            },
            {
                "id": "call_2",
                "type": "function",
                "function": {"name": "get_time", "arguments": "{}"},
            },
        ],
    },
    "logprobs": None,
    "finish_reason": "tool_calls",
}


def raw(data: dict[str, Any]) -> bytes:
    return orjson.dumps(data)


def payloads(events: list[bytes]) -> list[dict[str, Any]]:
    out = []
    for event in events:
        assert event.startswith(b"data: ") and event.endswith(b"\n\n")
        assert b"\n" not in event[:-2]
        out.append(orjson.loads(event[len(b"data: ") : -2]))
    return out


def accumulate(events: list[bytes]) -> ChatCompletion:
    """What the official SDK makes of the stream (strict types, its own accumulator)."""
    state: ChatCompletionStreamState[None] = ChatCompletionStreamState()
    for payload in payloads(events):
        state.handle_chunk(ChatCompletionChunk.model_validate(payload, strict=False))
    return state.get_final_completion()


# --- what is stored ----------------------------------------------------------------------------


def test_a_complete_answer_is_storable() -> None:
    assert is_storable(raw(completion()))
    assert is_storable(raw(completion(TOOL_CHOICE)))


@pytest.mark.parametrize(
    "body",
    [
        raw(completion({"index": 0, "message": {"content": "Hel"}, "finish_reason": "length"})),
        raw(
            completion({"index": 0, "message": {"content": ""}, "finish_reason": "content_filter"})
        ),
        raw(completion({"index": 0, "message": {"content": "x"}, "finish_reason": None})),
        raw({"error": {"message": "boom", "type": "server_error", "param": None, "code": None}}),
        raw({**completion(), "object": "chat.completion.chunk"}),
        raw({**completion(), "choices": []}),
        b"not json",
        b"",
    ],
    ids=["length", "content_filter", "unfinished", "error", "chunk", "no-choices", "junk", "empty"],
)
def test_errors_and_incomplete_answers_are_not_storable(body: bytes) -> None:
    assert not is_storable(body)


def test_one_truncated_choice_makes_the_answer_unstorable() -> None:
    ok = {"index": 0, "message": {"content": "a"}, "finish_reason": "stop"}
    cut = {"index": 1, "message": {"content": "b"}, "finish_reason": "length"}
    assert not is_storable(raw(completion(ok, cut)))


def test_a_huge_answer_is_not_stored() -> None:
    text = "x" * MAX_ENTRY_BYTES
    choice = {"index": 0, "message": {"content": text}, "finish_reason": "stop"}
    assert not is_storable(raw(completion(choice)))


# --- serving a hit as JSON ---------------------------------------------------------------------


def test_a_json_hit_is_the_stored_answer_under_the_new_request_id() -> None:
    stored = completion(system_fingerprint="fp_1")
    served = orjson.loads(hit_body(raw(stored), "req2"))
    assert served["id"] == "chatcmpl-req2"
    assert {**served, "id": stored["id"]} == stored
    ChatCompletion.model_validate(served)


def test_a_bad_entry_raises_entry_error() -> None:
    with pytest.raises(EntryError):
        hit_body(b"{}", "r")
    with pytest.raises(EntryError):
        replay_events(b"[]", "r", include_usage=False)


# --- serving a hit as SSE ----------------------------------------------------------------------


def test_replay_is_role_content_finish_with_one_id() -> None:
    events = replay_events(raw(completion()), "req2", include_usage=False)
    chunks = payloads(events)
    assert [c["choices"][0]["delta"] for c in chunks] == [
        {"role": "assistant", "content": ""},
        {"content": "Hello there"},
        {},
    ]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, "stop"]
    assert {c["id"] for c in chunks} == {"chatcmpl-req2"}
    assert {c["created"] for c in chunks} == {1_700_000_000}
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert all("usage" not in c for c in chunks)
    final = accumulate(events)
    assert final.choices[0].message.content == "Hello there"
    assert final.choices[0].finish_reason == "stop"


def test_replay_with_include_usage_ends_with_the_usage_chunk() -> None:
    chunks = payloads(replay_events(raw(completion()), "r", include_usage=True))
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}


def test_replay_carries_tool_calls_the_sdk_reassembles() -> None:
    events = replay_events(raw(completion(TOOL_CHOICE)), "r", include_usage=False)
    first = payloads(events)[0]["choices"][0]["delta"]
    assert first == {"role": "assistant", "content": None}
    final = accumulate(events)
    calls = final.choices[0].message.tool_calls
    assert calls is not None
    assert [(c.id, c.function.name, c.function.arguments) for c in calls] == [  # type: ignore[union-attr]
        ("call_1", "get_weather", '{"city": "Paris"}'),
        ("call_2", "get_time", "{}"),
    ]
    assert final.choices[0].finish_reason == "tool_calls"


def test_replay_of_several_choices_and_fingerprint() -> None:
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": f"answer {i}"},
            "finish_reason": "stop",
        }
        for i in range(2)
    ]
    events = replay_events(
        raw(completion(*choices, system_fingerprint="fp_9")), "r", include_usage=True
    )
    assert all(c["system_fingerprint"] == "fp_9" for c in payloads(events))
    final = accumulate(events)
    assert [c.message.content for c in final.choices] == ["answer 0", "answer 1"]
    assert final.usage is not None and final.usage.total_tokens == 7


def test_replay_keeps_reasoning_and_logprobs() -> None:
    logprobs = {
        "content": [{"token": "Hi", "logprob": -0.1, "bytes": [72, 105], "top_logprobs": []}]
    }
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": "Hi", "reasoning_content": "think"},
        "logprobs": logprobs,
        "finish_reason": "stop",
    }
    chunks = payloads(replay_events(raw(completion(choice)), "r", include_usage=False))
    assert chunks[1]["choices"][0]["delta"] == {"reasoning_content": "think", "content": "Hi"}
    assert chunks[1]["choices"][0]["logprobs"] == logprobs


def test_hit_payload_picks_the_shape() -> None:
    stored = raw(completion())
    assert hit_payload(stored, "r", stream=False, include_usage=False) == hit_body(stored, "r")
    streamed = hit_payload(stored, "r", stream=True, include_usage=False)
    assert streamed == b"".join(replay_events(stored, "r", include_usage=False))


@pytest.mark.parametrize(
    "message",
    [
        {"role": "assistant", "content": "see", "annotations": [{"type": "url_citation"}]},
        {"role": "assistant", "content": None, "audio": {"id": "audio_1", "data": "UklGR"}},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "custom", "custom": {"name": "run", "input": "ls"}}
            ],
        },
    ],
)
def test_an_answer_the_replay_would_cut_is_json_only(message: dict[str, Any]) -> None:
    """Citations, audio, a freeform tool call: a stream rebuilt without them would be another
    answer, so a stream request does not get one (a miss); a JSON request gets it whole."""
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
    stored = orjson.dumps(completion(choice))
    assert (
        orjson.loads(hit_payload(stored, "r2", stream=False, include_usage=False))["choices"][0][
            "message"
        ]
        == message
    )
    with pytest.raises(NotReplayableError):
        hit_payload(stored, "r2", stream=True, include_usage=False)


def test_empty_fields_a_server_always_sends_do_not_stop_the_replay() -> None:
    message = {
        "role": "assistant",
        "content": "Hello",
        "annotations": [],
        "audio": None,
        "tool_calls": [],
        "reasoning_content": None,
    }
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
    events = replay_events(orjson.dumps(completion(choice)), "r2", include_usage=False)
    assert b'"content":"Hello"' in b"".join(events)
