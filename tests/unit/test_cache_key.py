"""Cache keys, Cache-Control and the cacheability plan: pure functions, read as a specification."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from services.dispatcher.cache_key import (
    BYPASS,
    CachePlan,
    CachePolicy,
    cache_key,
    canonical_request,
    done_channel,
    is_deterministic,
    lock_key,
    plan_request,
    tenant_scope,
)
from shared.http_headers import CacheControl, parse_cache_control

POLICY = CachePolicy(prefix="router:cache:v1", ttl=3600)
BASE: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def key(data: dict[str, Any], tenant: str = "t1", policy: CachePolicy = POLICY) -> str:
    return cache_key(data, tenant=tenant, policy=policy)


@pytest.mark.parametrize(
    "extra",
    [
        {"stream": True},
        {"stream": True, "stream_options": {"include_usage": True}},
        {"user": "u-42"},
        {"safety_identifier": "s"},
        {"metadata": {"run": "7"}},
        {"store": True},
        {"prompt_cache_key": "pk"},
    ],
)
def test_transport_and_metadata_fields_do_not_change_the_key(extra: dict[str, Any]) -> None:
    assert key({**BASE, **extra}) == key(BASE)


@pytest.mark.parametrize(
    "extra",
    [
        {"temperature": 0.5},
        {"seed": 1},
        {"max_tokens": 10},
        {"n": 2},
        {"tools": [{"type": "function", "function": {"name": "f"}}]},
        {"response_format": {"type": "json_object"}},
        {"some_future_parameter": True},  # unknown fields count: they may change the answer
        {"model": "other"},
        {"messages": [{"role": "user", "content": "hello"}]},
    ],
)
def test_everything_else_changes_the_key(extra: dict[str, Any]) -> None:
    assert key({**BASE, **extra}) != key(BASE)


def test_a_parameter_set_to_null_is_the_same_key_as_one_left_out() -> None:
    """The SDKs send `"seed": null` for `seed=None`, which OpenAI reads as no seed: a request
    with it missed the entry of the same request without it (review 2026-11-29)."""
    nulls = {"seed": None, "stop": None, "max_tokens": None, "temperature": None}
    assert key({**BASE, **nulls}) == key(BASE)
    # Not every field: vLLM makes an absent `tool_choice` "auto" when tools are given, not a
    # null one; and a parameter the router does not know may mean anything by null.
    tools = {**BASE, "tools": [{"type": "function", "function": {"name": "f"}}]}
    assert key({**tools, "tool_choice": None}) != key(tools)
    assert key({**BASE, "future": None}) != key(BASE)
    # Only parameters: a null inside a message is part of what was said.
    message = {"role": "assistant", "content": None, "tool_calls": []}
    assert key({**BASE, "messages": [message]}) != key(
        {**BASE, "messages": [{"role": "assistant", "tool_calls": []}]}
    )


def test_key_order_and_integral_floats_do_not_matter() -> None:
    one = {"temperature": 0, "messages": [{"content": "hi", "role": "user"}], "model": "m"}
    two = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.0}
    assert canonical_request(one) == canonical_request(two)
    assert key(one) == key(two)
    assert key({**BASE, "temperature": 0.5}) != key({**BASE, "temperature": 0})


def test_canonical_request_is_sorted_compact_json() -> None:
    assert canonical_request({"b": 1, "a": {"d": 2.0, "c": [1.5]}, "stream": True}) == (
        b'{"a":{"c":[1.5],"d":2},"b":1}'
    )


def test_tenants_never_share_a_key_unless_the_namespace_is_shared() -> None:
    assert key(BASE, "alice") != key(BASE, "bob")
    shared = CachePolicy(prefix="p", ttl=1, shared_namespace=True)
    assert key(BASE, "alice", shared) == key(BASE, "bob", shared)
    assert key(BASE, "alice").startswith("router:cache:v1:alice:")


@pytest.mark.parametrize("tenant", ["a:b", "_shared", "", "x" * 100, "tenant with spaces"])
def test_odd_tenant_names_are_hashed_into_their_own_scope(tenant: str) -> None:
    scope = tenant_scope(tenant)
    assert scope.startswith("_h") and len(scope) == 34
    assert scope != "_shared"
    assert POLICY.model_of(key(BASE, tenant)) == "m"


def test_policy_reads_a_model_only_from_entry_keys_it_could_make() -> None:
    """What the cache writer checks each `job.completed` key with before writing to Redis."""
    entry = key(BASE)
    assert POLICY.model_of(entry) == "m"
    shared = CachePolicy(prefix=POLICY.prefix, ttl=1, shared_namespace=True)
    assert POLICY.model_of(key(BASE, policy=shared)) == "m"
    assert POLICY.model_of(lock_key(entry)) is None
    assert POLICY.model_of(done_channel(entry)) is None
    assert POLICY.model_of("other:cache:v1:t1:m:" + "0" * 64) is None
    assert POLICY.model_of("router:cache:v1:t1:m:xyz") is None


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, CacheControl()),
        ("", CacheControl()),
        ("no-cache", CacheControl(no_cache=True)),
        ("No-Store", CacheControl(no_store=True)),
        ("no-cache, no-store", CacheControl(no_cache=True, no_store=True)),
        ("max-age=0", CacheControl(no_cache=True)),
        ('max-age="0"', CacheControl(no_cache=True)),
        ("max-age=60", CacheControl(max_age=60)),
        ("max-age=00", CacheControl(no_cache=True)),
        ("max-age=60, max-age=5", CacheControl(max_age=5)),
        ("max-age=abc, max-age=-1", CacheControl()),
        ("max-age=" + "9" * 40, CacheControl(max_age=2**31)),
        ("private, no-store , x-other=1", CacheControl(no_store=True)),
        ("no-cacheX", CacheControl()),
    ],
)
def test_cache_control(header: str | None, expected: CacheControl) -> None:
    assert parse_cache_control(header) == expected
    # What the API puts on the job reads the same to the dispatcher.
    assert parse_cache_control(expected.header()) == expected


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({}, False),
        ({"temperature": 0}, True),
        ({"temperature": 0.0}, True),
        ({"temperature": 0.2}, False),
        ({"seed": 7}, True),
        ({"seed": 7.0}, True),  # 7, as the API and the key read it
        ({"seed": 7.5}, False),
        ({"seed": 0, "temperature": 1.5}, True),
        ({"seed": None}, False),
        ({"seed": True}, False),
        ({"temperature": False}, False),
    ],
)
def test_deterministic_means_temperature_zero_or_a_seed(
    extra: dict[str, Any], expected: bool
) -> None:
    assert is_deterministic({**BASE, **extra}) is expected


def plan(
    extra: dict[str, Any] | None = None,
    *,
    stream: bool = False,
    control: str | None = None,
    policy: CachePolicy = POLICY,
    body: bytes | None = None,
) -> CachePlan:
    raw = body if body is not None else orjson.dumps({**BASE, **(extra or {})})
    return plan_request(raw, stream=stream, tenant="t1", cache_control=control, policy=policy)


def test_a_plain_request_is_looked_up_and_stored() -> None:
    p = plan()
    assert p.key == key(BASE) and p.lookup and p.store and not p.deterministic


def test_a_stream_is_looked_up_but_never_stored() -> None:
    p = plan({"stream": True}, stream=True)
    assert p.key == key(BASE) and p.lookup and not p.store


def test_no_cache_skips_the_lookup_and_no_store_the_write() -> None:
    assert plan(control="no-cache") == CachePlan(key(BASE), False, True, False)
    assert plan(control="no-store") == CachePlan(key(BASE), True, False, False)
    assert plan(control="no-cache, no-store") == BYPASS
    assert plan({"stream": True}, stream=True, control="no-cache") == BYPASS


@pytest.mark.parametrize(
    "policy",
    [
        CachePolicy(prefix="p", ttl=0),
        CachePolicy(prefix="p", ttl=60, enabled=False),
    ],
)
def test_an_inactive_cache_bypasses_everything(policy: CachePolicy) -> None:
    assert plan(policy=policy) == BYPASS


def test_deterministic_only_bypasses_sampled_requests() -> None:
    policy = CachePolicy(prefix="p", ttl=60, deterministic_only=True)
    assert plan(policy=policy) == BYPASS
    p = plan({"temperature": 0}, policy=policy)
    assert p.key is not None and p.store and p.deterministic


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b'"x"'])
def test_an_unreadable_body_bypasses(body: bytes) -> None:
    assert plan(body=body) == BYPASS


def test_integers_past_64_bits_bypass_the_cache_rather_than_share_a_key() -> None:
    """orjson reads them as the nearest float, so two such requests would be one key (the API
    bounds `seed`, but not a tool's JSON schema or an unknown field)."""

    def body(literal: str) -> bytes:
        return b'{"model":"m","messages":[],"x_limit":' + literal.encode() + b"}"

    assert plan(body=body("123456789012345678901234567890")) == BYPASS
    assert plan(body=body("-9223372036854775809")) == BYPASS
    # Every integer orjson keeps exactly is still keyed, and each on its own.
    edges = ["18446744073709551615", "-9223372036854775807", "9223372036854775808"]
    keys = {plan(body=body(literal)).key for literal in edges}
    assert None not in keys and len(keys) == len(edges)
