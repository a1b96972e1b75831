"""A fake vLLM OpenAI-compatible server (`python -m fakes.vllm --port 8100`).

Wire format of current vLLM (pydantic `model_dump` for JSON bodies,
`model_dump_json(exclude_unset=True)` for stream chunks), reproduced here:
- ids are `chatcmpl-<32 hex>`, or `chatcmpl-<X-Request-Id>` when the client
  sends that header; tool call ids are `chatcmpl-tool-<32 hex>`.
- JSON bodies carry every field, nulls included (`stop_reason`,
  `prompt_logprobs`, `kv_transfer_params`, message `reasoning`, ...).
- The first chunk of each choice is `{"role":"assistant","content":""}`; chunks
  have no `usage` key until the final usage chunk (only with include_usage,
  which a `stream_options` object without it turns on: vLLM's default is true),
  which has `"choices":[]` and no null fields.
- A natural stop ends with an extra `{"content":""}` chunk (the EOS token)
  carrying finish_reason "stop"; "length" rides on the last content chunk.
- Errors: `{"error":{"message","type","param","code":<int status>}}`.
"""

from __future__ import annotations

import json
import secrets
import time
from http import HTTPStatus
from typing import Any

import orjson
from aiohttp import web

from fakes import core
from fakes.cli import build_parser, config_from_args, run
from fakes.core import DONE, ApiError, Completion, ErrorKind, Event, FakeConfig, JsonObj, sse
from fakes.flavour import Reply
from fakes.server import build_app

_ERROR_TYPES = {
    400: "BadRequestError",
    404: "NotFoundError",
    500: "InternalServerError",
    501: "NotImplementedError",
}
_STATUS_MESSAGES = {500: "Internal server error", 503: "Service Unavailable"}


def _random_uuid() -> str:
    return secrets.token_hex(16)  # vLLM's random_uuid(): uuid4().hex, 32 hex chars


class VllmFlavour:
    """vLLM's bytes for the generic server (see `fakes.flavour.Flavour`)."""

    name = "fake-vllm"
    model_required = False  # vLLM serves its (first) model when "model" is absent
    strict_stream_options = False  # vLLM accepts `stream_options: {}` without `stream`
    usage_by_default = True  # and reads `{}` as `{"include_usage": true}`
    enforces_context = True  # a 400 for what does not fit max_model_len
    known_fields: frozenset[str] | None = None  # vLLM takes fields it does not know (logs them)

    def __init__(self, config: FakeConfig) -> None:
        self._config = config
        self._started = int(time.time())

    def completion_id(self, request: web.Request) -> str:
        return f"chatcmpl-{request.headers.get('X-Request-Id') or _random_uuid()}"

    def tool_call_id(self) -> str:
        return f"chatcmpl-tool-{_random_uuid()}"

    def format_arguments(self, arguments: JsonObj) -> str:
        # vLLM's tool parsers re-serialise with json.dumps defaults: ", " and ": ".
        return json.dumps(arguments, ensure_ascii=False)

    def check_auth(self, request: web.Request) -> Reply | None:
        """vLLM's `--api-key` (or `VLLM_API_KEY`): every `/v1` route wants `Bearer <key>`,
        and a miss is a bare 401 that is not an OpenAI error object. Without one, anything."""
        expected = self._config.api_key
        if expected is None:
            return None
        scheme, _, key = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and key == expected:
            return None
        return Reply(401, b'{"error":"Unauthorized"}')

    def response_headers(self, started: float) -> dict[str, str]:
        return {}

    def error(self, error: ApiError) -> Reply:
        kind = error.kind
        if kind is ErrorKind.UNKNOWN_MODEL:
            return _error(404, error.message, "NotFoundError", "model")
        if kind in (ErrorKind.INVALID_JSON, ErrorKind.MISSING_MESSAGES, ErrorKind.MISSING_MODEL):
            # FastAPI request validation, re-wrapped by vLLM's exception handler
            # with the status phrase as the type.
            return _error(400, _validation_message(error), HTTPStatus.BAD_REQUEST.phrase, None)
        if kind is ErrorKind.STREAM_OPTIONS_WITHOUT_STREAM:
            message = "Stream options can only be defined when `stream=True`."
            return _error(400, message, "BadRequestError", "stream_options")
        return _error(400, error.message, "BadRequestError", error.param)

    def status_error(self, status: int, model: str | None) -> Reply:
        phrase = _phrase(status)
        message = _STATUS_MESSAGES.get(status, phrase)
        return _error(status, message, _ERROR_TYPES.get(status, phrase), None)

    def json_body(self, completion: Completion) -> bytes:
        c = completion
        choices = [
            {
                "index": i,
                "message": self._message(c, i),
                "logprobs": core.content_logprobs(c, c.tokens),
                "finish_reason": c.finish_reason,
                "stop_reason": None,
                "token_ids": None,
            }
            for i in range(c.n)
        ]
        return orjson.dumps(
            {
                "id": c.id,
                "object": "chat.completion",
                "created": c.created,
                "model": c.model,
                "choices": choices,
                "service_tier": None,
                "system_fingerprint": None,
                "usage": {
                    "prompt_tokens": c.prompt_tokens,
                    "total_tokens": c.total_tokens,
                    "completion_tokens": c.completion_tokens,
                    "prompt_tokens_details": None,
                    "completion_tokens_details": None,
                },
                "prompt_logprobs": None,
                "prompt_token_ids": None,
                "kv_transfer_params": None,
            }
        )

    def _message(self, c: Completion, index: int) -> JsonObj:
        message: JsonObj = {
            "role": "assistant",
            "content": c.text if c.tool_call is None else None,
            "refusal": None,
            "annotations": None,
            "audio": None,
            "function_call": None,
        }
        if c.tool_call is not None:  # vLLM drops an empty tool_calls list
            message["tool_calls"] = [
                {
                    "id": c.tool_call.ids[index],
                    "type": "function",
                    "function": {"name": c.tool_call.name, "arguments": c.tool_call.arguments},
                }
            ]
        message["reasoning"] = None
        return message

    def stream_failure(self, message: str) -> list[bytes]:
        return _stream_failure(message)

    def stream_events(self, completion: Completion) -> list[Event]:
        c = completion
        head = {
            "id": c.id,
            "object": "chat.completion.chunk",
            "created": c.created,
            "model": c.model,
        }

        def chunk(
            index: int, delta: JsonObj, finish: str | None = None, token: str | None = None
        ) -> bytes:
            choice: JsonObj = {
                "index": index,
                "delta": delta,
                "logprobs": None if token is None else core.content_logprobs(c, (token,)),
                "finish_reason": finish,
            }
            if finish is not None:
                choice["stop_reason"] = None
            choice["token_ids"] = None
            return sse({**head, "choices": [choice]})

        events: list[Event] = []
        for i in range(c.n):
            first = {**head, "choices": [_first_choice(i)], "prompt_token_ids": None}
            events.append((0, sse(first)))
        if c.tool_call is None:
            last = len(c.tokens) - 1
            for step, token in enumerate(c.tokens):
                finish = c.finish_reason if step == last and c.finish_reason == "length" else None
                events.extend(
                    (step, chunk(i, {"content": token}, finish, token)) for i in range(c.n)
                )
            if c.finish_reason != "length":
                # The EOS token: empty text, but it is what carries finish_reason.
                step = max(last, 0)
                events.extend(
                    (step, chunk(i, {"content": ""}, c.finish_reason)) for i in range(c.n)
                )
        else:
            call = c.tool_call
            for i in range(c.n):
                header = {
                    "id": call.ids[i],
                    "type": "function",
                    "index": 0,
                    "function": {"name": call.name},
                }
                events.append((0, chunk(i, {"tool_calls": [header]})))
            for step, fragment in enumerate(call.fragments, start=1):
                delta = {"tool_calls": [{"index": 0, "function": {"arguments": fragment}}]}
                events.extend((step, chunk(i, delta)) for i in range(c.n))
            step = len(call.fragments)
            events.extend((step, chunk(i, {}, c.finish_reason)) for i in range(c.n))
        last_step = events[-1][0]
        if c.include_usage:
            usage = {
                "prompt_tokens": c.prompt_tokens,
                "total_tokens": c.total_tokens,
                "completion_tokens": c.completion_tokens,
            }
            events.append((last_step, sse({**head, "choices": [], "usage": usage})))
        events.append((last_step, DONE))
        return events

    def models_body(self) -> bytes:
        created = self._started
        cards = [
            {
                "id": model,
                "object": "model",
                "created": created,
                "owned_by": "vllm",
                "root": model,
                "parent": None,
                "max_model_len": self._config.max_model_len,
                "permission": [_permission(created)],
            }
            for model in self._config.models
        ]
        return orjson.dumps({"object": "list", "data": cards})

    def extra_routes(self) -> list[web.RouteDef]:
        return [web.get("/health", _health)]


def _first_choice(index: int) -> JsonObj:
    delta = {"role": "assistant", "content": ""}
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}


def _permission(created: int) -> JsonObj:
    return {
        "id": f"modelperm-{_random_uuid()}",
        "object": "model_permission",
        "created": created,
        "allow_create_engine": False,
        "allow_sampling": True,
        "allow_logprobs": True,
        "allow_search_indices": False,
        "allow_view": True,
        "allow_fine_tuning": False,
        "organization": "*",
        "group": None,
        "is_blocking": False,
    }


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _validation_message(error: ApiError) -> str:
    # The shape of FastAPI's error list as vLLM prints it into "message".
    detail: dict[str, Any]
    if error.kind is ErrorKind.INVALID_JSON:
        detail = {"type": "json_invalid", "loc": ("body", 0), "msg": "JSON decode error"}
        detail.update(input={}, ctx={"error": error.message})
    else:
        field = "messages" if error.kind is ErrorKind.MISSING_MESSAGES else "model"
        detail = {"type": "missing", "loc": ("body", field), "msg": "Field required"}
    return str([detail])


def _error(status: int, message: str, type_: str, param: str | None) -> Reply:
    body = {"error": {"message": message, "type": type_, "param": param, "code": status}}
    return Reply(status, orjson.dumps(body))


def _stream_failure(message: str) -> list[bytes]:
    # `chat_completion_stream_generator`: the exception as `create_streaming_error_response`
    # words it (400, BadRequestError), then the `[DONE]` every stream ends with.
    body = {"error": {"message": message, "type": "BadRequestError", "param": None, "code": 400}}
    return [sse(body), DONE]


async def _health(request: web.Request) -> web.Response:
    """vLLM's liveness probe: 200 with an empty body."""
    return web.Response(status=200)


def create_app(config: FakeConfig | None = None) -> web.Application:
    """A fake vLLM app; `config` defaults to the CLI defaults."""
    config = config or FakeConfig()
    return build_app(config, VllmFlavour(config))


def main(argv: list[str] | None = None) -> None:
    """CLI entry point; prints "fake-vllm listening on http://host:port" when ready."""
    parser = build_parser("fakes.vllm", port=8100, models="mistral-7b-instruct", api_key="")
    args = parser.parse_args(argv)
    config = config_from_args(args)
    run(create_app(config), args.host, args.port, VllmFlavour.name)


if __name__ == "__main__":
    main()
