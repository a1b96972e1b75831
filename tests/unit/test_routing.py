"""choose_route as a table: model name and registry state in, route out."""

from __future__ import annotations

import orjson
import pytest

from services.dispatcher.routing import (
    AgentView,
    AnswerDummy,
    AwaitRegistry,
    ProviderRule,
    Refuse,
    ToAgent,
    ToProvider,
    choose_route,
    warming_up_error,
)
from shared.errors import ModelNotFoundError, ServiceUnavailableError, to_openai_error

AGENTS = AgentView(live=frozenset({"local_a"}), known=frozenset({"local_a", "local_dead"}))
OPENAI = (ProviderRule("openai/", "openai"), ProviderRule("", "openai"))


@pytest.mark.parametrize(
    ("model", "providers", "expected"),
    [
        ("dummy", (), AnswerDummy()),
        ("dummy", OPENAI, AnswerDummy()),
        ("local_a", (), ToAgent("local_a")),
        ("local_a", OPENAI, ToAgent("local_a")),
        ("openai/gpt-4o", OPENAI, ToProvider("openai", "gpt-4o")),
        ("gpt-4o", OPENAI, ToProvider("openai", "gpt-4o")),
    ],
)
def test_routes(model: str, providers: tuple[ProviderRule, ...], expected: object) -> None:
    assert choose_route(model, AGENTS, providers) == expected


def test_known_local_model_without_live_agent_is_503_with_retry_after() -> None:
    route = choose_route("local_dead", AGENTS, OPENAI)
    assert isinstance(route, Refuse)
    assert isinstance(route.error, ServiceUnavailableError)
    assert route.error.headers["retry-after"] == "1"


@pytest.mark.parametrize(
    ("model", "providers"),
    [
        ("local_never_seen", OPENAI),
        ("gpt-4o", ()),
        ("openai/", (ProviderRule("openai/", "openai"),)),
    ],
)
def test_unservable_models_are_404(model: str, providers: tuple[ProviderRule, ...]) -> None:
    route = choose_route(model, AGENTS, providers)
    assert isinstance(route, Refuse)
    assert isinstance(route.error, ModelNotFoundError)
    assert route.error.param is None  # as OpenAI's chat endpoint: the retrieve's says "model"


def test_an_unknown_model_is_answered_as_openais_chat_endpoint_answers_it() -> None:
    route = choose_route("local_nope", AGENTS, OPENAI)
    assert isinstance(route, Refuse)
    status, body, _ = to_openai_error(route.error)
    assert status == 404
    assert orjson.loads(body) == {
        "error": {
            "message": "The model `local_nope` does not exist or you do not have access to it.",
            "type": "invalid_request_error",
            "param": None,
            "code": "model_not_found",
        }
    }


def test_unknown_local_model_while_warming_up_waits_for_the_registry_not_404() -> None:
    warming = AgentView(live=frozenset(), known=frozenset(), warming_up=True)
    assert choose_route("local_new", warming) == AwaitRegistry("local_new")
    assert warming_up_error().code == "registry_warming_up"
