"""Hostile request bodies at the edge, and hostile registrations on their way to SQLite."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from services.api.guards import REDIRECT_FIELDS, refuse_redirects
from services.api.validation import ChatRequestParser, EdgeLimits
from services.dispatcher.registry import AgentRecord, SqliteStore
from shared.errors import InvalidRequestError
from shared.messages import AgentHeartbeat, AgentRegistration

MESSAGES = [{"role": "user", "content": "hi"}]


def body(**fields: Any) -> bytes:
    return json.dumps({"model": "dummy", "messages": MESSAGES, **fields}).encode()


def refused(raw: bytes, parser: ChatRequestParser | None = None) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as info:
        (parser or ChatRequestParser()).parse(raw)
    assert info.value.status == 400
    return info.value


# --- encoding ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model": "dummy", "messages": [{"role": "user", "content": "\\ud800"}]}',
        b'{"model": "dummy", "messages": [{"role": "user", "content": "a\\udfffb"}]}',
        b'{"model": "dummy", "messages": [{"role": "user", "content": "\\ud800\\u0041"}]}',
        b'{"model": "dummy", "messages": [{"role": "user", "content": "x"}], "\\udc00": 1}',
        b'{"model": "dummy", "messages": [{"role": "user", "content": [{"t": {"\\ud83d": 1}}]}]}',
        b'{"model": "dummy", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
        b'{"model": "dummy", "messages": [{"role": "user", "content": "\xed\xa0\x80"}]}',
        b'{"model": "dummy\xc0\xaf", "messages": [{"role": "user", "content": "x"}]}',
        b'{"model": "dummy", "messages": [{"role": "user", "content": "x"}], "k\x80": 1}',
        b'{"model": "dummy", "messages": [{"role": "user", "content": "x"}], "n": 1e400}',
        b"[" * 2000 + b"]" * 2000,
    ],
)
def test_invalid_utf8_and_lone_surrogates_are_400(raw: bytes) -> None:
    assert refused(raw).code in ("invalid_json", "invalid_type")


def test_paired_surrogates_and_odd_unicode_pass_untouched() -> None:
    raw = (
        b'{"model": "dummy", "messages": [{"role": "user", "content": "\\ud83d\\ude00 \xf0\x9f\x98'
        b'\x80 \\u0000 \xe2\x80\xae"}]}'
    )
    assert ChatRequestParser().parse(raw).body is raw


# --- limits ------------------------------------------------------------------------------------


def test_too_many_messages() -> None:
    parser = ChatRequestParser(EdgeLimits(max_messages=3))
    parser.parse(orjson.dumps({"model": "dummy", "messages": MESSAGES * 3}))
    error = refused(orjson.dumps({"model": "dummy", "messages": MESSAGES * 4}), parser)
    assert (error.param, error.code) == ("messages", "array_above_max_length")


def test_the_default_message_limit_is_2048() -> None:
    ChatRequestParser().parse(orjson.dumps({"model": "dummy", "messages": MESSAGES * 2048}))
    refused(orjson.dumps({"model": "dummy", "messages": MESSAGES * 2049}))


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_token_limits(field: str) -> None:
    parser = ChatRequestParser(EdgeLimits(max_tokens=1000))
    parser.parse(body(**{field: 1000}))
    error = refused(body(**{field: 1001}), parser)
    assert (error.param, error.code) == (field, "integer_above_max_value")
    assert refused(body(**{field: 0}), parser).code == "integer_below_min_value"
    assert refused(body(**{field: 10**30}), parser).param == field


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": 129}, "n"),
        ({"n": 0}, "n"),
        ({"seed": 2**63 - 1023}, "seed"),
        ({"seed": -(2**63)}, "seed"),
        ({"seed": 9.3e18}, "seed"),
        ({"temperature": 2.5}, "temperature"),
    ],
)
def test_numeric_bounds_name_the_param(fields: dict[str, Any], param: str) -> None:
    assert refused(body(**fields)).param == param


# --- fields that would redirect traffic --------------------------------------------------------


@pytest.mark.parametrize("field", sorted(REDIRECT_FIELDS))
def test_redirect_fields_are_refused_at_the_top(field: str) -> None:
    error = refused(body(**{field: "https://evil.example"}))
    assert (error.param, error.code) == (field, "unsupported_parameter")


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"extra_body": {"api_base": "https://evil.example"}}, "extra_body.api_base"),
        ({"extra_body": {"extra_headers": {"x": "y"}}}, "extra_body.extra_headers"),
        (
            {"extra_body": {"ok": 1, "extra_body": {"api_key": "k"}}},
            "extra_body.extra_body.api_key",
        ),
        ({"extra_body": "api_base=https://evil.example"}, "extra_body"),
        ({"extra_body": [{"api_base": "x"}]}, "extra_body"),
    ],
)
def test_redirect_fields_are_refused_inside_extra_body(extra: dict[str, Any], param: str) -> None:
    assert refused(body(**extra)).param == param


def test_deeply_nested_extra_body_is_refused() -> None:
    nested: dict[str, Any] = {}
    for _ in range(40):
        nested = {"extra_body": nested}
    refused(body(**nested))


@pytest.mark.parametrize(
    "fields",
    [
        {"extra_body": {"top_k": 5}},
        {"extra_body": None},
        {"metadata": {"api_key": "a user's own data"}},
        {"API_BASE": "names match exactly"},
        {
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": "f",
                        "parameters": {"type": "object", "properties": {"api_key": {}}},
                    },
                }
            ]
        },
    ],
)
def test_lookalikes_elsewhere_pass_through(fields: dict[str, Any]) -> None:
    raw = body(**fields)
    assert ChatRequestParser().parse(raw).body is raw
    refuse_redirects(orjson.loads(raw))


# --- the OpenAPI document states the same rules ------------------------------------------------


def test_schema_carries_the_limits_and_the_refusals() -> None:
    schema, components = ChatRequestParser(EdgeLimits(max_messages=7, max_tokens=99)).json_schema()
    properties = schema["properties"]
    assert properties["messages"]["maxItems"] == 7
    assert {"type": "integer", "minimum": 1, "maximum": 99} in properties["max_tokens"]["anyOf"]
    assert all(properties[field] is False for field in REDIRECT_FIELDS)
    assert schema["additionalProperties"] is True
    assert all(components["ExtraBody"]["properties"][f] is False for f in REDIRECT_FIELDS)
    assert "$defs" not in schema
    assert {"ChatMessage", "StreamOptions", "ExtraBody"} <= set(components)


# --- registrations -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        {"name": "a" * 65, "models": ["local_m"]},
        {"name": "a\n", "models": ["local_m"]},
        {"name": "a b", "models": ["local_m"]},
        {"name": "-a", "models": ["local_m"]},
        {"name": "ägent", "models": ["local_m"]},
        {"name": "a'; DROP TABLE agents;--", "models": ["local_m"]},
        {"name": "a", "models": []},
        {"name": "a", "models": ["gpt-4o"]},
        {"name": "a", "models": ["local_" + "m" * 200]},
        {"name": "a", "models": ["local m"]},
        {"name": "a", "models": ["local_m\n"]},
        {"name": "a", "models": [f"local_{i}" for i in range(65)]},
        {"name": "a", "models": ["local_m"], "endpoint": "http://x/" + "y" * 600},
        {"name": "a", "models": ["local_m"], "endpoint": "http://x y"},
        {"name": "a", "models": ["local_m"], "endpoint": "http://x/\u202e"},
        {"name": "a", "models": ["local_m"], "token": "smuggled"},
    ],
)
def test_registrations_are_bounded(payload: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        AgentRegistration.model_validate(payload)


@pytest.mark.parametrize(
    "payload",
    [
        {"name": "a", "load": -1},
        {"name": "a", "load": 1e7},
        {"name": "a", "load": True},
        {"name": "a", "load": "5"},
        {"name": "a", "models": ["local_m"] * 65},
        {"name": "a", "extra": 1},
    ],
)
def test_heartbeats_are_bounded(payload: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        AgentHeartbeat.model_validate(payload)


def test_registry_sql_is_parameterised(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite3"
    store = SqliteStore(str(path))
    hostile = "x'); DROP TABLE agent_processes; --"
    record = AgentRecord(
        name=hostile,
        endpoint="http://a/?q=' OR '1'='1",
        models=("local_a'--", 'local_"b"'),
        registered_at=1.0,
        last_heartbeat=2.0,
    )
    store.save(record)
    store.save(record)  # the upsert path too
    assert store.load_all() == [record]
    store.close()
    with sqlite3.connect(path) as db:
        tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master")]
    assert "agent_processes" in tables


def test_registry_source_builds_no_sql_from_values() -> None:
    import inspect

    from services.dispatcher import registry

    source = inspect.getsource(registry.SqliteStore)
    assert "execute(f" not in source and ".format(" not in source and "% (" not in source


@pytest.mark.parametrize("seed", [b"9223372036854774784", b"-9223372036854774784", b"0"])
def test_every_seed_the_schema_allows_is_accepted(seed: bytes) -> None:
    ChatRequestParser().parse(body_with("seed", seed.decode()))


@pytest.mark.parametrize("field", ["n", "max_tokens", "max_completion_tokens", "seed"])
@pytest.mark.parametrize("value", ['"2"', "true", "false", "2.5", "[2]"])
def test_integers_are_strict(field: str, value: str) -> None:
    """As OpenAI: no coercion (the body travels as sent, so `"2"` would reach the upstream)."""
    assert refused(body_with(field, value)).param == field


@pytest.mark.parametrize("field", ["temperature", "top_p"])
@pytest.mark.parametrize("value", ['"0.5"', "true", "false", "[0.5]"])
def test_numbers_are_strict(field: str, value: str) -> None:
    assert refused(body_with(field, value)).param == field


@pytest.mark.parametrize(
    ("field", "value"),
    [("temperature", "1"), ("top_p", "0.5"), ("n", "2"), ("n", "2.0"), ("seed", "-3.0")],
)
def test_plain_numbers_pass(field: str, value: str) -> None:
    ChatRequestParser().parse(body_with(field, value))


def body_with(field: str, value: str) -> bytes:
    return f'{{"model": "dummy", "messages": [{{"role": "user"}}], "{field}": {value}}}'.encode()
