"""A fake OpenAI Chat Completions API (`python -m fakes.openai --port 8200`).

Wire format of api.openai.com as captured in public traces, reproduced here:
- ids are `chatcmpl-<29 alphanumerics>`, tool call ids `call_<24>`; every
  response has `x-request-id: req_<32 hex>`, `openai-processing-ms`,
  `openai-version` and the `x-ratelimit-*` headers.
- JSON bodies are pretty-printed (2-space indent), error bodies 4-space; they
  carry `service_tier`, `system_fingerprint`, message `refusal: null` and
  `annotations: []`, usage with `prompt_tokens_details` and
  `completion_tokens_details`.
- Every chunk repeats id/created/model/service_tier/system_fingerprint; the
  first delta is `{"role":"assistant","content":"","refusal":null}` (content
  null when it opens a tool call, whose first delta has `"arguments":""`);
  finish_reason comes in its own chunk with an empty delta `{}`.
- With include_usage every chunk has `"usage":null` and a last chunk with
  `"choices":[]` carries usage; chunks end with an `obfuscation` pad unless
  `stream_options.include_obfuscation` is false.
- Errors: `{"error":{"message","type","param","code"}}` with string codes.
"""

from __future__ import annotations

import hashlib
import json
import random
import secrets
import string
import time
from http import HTTPStatus

import orjson
from aiohttp import web

from fakes import core
from fakes.cli import build_parser, config_from_args, run
from fakes.core import DONE, ApiError, Completion, ErrorKind, Event, FakeConfig, JsonObj, sse
from fakes.flavour import Reply
from fakes.server import build_app

_ALNUM = string.ascii_letters + string.digits
_ORG = "org-fake"
_KEYS_URL = "https://platform.openai.com/account/api-keys"
_NO_KEY = (
    "You didn't provide an API key. You need to provide your API key in an Authorization "
    "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or as the password field "
    "(with blank username) if you're accessing the API from your browser and are prompted for "
    f"a username. You can obtain an API key from {_KEYS_URL}."
)
_BAD_JSON = (
    "We could not parse the JSON body of your request. (HINT: This likely means you aren't "
    "using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was "
    "sent was not valid JSON. If you have trouble figuring out how to fix this, please contact "
    "us through our help center at help.openai.com.)"
)
_SERVER_MESSAGES = {
    500: "The server had an error while processing your request. Sorry about that!",
    503: "The engine is currently overloaded, please try again later",
}
# Release timestamps /v1/models reports for the default models.
_CREATED = {"gpt-4o": 1715367049, "gpt-4o-mini": 1721172741}
# The Chat Completions request body's fields, as OpenAI documents them.
_REQUEST_FIELDS = frozenset(
    {
        "messages", "model", "audio", "frequency_penalty", "function_call", "functions",
        "logit_bias", "logprobs", "max_completion_tokens", "max_tokens", "metadata",
        "modalities", "n", "parallel_tool_calls", "prediction", "presence_penalty",
        "prompt_cache_key", "prompt_cache_retention", "reasoning_effort", "response_format",
        "safety_identifier", "seed", "service_tier", "stop", "store", "stream",
        "stream_options", "temperature", "tool_choice", "tools", "top_logprobs", "top_p",
        "user", "verbosity", "web_search_options",
    }
)  # fmt: skip
# OpenAI answers an alias with the snapshot it resolved to: `gpt-4o` is `gpt-4o-2024-08-06`.
_SNAPSHOTS = {"gpt-4o": "gpt-4o-2024-08-06", "gpt-4o-mini": "gpt-4o-mini-2024-07-18"}


def snapshot_of(model: str) -> str:
    """The `model` an answer to a request for `model` carries."""
    return _SNAPSHOTS.get(model, model)


_RATE_LIMIT = {
    "x-ratelimit-limit-requests": "10000",
    "x-ratelimit-limit-tokens": "10000000",
    "x-ratelimit-remaining-requests": "9999",
    "x-ratelimit-remaining-tokens": "9999000",
    "x-ratelimit-reset-requests": "6ms",
    "x-ratelimit-reset-tokens": "0s",
}
_USAGE_DETAILS = {
    "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
    "completion_tokens_details": {
        "reasoning_tokens": 0,
        "audio_tokens": 0,
        "accepted_prediction_tokens": 0,
        "rejected_prediction_tokens": 0,
    },
}


def _alnum(length: int) -> str:
    return "".join(random.choices(_ALNUM, k=length))


class OpenAIFlavour:
    """OpenAI's bytes for the generic server (see `fakes.flavour.Flavour`)."""

    name = "fake-openai"
    model_required = True
    strict_stream_options = True  # any `stream_options` but null needs `stream`
    usage_by_default = False  # `stream_options: {}` asks for no usage chunk
    enforces_context = False  # its models' limits are not modelled
    known_fields: frozenset[str] | None = _REQUEST_FIELDS  # others: "Unrecognized request argument"

    def __init__(self, config: FakeConfig) -> None:
        self._config = config
        digest = hashlib.sha256(",".join(config.models).encode()).hexdigest()
        self._fingerprint = f"fp_{digest[:10]}"
        self._pad = _alnum(64)
        self._pad_at = 0

    def completion_id(self, request: web.Request) -> str:
        return f"chatcmpl-{_alnum(29)}"

    def tool_call_id(self) -> str:
        return f"call_{_alnum(24)}"

    def format_arguments(self, arguments: JsonObj) -> str:
        return orjson.dumps(arguments).decode()  # OpenAI models emit compact JSON

    def check_auth(self, request: web.Request) -> Reply | None:
        expected = self._config.api_key
        if expected is None:
            return None
        header = request.headers.get("Authorization", "")
        scheme, _, key = header.partition(" ")
        key = key.strip()
        if not header or scheme.lower() != "bearer" or not key:
            return _error(401, _NO_KEY)
        if key != expected:
            message = (
                f"Incorrect API key provided: {_mask(key)}. "
                f"You can find your API key at {_KEYS_URL}."
            )
            return _error(401, message, code="invalid_api_key")
        return None

    def response_headers(self, started: float) -> dict[str, str]:
        elapsed_ms = int((time.monotonic() - started) * 1000)
        return {
            "x-request-id": f"req_{secrets.token_hex(16)}",
            "openai-organization": _ORG,
            "openai-processing-ms": str(elapsed_ms),
            "openai-project": "proj_fake",
            "openai-version": "2020-10-01",
            **_RATE_LIMIT,
        }

    def error(self, error: ApiError) -> Reply:
        kind = error.kind
        if kind is ErrorKind.UNKNOWN_MODEL:
            message = f"The model `{error.value}` does not exist or you do not have access to it."
            return _error(404, message, code="model_not_found")
        if kind is ErrorKind.INVALID_JSON:
            return _error(400, _BAD_JSON)
        if kind is ErrorKind.MISSING_MESSAGES:
            code = "missing_required_parameter"
            return _error(400, error.message, param="messages", code=code)
        if kind in (ErrorKind.MISSING_MODEL, ErrorKind.UNKNOWN_ARGUMENT):
            return _error(400, error.message)
        return _error(400, error.message, param=error.param, code="invalid_value")

    def status_error(self, status: int, model: str | None) -> Reply:
        if status == 429:
            message = (
                f"Rate limit reached for {model or 'gpt-4o-mini'} in organization {_ORG} on "
                "requests per min (RPM): Limit 10000, Used 10000, Requested 1. Please try again "
                "in 6ms. Visit https://platform.openai.com/account/rate-limits to learn more."
            )
            headers = {"x-ratelimit-remaining-requests": "0"}
            return _error(429, message, "requests", code="rate_limit_exceeded", headers=headers)
        if status == 401:
            message = (
                f"Incorrect API key provided: sk-****. You can find your API key at {_KEYS_URL}."
            )
            return _error(401, message, code="invalid_api_key")
        if status >= 500:
            message = _SERVER_MESSAGES.get(status) or _phrase(status)
            return _error(status, message, "server_error")
        return _error(status, _phrase(status))

    def json_body(self, completion: Completion) -> bytes:
        c = completion
        choices = [
            {
                "index": i,
                "message": self._message(c, i),
                "logprobs": _logprobs(c, c.tokens),
                "finish_reason": c.finish_reason,
            }
            for i in range(c.n)
        ]
        body = {
            "id": c.id,
            "object": "chat.completion",
            "created": c.created,
            "model": snapshot_of(c.model),
            "choices": choices,
            "usage": _usage(c),
            "service_tier": "default",
            "system_fingerprint": self._fingerprint,
        }
        return orjson.dumps(body, option=orjson.OPT_INDENT_2)

    def _message(self, c: Completion, index: int) -> JsonObj:
        if c.tool_call is None:
            return {"role": "assistant", "content": c.text, "refusal": None, "annotations": []}
        call = {
            "id": c.tool_call.ids[index],
            "type": "function",
            "function": {"name": c.tool_call.name, "arguments": c.tool_call.arguments},
        }
        return {
            "role": "assistant",
            "content": None,
            "tool_calls": [call],
            "refusal": None,
            "annotations": [],
        }

    def stream_failure(self, message: str) -> list[bytes]:
        # OpenAI ends a failing stream with an error event and no `[DONE]`.
        body = {"error": {"message": message, "type": "server_error", "param": None, "code": None}}
        return [sse(body)]

    def stream_events(self, completion: Completion) -> list[Event]:
        c = completion
        head = {
            "id": c.id,
            "object": "chat.completion.chunk",
            "created": c.created,
            "model": snapshot_of(c.model),
            "service_tier": "default",
            "system_fingerprint": self._fingerprint,
        }

        def chunk(choices: list[JsonObj], usage: JsonObj | None = None) -> bytes:
            obj: JsonObj = {**head, "choices": choices}
            if c.include_usage:
                obj["usage"] = usage
            if c.include_obfuscation:
                obj["obfuscation"] = self._obfuscation()
            return sse(obj)

        def choice(
            i: int, delta: JsonObj, finish: str | None = None, token: str | None = None
        ) -> list[JsonObj]:
            logprobs = None if token is None else _logprobs(c, (token,))
            return [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]

        events: list[Event] = []
        call = c.tool_call
        if call is None:
            first: JsonObj = {"role": "assistant", "content": "", "refusal": None}
            events.extend((0, chunk(choice(i, first))) for i in range(c.n))
            for step, token in enumerate(c.tokens):
                events.extend(
                    (step, chunk(choice(i, {"content": token}, token=token))) for i in range(c.n)
                )
            last = max(len(c.tokens) - 1, 0)
        else:
            for i in range(c.n):
                opening = {
                    "index": 0,
                    "id": call.ids[i],
                    "type": "function",
                    "function": {"name": call.name, "arguments": ""},
                }
                delta = {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [opening],
                    "refusal": None,
                }
                events.append((0, chunk(choice(i, delta))))
            for step, fragment in enumerate(call.fragments, start=1):
                delta = {"tool_calls": [{"index": 0, "function": {"arguments": fragment}}]}
                events.extend((step, chunk(choice(i, delta))) for i in range(c.n))
            last = len(call.fragments)
        events.extend((last, chunk(choice(i, {}, c.finish_reason))) for i in range(c.n))
        if c.include_usage:
            events.append((last, chunk([], _usage(c))))
        events.append((last, DONE))
        return events

    def _obfuscation(self) -> str:
        # Real pads are random-length noise; a rotating slice is as good and cheap.
        self._pad_at = (self._pad_at + 37) % 48
        return self._pad[self._pad_at : self._pad_at + self._pad_at % 16]

    def models_body(self) -> bytes:
        data = [
            {
                "id": m,
                "object": "model",
                "created": _CREATED.get(m, 1700000000),
                "owned_by": "system",
            }
            for m in self._config.models
        ]
        return orjson.dumps({"object": "list", "data": data}, option=orjson.OPT_INDENT_2)

    def extra_routes(self) -> list[web.RouteDef]:
        return []


def _logprobs(c: Completion, tokens: tuple[str, ...]) -> JsonObj | None:
    logprobs = core.content_logprobs(c, tokens)
    return None if logprobs is None else {**logprobs, "refusal": None}


def _usage(c: Completion) -> JsonObj:
    return {
        "prompt_tokens": c.prompt_tokens,
        "completion_tokens": c.completion_tokens,
        "total_tokens": c.total_tokens,
        **_USAGE_DETAILS,
    }


def _mask(key: str) -> str:
    # OpenAI echoes short keys and stars out the middle of long ones.
    if len(key) <= 8:
        return key
    return f"{key[:3]}{'*' * (len(key) - 7)}{key[-4:]}"


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _error(
    status: int,
    message: str,
    type_: str = "invalid_request_error",
    *,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return Reply(status, (json.dumps(body, indent=4) + "\n").encode(), headers=headers or {})


def create_app(config: FakeConfig | None = None) -> web.Application:
    """A fake OpenAI app; `config` defaults to the CLI defaults (key "sk-fake")."""
    config = config or FakeConfig(models=["gpt-4o-mini", "gpt-4o"], api_key="sk-fake")
    return build_app(config, OpenAIFlavour(config))


def main(argv: list[str] | None = None) -> None:
    """CLI entry point; prints "fake-openai listening on http://host:port" when ready."""
    parser = build_parser("fakes.openai", port=8200, models="gpt-4o-mini,gpt-4o", api_key="sk-fake")
    args = parser.parse_args(argv)
    run(create_app(config_from_args(args)), args.host, args.port, OpenAIFlavour.name)


if __name__ == "__main__":
    main()
