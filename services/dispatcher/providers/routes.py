"""Route configuration as data: `PROVIDER_ROUTES` parsed into `ProviderRule`s (pure functions).

`"openai/=openai,=openai"` reads: a model `openai/<name>` goes to OpenAI as `<name>`; any
other model (the empty prefix) goes to OpenAI as it is. Rules are tried in order, after `dummy`
and `local*`; the first match wins. Rules of a provider that is not configured (no key) are
dropped, so its models are 404 `model_not_found`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from services.dispatcher.routing import AgentView, ProviderRule, ToProvider, choose_route

DEFAULT_ROUTES = "openai/=openai,=openai"
KNOWN_PROVIDERS = frozenset({"openai"})  # the providers this router has code for
_PROVIDER_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_NO_AGENTS = AgentView(live=frozenset(), known=frozenset())


def parse_provider_routes(text: str) -> tuple[ProviderRule, ...]:
    """`"p1/=a, =b"` -> (ProviderRule("p1/", "a"), ProviderRule("", "b")).

    Raises ValueError on a pair without `=` or with a bad provider name.
    """
    rules: list[ProviderRule] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        prefix, sep, provider = item.rpartition("=")
        provider = provider.strip()
        if not sep or not _PROVIDER_RE.match(provider):
            raise ValueError(
                f"{item!r} is not a `prefix=provider` pair "
                "(provider in lower case; an empty prefix matches any model)"
            )
        rules.append(ProviderRule(prefix=prefix.strip(), provider=provider))
    return tuple(rules)


def active_rules(
    rules: Iterable[ProviderRule], configured: Iterable[str]
) -> tuple[ProviderRule, ...]:
    """The rules whose provider is configured, in their order."""
    available = frozenset(configured)
    return tuple(rule for rule in rules if rule.provider in available)


def upstream_model(model: str, rules: tuple[ProviderRule, ...], provider: str) -> str | None:
    """The name `provider` knows `model` by, or None if the rules send it elsewhere."""
    route = choose_route(model, _NO_AGENTS, rules)
    if isinstance(route, ToProvider) and route.provider == provider:
        return route.upstream_model
    return None


def is_listed_alias(model: str, listed: Iterable[str], rules: tuple[ProviderRule, ...]) -> bool:
    """Whether `model` reaches a provider model that `listed` names under another prefix:
    `openai/gpt-4o` where the list (one name per model, see `listed_models`) says `gpt-4o`."""
    route = choose_route(model, _NO_AGENTS, rules)
    if not isinstance(route, ToProvider):
        return False
    return any(choose_route(name, _NO_AGENTS, rules) == route for name in listed)


def listed_models(
    upstream_ids: Iterable[str], rules: tuple[ProviderRule, ...], provider: str
) -> list[str]:
    """The names under which a client can ask for each upstream model, for `/v1/models`.

    Each model is listed once, under the shortest prefix whose rule really routes it back to
    `provider` (a bare name with a catch-all rule); a model no rule reaches is left out.
    """
    prefixes = sorted(
        {rule.prefix for rule in rules if rule.provider == provider}, key=lambda p: (len(p), p)
    )
    listed: list[str] = []
    for model in sorted(set(upstream_ids)):
        for prefix in prefixes:
            name = prefix + model
            if upstream_model(name, rules, provider) == model:
                listed.append(name)
                break
    return listed
