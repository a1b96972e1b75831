"""The `dummy` model: the placeholder answer, as JSON or as SSE events (pure functions).

It answers as a model would to the request's shape: `n` choices, and at most the request's
token limit (`max_completion_tokens`, else `max_tokens`) of the placeholder, ending with
`finish_reason` "length" when the limit cut it short. Code that checks its plumbing against
`dummy` (`choices[1]`, a length stop) then sees what a real model would send.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from services.dispatcher.cache_key import whole_number

PLACEHOLDER = "Hello world"
_PIECES = ("Hello", " world")


@dataclass(frozen=True, slots=True)
class DummyAnswer:
    """What the placeholder answer looks like for one request."""

    choices: int = 1
    pieces: tuple[str, ...] = _PIECES
    finish_reason: str = "stop"
    prompt_bytes: int = 0

    @classmethod
    def for_request(cls, body: bytes) -> DummyAnswer:
        """From the request body the API validated (`n` 1-128, token limits positive)."""
        try:
            request = orjson.loads(body)
        except orjson.JSONDecodeError:
            request = {}
        if not isinstance(request, dict):
            request = {}
        choices = whole_number(request.get("n"))
        limit = whole_number(request.get("max_completion_tokens")) or whole_number(
            request.get("max_tokens")
        )
        pieces: tuple[str, ...] = _PIECES
        if limit is not None and 0 < limit < len(_PIECES):
            pieces = _PIECES[:limit]
        return cls(
            choices=choices if choices is not None and choices > 0 else 1,
            pieces=pieces,
            finish_reason="stop" if pieces == _PIECES else "length",
            # The prompt is the messages: the same conversation counts the same whether it is
            # streamed, sampled or limited (the whole body would count `stream_options` too).
            prompt_bytes=len(orjson.dumps(request.get("messages", ()))),
        )

    def usage(self) -> dict[str, int]:
        # A rough, deterministic stand-in for a tokenizer: ~4 bytes a token.
        prompt = max(1, self.prompt_bytes // 4)
        completion = len(self.pieces) * self.choices
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }


def completion(request_id: str, model: str, created: int, answer: DummyAnswer) -> bytes:
    return orjson.dumps(
        {
            "id": f"chatcmpl-{request_id}",
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": index,
                    "message": {"role": "assistant", "content": "".join(answer.pieces)},
                    "logprobs": None,
                    "finish_reason": answer.finish_reason,
                }
                for index in range(answer.choices)
            ],
            "usage": answer.usage(),
        }
    )


def sse_event(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def stream_events(
    request_id: str, model: str, created: int, answer: DummyAnswer, *, include_usage: bool
) -> list[bytes]:
    """For each choice in turn at every step: role chunks, content chunks, finish chunks,
    then a usage chunk when asked."""

    def chunk(index: int, delta: dict[str, Any], finish: str | None) -> bytes:
        payload: dict[str, Any] = {
            "id": f"chatcmpl-{request_id}",
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [
                {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            ],
        }
        if include_usage:
            payload["usage"] = None
        return sse_event(payload)

    indexes = range(answer.choices)
    events = [chunk(i, {"role": "assistant", "content": ""}, None) for i in indexes]
    events += [chunk(i, {"content": piece}, None) for piece in answer.pieces for i in indexes]
    events += [chunk(i, {}, answer.finish_reason) for i in indexes]
    if include_usage:
        events.append(
            sse_event(
                {
                    "id": f"chatcmpl-{request_id}",
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": answer.usage(),
                }
            )
        )
    return events
