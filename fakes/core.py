"""Flavour-neutral engine of the fake upstreams.

Contract: everything here is pure (no I/O, no aiohttp) so it can be unit-tested.
It turns a request body plus a `FakeConfig` into a `Completion` plan (the reply
tokens, an optional tool call, finish reason and usage); the flavour modules
turn that plan into vLLM's or OpenAI's exact bytes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import orjson

JsonObj = dict[str, Any]

# SSE framing shared by vLLM and OpenAI: one `data:` line per event, a blank
# line after it, compact JSON, and a literal [DONE] sentinel at the end.
DONE = b"data: [DONE]\n\n"

# One SSE event to send, tagged with the token step it belongs to: the pacer
# sends step k at `start + k / token_rate`, so events of a step go out together.
Event = tuple[int, bytes]

MAX_N = 128  # OpenAI's documented upper bound for `n`

# "Hello world" first, then a fixed sentence cycled, so any token count is
# reproducible and the joined text reads like prose in logs.
_OPENING = ("Hello", " world")
_FILLER = (" The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", ".")
_TOKEN_RE = re.compile(r"\s*\S+|\s+")
_ARG_TOKEN_RE = re.compile(r"[A-Za-z0-9_]+|[^A-Za-z0-9_]+")


@dataclass(slots=True)
class FakeConfig:
    """Server-wide defaults; per-request `x-fake-*` headers override pacing."""

    models: list[str] = field(default_factory=lambda: ["mistral-7b-instruct"])
    latency: float = 0.0  # seconds before the first byte
    tokens: int = 16  # completion tokens per choice when `reply` is unset
    token_rate: float = 0.0  # tokens per second; 0 sends everything at once
    reply: str | None = None  # fixed reply text (split into word tokens)
    api_key: str | None = None  # OpenAI flavour: required Bearer key (None = open)
    max_model_len: int = 32768  # vLLM flavour: advertised in /v1/models, and enforced
    echo: bool = False  # reply with the last message's text (overrides reply and tokens)


class ErrorKind(Enum):
    """Client errors the engine detects; each flavour words them its own way."""

    INVALID_JSON = "invalid_json"
    MISSING_MESSAGES = "missing_messages"
    MISSING_MODEL = "missing_model"
    UNKNOWN_MODEL = "unknown_model"
    INVALID_PARAM = "invalid_param"
    STREAM_OPTIONS_WITHOUT_STREAM = "stream_options_without_stream"
    CONTEXT_TOO_LONG = "context_too_long"
    UNKNOWN_ARGUMENT = "unknown_argument"


class ApiError(Exception):
    """A request the fake rejects; `status` is 404 for unknown models, else 400."""

    def __init__(
        self, kind: ErrorKind, message: str, param: str | None = None, value: str | None = None
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.param = param
        self.value = value  # the offending value (e.g. the unknown model name)
        self.status = 404 if kind is ErrorKind.UNKNOWN_MODEL else 400


@dataclass(frozen=True, slots=True)
class Pacing:
    """Effective pacing of one request after header overrides."""

    latency: float
    token_rate: float
    tokens: int | None  # None: the config's natural length


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """The parts of a chat request the fake acts on."""

    model: str
    messages: list[Any]
    stream: bool
    include_usage: bool
    include_obfuscation: bool
    max_tokens: int | None
    n: int
    tool: tuple[str, Any, bool] | None  # (name, parameters schema, named choice)
    top_logprobs: int | None = None  # None: no logprobs asked for; else how many alternatives


@dataclass(frozen=True, slots=True)
class ToolCallPlan:
    """A tool call the fake model makes (same in every choice, own id per choice)."""

    name: str
    arguments: str  # what the fragments join to (cut short on "length")
    fragments: tuple[str, ...]
    ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Completion:
    """Flavour-neutral result of one chat request."""

    id: str
    created: int
    model: str
    n: int
    include_usage: bool
    include_obfuscation: bool
    tokens: tuple[str, ...]  # content tokens of each choice
    tool_call: ToolCallPlan | None
    finish_reason: str  # "stop" | "length" | "tool_calls"
    prompt_tokens: int
    completion_tokens: int  # summed over the n choices
    top_logprobs: int | None = None  # see ChatRequest

    @property
    def text(self) -> str:
        return "".join(self.tokens)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def sse(obj: Any) -> bytes:
    """One SSE event carrying `obj` as compact JSON."""
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def split_tokens(text: str) -> list[str]:
    """Split text into word tokens that keep their leading whitespace (join == text)."""
    return _TOKEN_RE.findall(text)


def reply_tokens(config: FakeConfig, count: int | None = None) -> list[str]:
    """The content tokens of one choice.

    `config.reply` gives its own length; `count` (the x-fake-tokens override)
    forces an exact length, cycling the reply or the filler.
    """
    base = split_tokens(config.reply) if config.reply is not None else None
    if base is not None and count is None:
        return base
    n = config.tokens if count is None else count
    if base:
        return [base[i % len(base)] for i in range(n)]
    return [_filler(i) for i in range(n)]


def echo_tokens(messages: list[Any]) -> list[str]:
    """The last message's text content as tokens (join == the text), for `echo`."""
    content = messages[-1].get("content") if messages and isinstance(messages[-1], dict) else None
    if isinstance(content, list):
        content = "".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return split_tokens(content) if isinstance(content, str) else []


def _filler(i: int) -> str:
    if i < len(_OPENING):
        return _OPENING[i]
    return _FILLER[(i - len(_OPENING)) % len(_FILLER)]


def count_prompt_tokens(messages: list[Any]) -> int:
    """Deterministic prompt size: words of text content plus a per-message overhead."""
    total = 0
    for message in messages:
        total += 4  # role markers a chat template adds around each message
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            total += len(split_tokens(content))
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    total += len(split_tokens(part["text"]))
    return total + 2  # the assistant prefix the template appends


def pacing_for(config: FakeConfig, headers: Mapping[str, str]) -> Pacing:
    """Apply `x-fake-latency`, `x-fake-tokens`, `x-fake-token-rate` over the config."""
    tokens = _header_number(headers, "x-fake-tokens", int)
    return Pacing(
        latency=_or(_header_number(headers, "x-fake-latency", float), config.latency),
        token_rate=_or(_header_number(headers, "x-fake-token-rate", float), config.token_rate),
        tokens=None if tokens is None else int(tokens),
    )


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


def _header_number(
    headers: Mapping[str, str], name: str, kind: type[int] | type[float]
) -> float | None:
    raw = headers.get(name)
    if raw is None:
        return None
    try:
        value = kind(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ApiError(ErrorKind.INVALID_PARAM, f"Invalid {name} header: {raw!r}.", name)
    return value


def parse_body(raw: bytes) -> JsonObj:
    """Decode the request body; anything but a JSON object is INVALID_JSON."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(ErrorKind.INVALID_JSON, str(exc)) from None
    if not isinstance(body, dict):
        raise ApiError(ErrorKind.INVALID_JSON, "The request body must be a JSON object.")
    return body


def parse_chat_request(
    body: JsonObj,
    models: list[str],
    *,
    model_required: bool,
    strict_stream_options: bool,
    usage_by_default: bool = False,
    context_limit: int | None = None,
    known_fields: frozenset[str] | None = None,
) -> ChatRequest:
    """Validate what the fake needs; `model_required=False` defaults to the first model.

    Without `stream`, `strict_stream_options` refuses any `stream_options` but null (OpenAI);
    otherwise only a truthy one is refused, so `{}` passes (vLLM tests
    `data.get("stream_options") and not data.get("stream")`). `usage_by_default`: a
    `stream_options` object without `include_usage` asks for usage (vLLM's `StreamOptions`
    defaults it to true; OpenAI's to false). `context_limit` (vLLM's `max_model_len`): a
    prompt, or a prompt and its `max_tokens`, that does not fit is refused, in vLLM's words.
    `known_fields` (OpenAI): a field outside them is refused, as OpenAI refuses it.
    """
    if known_fields is not None:
        for name in body:
            if name not in known_fields:
                raise ApiError(
                    ErrorKind.UNKNOWN_ARGUMENT, f"Unrecognized request argument supplied: {name}"
                )
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(ErrorKind.MISSING_MESSAGES, "Missing required parameter: 'messages'.")
    model = body.get("model")
    if model is None and not model_required:
        model = models[0]
    if not isinstance(model, str) or not model:
        raise ApiError(ErrorKind.MISSING_MODEL, "you must provide a model parameter", "model")
    if model not in models:
        raise ApiError(
            ErrorKind.UNKNOWN_MODEL, f"The model `{model}` does not exist.", "model", model
        )
    stream = body.get("stream") is True
    options = body.get("stream_options")
    given = options is not None if strict_stream_options else bool(options)
    if given and not stream:
        raise ApiError(
            ErrorKind.STREAM_OPTIONS_WITHOUT_STREAM,
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            "stream_options",
        )
    if options is not None and not isinstance(options, dict):
        raise ApiError(
            ErrorKind.INVALID_PARAM, "'stream_options' must be an object.", "stream_options"
        )
    # vLLM tests `if stream_options:` on the parsed object: any object, `{}` included.
    usage_default = usage_by_default and options is not None
    options = options or {}
    max_tokens = _max_tokens(body)
    if context_limit is not None:
        prompt = count_prompt_tokens(messages)
        _check_context(prompt, max_tokens, context_limit)
        if max_tokens is None:  # vLLM's default: what the context has room for
            max_tokens = context_limit - prompt
    top_logprobs = _int_param(body, "top_logprobs", 0, 0, 20) or 0
    if top_logprobs and body.get("logprobs") is not True:
        raise ApiError(
            ErrorKind.INVALID_PARAM,
            "when using `top_logprobs`, `logprobs` must be set to true.",
            "top_logprobs",
        )
    return ChatRequest(
        model=model,
        messages=messages,
        stream=stream,
        include_usage=options.get("include_usage", usage_default) is True,
        include_obfuscation=options.get("include_obfuscation", True) is not False,
        max_tokens=max_tokens,
        n=_int_param(body, "n", 1, 1, MAX_N) or 1,
        tool=_chosen_tool(body),
        top_logprobs=top_logprobs if body.get("logprobs") is True else None,
    )


def _check_context(prompt: int, max_tokens: int | None, limit: int) -> None:
    """vLLM's checks before it generates (`serving_chat.py`, `get_max_tokens`), worded as
    it words them: the prompt alone, then the prompt with the tokens asked for."""
    if prompt >= limit:
        raise ApiError(
            ErrorKind.CONTEXT_TOO_LONG,
            f"This model's maximum context length is {limit} tokens. However, your request "
            f"has {prompt} input tokens. Please reduce the length of the input messages.",
        )
    if max_tokens is not None and max_tokens > limit - prompt:
        raise ApiError(
            ErrorKind.CONTEXT_TOO_LONG,
            f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This "
            f"model's maximum context length is {limit} tokens and your request has {prompt} "
            f"input tokens ({max_tokens} > {limit} - {prompt}). None",
        )


def content_logprobs(completion: Completion, tokens: tuple[str, ...]) -> JsonObj | None:
    """The `logprobs` of a choice made of `tokens` (vLLM's `ChatCompletionLogProbs`; OpenAI
    adds `refusal`), None when the request asked for none."""
    top = completion.top_logprobs
    if top is None:
        return None
    return {"content": [_token_logprob(token, top) for token in tokens]}


def _token_logprob(token: str, top: int) -> JsonObj:
    """One content token's logprob entry, as OpenAI and vLLM write it: the token, a
    deterministic logprob, its UTF-8 bytes, and `top` alternatives (the token itself first)."""
    entry = _logprob(token, -0.0625)
    alternatives = [entry] + [_logprob(f"{token}~{k}", -1.0 - k) for k in range(1, top)]
    return {**entry, "top_logprobs": alternatives[:top]}


def _logprob(token: str, logprob: float) -> JsonObj:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())}


def _max_tokens(body: JsonObj) -> int | None:
    # OpenAI deprecated max_tokens for max_completion_tokens; both servers
    # prefer the new name when both are sent.
    if body.get("max_completion_tokens") is not None:
        return _int_param(body, "max_completion_tokens", None, 1, None)
    return _int_param(body, "max_tokens", None, 1, None)


def _int_param(
    body: JsonObj, name: str, default: int | None, low: int, high: int | None
) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # `2.0` is 2 to both servers (pydantic's lax int, JSON Schema)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ApiError(
            ErrorKind.INVALID_PARAM, f"Invalid type for '{name}': expected an integer.", name
        )
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"between {low} and {high}"
        raise ApiError(
            ErrorKind.INVALID_PARAM,
            f"Invalid '{name}': expected a value {bound}, but got {value} instead.",
            name,
        )
    return value


def _chosen_tool(body: JsonObj) -> tuple[str, Any, bool] | None:
    """The tool the fake calls: the named one, else the first; None for no call."""
    tools = body.get("tools")
    choice = body.get("tool_choice", "auto")
    if not isinstance(tools, list) or not tools or choice == "none":
        return None
    functions = [t.get("function") for t in tools if isinstance(t, dict)]
    named = [f for f in functions if isinstance(f, dict) and isinstance(f.get("name"), str)]
    if not named:
        raise ApiError(ErrorKind.INVALID_PARAM, "Each tool needs a function with a name.", "tools")
    if isinstance(choice, dict):
        wanted = (choice.get("function") or {}).get("name")
        for function in named:
            if function["name"] == wanted:
                return function["name"], function.get("parameters"), True
        raise ApiError(
            ErrorKind.INVALID_PARAM, f"Tool '{wanted}' is not in 'tools'.", "tool_choice"
        )
    return named[0]["name"], named[0].get("parameters"), False


def fake_arguments(schema: Any) -> JsonObj:
    """Deterministic arguments: a plain value for each required property."""
    if not isinstance(schema, dict) or not isinstance(schema.get("properties"), dict):
        return {}
    required = schema.get("required")
    wanted = set(required) if isinstance(required, list) else set()
    out: JsonObj = {}
    for name, prop in schema["properties"].items():
        if name in wanted:
            out[name] = _fake_value(prop)
    return out


def _fake_value(prop: Any) -> Any:
    if not isinstance(prop, dict):
        return "fake"
    if isinstance(prop.get("enum"), list) and prop["enum"]:
        return prop["enum"][0]
    kind = prop.get("type")
    values: dict[str, Any] = {
        "integer": 1,
        "number": 1,
        "boolean": True,
        "array": [],
        "object": {},
        "null": None,
    }
    return values.get(kind, "fake") if isinstance(kind, str) else "fake"


def plan_completion(
    request: ChatRequest,
    config: FakeConfig,
    pacing: Pacing,
    *,
    completion_id: str,
    created: int,
    new_tool_call_id: Callable[[], str],
    format_arguments: Callable[[JsonObj], str],
) -> Completion:
    """Decide the reply of one request: tokens or a tool call, finish reason, usage."""
    limit = request.max_tokens
    tool_call: ToolCallPlan | None = None
    tokens: list[str] = []
    if request.tool is not None:
        name, schema, named = request.tool
        arguments = format_arguments(fake_arguments(schema))
        fragments = _ARG_TOKEN_RE.findall(arguments)
        # The function name costs a token too, so the cut leaves room for it.
        cut = limit is not None and len(fragments) + 1 > limit
        if cut and limit is not None:
            fragments = fragments[: max(limit - 1, 0)]
        ids = tuple(new_tool_call_id() for _ in range(request.n))
        tool_call = ToolCallPlan(name, "".join(fragments), tuple(fragments), ids)
        # OpenAI (and vLLM after it) report "stop" for a forced named tool.
        finish = "length" if cut else ("stop" if named else "tool_calls")
        per_choice = len(fragments) + 1
    else:
        tokens = (
            echo_tokens(request.messages) if config.echo else reply_tokens(config, pacing.tokens)
        )
        cut = limit is not None and len(tokens) > limit
        if cut and limit is not None:
            tokens = tokens[:limit]
        finish = "length" if cut else "stop"
        per_choice = len(tokens)
    return Completion(
        id=completion_id,
        created=created,
        model=request.model,
        n=request.n,
        include_usage=request.include_usage,
        include_obfuscation=request.include_obfuscation,
        tokens=tuple(tokens),
        tool_call=tool_call,
        finish_reason=finish,
        prompt_tokens=count_prompt_tokens(request.messages),
        completion_tokens=per_choice * request.n,
        top_logprobs=request.top_logprobs if tool_call is None else None,
    )
