"""PROVIDER_ROUTES as data: parsing, activation by configured provider, model names."""

from __future__ import annotations

import pytest

from services.dispatcher.providers.routes import (
    DEFAULT_ROUTES,
    active_rules,
    is_listed_alias,
    listed_models,
    parse_provider_routes,
    upstream_model,
)
from services.dispatcher.routing import ProviderRule
from services.dispatcher.settings import DispatcherSettings

OPENAI = (ProviderRule("openai/", "openai"), ProviderRule("", "openai"))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (DEFAULT_ROUTES, OPENAI),
        (" openai/ = openai , ", (ProviderRule("openai/", "openai"),)),
        ("", ()),
        ("oa:=openai,x/=other", (ProviderRule("oa:", "openai"), ProviderRule("x/", "other"))),
    ],
)
def test_parse(text: str, expected: tuple[ProviderRule, ...]) -> None:
    assert parse_provider_routes(text) == expected


@pytest.mark.parametrize("text", ["openai", "openai/=", "a=OpenAI", "a=open ai"])
def test_malformed_routes_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="is not a `prefix=provider` pair"):
        parse_provider_routes(text)


@pytest.mark.parametrize(
    ("routes", "error"),
    [("nonsense", "is not a `prefix=provider` pair"), ("x/=anthropic", "no code for")],
)
def test_malformed_routes_and_unknown_providers_fail_the_settings(routes: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        DispatcherSettings(provider_routes=routes)


def test_rules_of_unconfigured_providers_are_dropped() -> None:
    rules = (*OPENAI, ProviderRule("g/", "google"))
    assert active_rules(rules, ["openai"]) == OPENAI
    assert active_rules(rules, []) == ()


@pytest.mark.parametrize(
    ("model", "rules", "expected"),
    [
        ("openai/gpt-4o", OPENAI, "gpt-4o"),
        ("gpt-4o", OPENAI, "gpt-4o"),
        ("gpt-4o", (ProviderRule("openai/", "openai"),), None),
        ("openai/gpt-4o", (ProviderRule("openai/", "other"), ProviderRule("", "openai")), None),
        ("dummy", OPENAI, None),
        ("local-x", OPENAI, None),
    ],
)
def test_upstream_model(model: str, rules: tuple[ProviderRule, ...], expected: str | None) -> None:
    assert upstream_model(model, rules, "openai") == expected


def test_listed_models_use_the_shortest_prefix_that_routes_back() -> None:
    ids = ["gpt-4o", "gpt-4o-mini", "gpt-4o", "local-llama", "dummy"]
    # `dummy` and `local*` names belong to the router: those upstream models keep the prefix.
    assert listed_models(ids, OPENAI, "openai") == [
        "openai/dummy",
        "gpt-4o",
        "gpt-4o-mini",
        "openai/local-llama",
    ]
    prefixed_only = (ProviderRule("openai/", "openai"),)
    assert listed_models(ids, prefixed_only, "openai") == [
        "openai/dummy",
        "openai/gpt-4o",
        "openai/gpt-4o-mini",
        "openai/local-llama",
    ]
    assert listed_models(ids, (), "openai") == []


@pytest.mark.parametrize(
    ("model", "routes", "listed", "expected"),
    [
        ("openai/gpt-4o", "openai/=openai,=openai", ["gpt-4o"], True),
        ("gpt-4o", "openai/=openai,=openai", ["gpt-4o"], True),
        ("openai/gpt-5", "openai/=openai,=openai", ["gpt-4o"], False),
        ("openai/gpt-4o", "openai/=openai", ["openai/gpt-4o"], True),
        ("gpt-4o", "openai/=openai", ["openai/gpt-4o"], False),  # no rule sends it anywhere
        ("local_gpt-4o", "openai/=openai,=openai", ["gpt-4o"], False),
        ("dummy", "=openai", ["dummy"], False),
    ],
)
def test_a_listed_model_is_found_under_each_name_that_routes_to_it(
    model: str, routes: str, listed: list[str], expected: bool
) -> None:
    assert is_listed_alias(model, listed, parse_provider_routes(routes)) is expected
