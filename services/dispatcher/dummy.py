"""The `dummy` model: the placeholder answer, as JSON or as SSE events (pure functions)."""

from __future__ import annotations

from typing import Any

import orjson

PLACEHOLDER = "Hello world"
_PIECES = ("Hello", " world")


def _usage(prompt_bytes: int) -> dict[str, int]:
    # A rough, deterministic stand-in for a tokenizer: ~4 bytes a token.
    prompt = max(1, prompt_bytes // 4)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": len(_PIECES),
        "total_tokens": prompt + len(_PIECES),
    }


def completion(request_id: str, model: str, created: int, prompt_bytes: int) -> bytes:
    return orjson.dumps(
        {
            "id": f"chatcmpl-{request_id}",
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": PLACEHOLDER},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": _usage(prompt_bytes),
        }
    )


def sse_event(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def stream_events(
    request_id: str, model: str, created: int, prompt_bytes: int, *, include_usage: bool
) -> list[bytes]:
    """Role chunk, content chunks, finish chunk, then a usage chunk when asked."""

    def chunk(delta: dict[str, Any], finish: str | None) -> bytes:
        payload: dict[str, Any] = {
            "id": f"chatcmpl-{request_id}",
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if include_usage:
            payload["usage"] = None
        return sse_event(payload)

    events = [chunk({"role": "assistant", "content": ""}, None)]
    events += [chunk({"content": piece}, None) for piece in _PIECES]
    events.append(chunk({}, "stop"))
    if include_usage:
        events.append(
            sse_event(
                {
                    "id": f"chatcmpl-{request_id}",
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": _usage(prompt_bytes),
                }
            )
        )
    return events
