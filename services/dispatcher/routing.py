"""Where a job goes: a pure function of its model and what the router knows.

No broker, HTTP or database here: `choose_route` is unit-tested as a table.
"""

from __future__ import annotations

from collections.abc import Set
from dataclasses import dataclass

from shared.errors import ModelNotFoundError, RouterError, ServiceUnavailableError

DUMMY_MODEL = "dummy"
LOCAL_PREFIX = "local"


@dataclass(frozen=True, slots=True)
class AnswerDummy:
    """The dispatcher answers itself with the placeholder."""


@dataclass(frozen=True, slots=True)
class ToAgent:
    model: str


@dataclass(frozen=True, slots=True)
class ToProvider:
    provider: str
    upstream_model: str


@dataclass(frozen=True, slots=True)
class Refuse:
    error: RouterError


@dataclass(frozen=True, slots=True)
class AwaitRegistry:
    """A local model this dispatcher has not heard of while it warms up: its agents' next
    heartbeat may simply not have reached it yet (a dispatcher just added, a fresh file)."""

    model: str


Route = AnswerDummy | ToAgent | ToProvider | Refuse | AwaitRegistry


def is_unknown(route: Route) -> bool:
    """A model the router does not serve at all (404): no cached answer is given for it either,
    so a model retired from the router stops answering at once, as `/v1/models` says."""
    return isinstance(route, Refuse) and isinstance(route.error, ModelNotFoundError)


def warming_up_error() -> RouterError:
    return ServiceUnavailableError(
        "This dispatcher is still learning which agents are alive; retry shortly.",
        code="registry_warming_up",
        headers={"retry-after": "1"},
    )


@dataclass(frozen=True, slots=True)
class AgentView:
    """What the registry says about local models at one moment (read it at once: the
    registry may hand out live views of its own index, not copies)."""

    live: Set[str]
    known: Set[str]
    # True for one heartbeat TTL after the dispatcher started: an unknown model may belong to
    # an agent whose next heartbeat has not arrived yet, so it is not a 404 yet.
    warming_up: bool = False


@dataclass(frozen=True, slots=True)
class ProviderRule:
    """Models named `<prefix><name>` go to `provider` as `<name>` (prefix "" = any model)."""

    prefix: str
    provider: str


def choose_route(model: str, agents: AgentView, providers: tuple[ProviderRule, ...] = ()) -> Route:
    if model == DUMMY_MODEL:
        return AnswerDummy()
    if model.startswith(LOCAL_PREFIX):
        if model in agents.live:
            return ToAgent(model)
        if model in agents.known:
            return Refuse(
                ServiceUnavailableError(
                    f"No live agent serves `{model}` right now; retry shortly.",
                    code="no_live_agent",
                    headers={"retry-after": "1"},
                )
            )
        if agents.warming_up:
            return AwaitRegistry(model)
        return Refuse(ModelNotFoundError(model))
    for rule in providers:
        if model.startswith(rule.prefix) and len(model) > len(rule.prefix):
            return ToProvider(rule.provider, model[len(rule.prefix) :])
    return Refuse(ModelNotFoundError(model))
