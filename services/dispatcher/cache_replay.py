"""Cache entries: which answers may be stored, and how a stored one is served (pure functions).

Only whole answers are stored: a `chat.completion` whose every choice finished on its own
(`stop`, `tool_calls`, `function_call`); never an error, a truncated answer (`length`), a
filtered one (`content_filter`) or a stream. A hit is served under the new request's id
(`chatcmpl-<request id>`: every response names its own request), as JSON, or replayed as a
valid SSE stream: per choice a role chunk, the text, the tool calls, the finish reason, then
the usage chunk when the request asked for it. An answer the replay would cut (see
NotReplayableError) is not replayed at all.
"""

from __future__ import annotations

from typing import Any

import orjson

from shared.messages import MAX_CACHED_BODY

COMPLETE_FINISH_REASONS = frozenset({"stop", "tool_calls", "function_call"})
MAX_ENTRY_BYTES = MAX_CACHED_BODY
# Message fields replayed as one text delta, in this order (reasoning first, as servers send).
TEXT_FIELDS = ("reasoning_content", "reasoning", "content", "refusal")
# Top-level fields of a completion that every chunk of its stream repeats, when present.
CHUNK_FIELDS = ("system_fingerprint", "service_tier")


class EntryError(ValueError):
    """A stored entry that is not a complete chat.completion (written by something else)."""


class NotReplayableError(EntryError):
    """A complete answer a stream cannot be rebuilt from here: it holds a message field the
    replay does not know (`audio`, `annotations`) or a tool call that is not a function call.
    Served as JSON; for a stream request it is a miss, never an answer with a part gone."""


# Message fields the replay rebuilds; any other that holds a value makes it NotReplayable.
REPLAYED_FIELDS = frozenset({"role", *TEXT_FIELDS, "tool_calls", "function_call"})


def _completion(body: bytes) -> dict[str, Any]:
    """The parsed completion; raises EntryError unless it is a complete one."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise EntryError("not JSON") from e
    if not isinstance(data, dict) or data.get("object") != "chat.completion":
        raise EntryError("not a chat.completion")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices:
        raise EntryError("no choices")
    for choice in choices:
        if not isinstance(choice, dict) or not isinstance(choice.get("message"), dict):
            raise EntryError("a choice without a message")
        if choice.get("finish_reason") not in COMPLETE_FINISH_REASONS:
            raise EntryError(f"finish_reason {choice.get('finish_reason')!r}")
    return data


def is_storable(body: bytes) -> bool:
    """True for a complete chat.completion small enough to keep."""
    if len(body) > MAX_ENTRY_BYTES:
        return False
    try:
        _completion(body)
    except EntryError:
        return False
    return True


def completion_id(request_id: str) -> str:
    return f"chatcmpl-{request_id}"


def stored_age(stored: bytes, now: float) -> float | None:
    """Seconds since the stored answer was made (its `created`); None if it does not say."""
    try:
        created = _completion(stored).get("created")
    except EntryError:
        return None
    if not isinstance(created, int | float) or isinstance(created, bool):
        return None
    return now - created


def hit_body(stored: bytes, request_id: str) -> bytes:
    """The stored completion under this request's id. Raises EntryError on a bad entry."""
    data = _completion(stored)
    data["id"] = completion_id(request_id)
    return orjson.dumps(data)


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def _choice_deltas(choice: dict[str, Any]) -> list[tuple[dict[str, Any], Any]]:
    """(delta, logprobs) of each chunk replaying one choice, before its finish chunk.
    Raises NotReplayableError."""
    message: dict[str, Any] = choice["message"]
    for field, value in message.items():
        if field not in REPLAYED_FIELDS and value not in (None, "", [], {}):
            raise NotReplayableError(f"the message's {field!r} cannot be replayed")
    content = message.get("content")
    deltas: list[tuple[dict[str, Any], Any]] = [
        (
            {
                "role": message.get("role") or "assistant",
                "content": "" if isinstance(content, str) else None,
            },
            None,
        )
    ]
    text = {
        field: message[field]
        for field in TEXT_FIELDS
        if isinstance(message.get(field), str) and message[field]
    }
    if text:
        deltas.append((text, choice.get("logprobs")))
    tool_calls = message.get("tool_calls")
    if isinstance(tool_calls, list) and tool_calls:
        if any(
            isinstance(call, dict) and (call.get("type") or "function") != "function"
            for call in tool_calls
        ):
            raise NotReplayableError("a tool call that is not a function call cannot be replayed")
        deltas.append(
            (
                {
                    "tool_calls": [
                        {
                            "index": i,
                            "id": call.get("id"),
                            "type": call.get("type") or "function",
                            "function": call.get("function") or {},
                        }
                        for i, call in enumerate(tool_calls)
                        if isinstance(call, dict)
                    ]
                },
                None,
            )
        )
    function_call = message.get("function_call")
    if isinstance(function_call, dict):
        deltas.append(({"function_call": function_call}, None))
    return deltas


def replay_events(stored: bytes, request_id: str, *, include_usage: bool) -> list[bytes]:
    """The stored completion as framed SSE events (without `[DONE]`, which the API adds).

    Raises EntryError on a bad entry.
    """
    data = _completion(stored)
    head: dict[str, Any] = {
        "id": completion_id(request_id),
        "object": "chat.completion.chunk",
        "created": data.get("created", 0),
        "model": data.get("model", ""),
    }
    head.update({field: data[field] for field in CHUNK_FIELDS if field in data})

    def chunk(choices: list[dict[str, Any]]) -> bytes:
        payload = {**head, "choices": choices}
        if include_usage:
            payload["usage"] = None
        return _event(payload)

    events: list[bytes] = []
    for position, choice in enumerate(data["choices"]):
        index = choice.get("index", position)
        for delta, logprobs in _choice_deltas(choice):
            events.append(
                chunk(
                    [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": None}]
                )
            )
        events.append(
            chunk(
                [
                    {
                        "index": index,
                        "delta": {},
                        "logprobs": None,
                        "finish_reason": choice["finish_reason"],
                    }
                ]
            )
        )
    usage = data.get("usage")
    if include_usage and isinstance(usage, dict):
        events.append(_event({**head, "choices": [], "usage": usage}))
    return events


def hit_payload(stored: bytes, request_id: str, *, stream: bool, include_usage: bool) -> bytes:
    """What a hit answers: the JSON body, or every SSE event of the replay, joined."""
    if not stream:
        return hit_body(stored, request_id)
    return b"".join(replay_events(stored, request_id, include_usage=include_usage))
