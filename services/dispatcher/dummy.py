"""The `dummy` model: the placeholder answer, as JSON or as SSE events (pure functions).

It answers as a model would to the request's shape: `n` choices, and at most the request's
token limit (`max_completion_tokens`, else `max_tokens`) of the placeholder, ending with
`finish_reason` "length" when the limit cut it short; a `stop` sequence ends it before that
sequence (`finish_reason` "stop"). Code that checks its plumbing against `dummy`
(`choices[1]`, a length stop, `stop=["world"]`) then sees what a real model would send.
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
        stopped = _cut_at_stop(pieces, request.get("stop"))
        return cls(
            choices=choices if choices is not None and choices > 0 else 1,
            pieces=pieces if stopped is None else stopped,
            finish_reason="stop" if stopped is not None or pieces == _PIECES else "length",
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


def _cut_at_stop(pieces: tuple[str, ...], stop: object) -> tuple[str, ...] | None:
    """The pieces before the first `stop` sequence (a string or a list of them), or None
    when none occurs: a model stops before the sequence and does not send it."""
    sequences = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
    text = "".join(pieces)
    found = [text.find(s) for s in sequences if isinstance(s, str) and s and s in text]
    if not found:
        return None
    end, kept, start = min(found), [], 0
    for piece in pieces:
        if start >= end:
            break
        kept.append(piece[: end - start])
        start += len(piece)
    return tuple(kept)


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
