"""The agent's model-name rule: router ids start with `local`, servers know served names."""

from __future__ import annotations

import pytest

from services.agent.models import (
    ModelConfigError,
    discovered_models,
    parse_agent_models,
    served_names_from_listing,
)
from shared.messages import MAX_AGENT_MODELS


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", {}),
        (" , ", {}),
        ("local_mistral-7b=mistralai/Mistral-7B", {"local_mistral-7b": "mistralai/Mistral-7B"}),
        (
            "local_mistral-7b-instruct-q4",
            {"local_mistral-7b-instruct-q4": "mistral-7b-instruct-q4"},
        ),
        ("llama3", {"local_llama3": "llama3"}),
        ("localmodel", {"local_localmodel": "localmodel"}),
        ("localx=served", {"localx": "served"}),
        (
            "a, local_b ,local_c=c-served",
            {"local_a": "a", "local_b": "b", "local_c": "c-served"},
        ),
    ],
)
def test_agent_models_entries(text: str, expected: dict[str, str]) -> None:
    assert dict(parse_agent_models(text).served) == expected


def test_agent_models_keep_their_order() -> None:
    assert parse_agent_models("b,a,local_c").router_ids == ["local_b", "local_a", "local_c"]


@pytest.mark.parametrize(
    "text",
    [
        "gpt-4=served",  # a router id must start with local
        "local_x=",  # no served name
        "local_",  # nothing after the prefix
        "a,local_a",  # the same router id twice
        "bad name",  # a space cannot be in a queue name
    ],
)
def test_agent_models_refuses(text: str) -> None:
    with pytest.raises(ModelConfigError):
        parse_agent_models(text)


def test_discovered_models_are_prefixed_and_unusable_names_skipped() -> None:
    models, skipped = discovered_models(["mistralai/Mistral-7B", "has space", "qwen2"])
    assert dict(models.served) == {
        "local_mistralai/Mistral-7B": "mistralai/Mistral-7B",
        "local_qwen2": "qwen2",
    }
    assert skipped == ["has space"]
    assert models.served_name("local_qwen2") == "qwen2"
    assert models.served_name("local_other") is None


def test_listing_ids() -> None:
    listing = {"object": "list", "data": [{"id": "a", "object": "model"}, {"id": ""}, {"x": 1}]}
    assert served_names_from_listing(listing) == ["a"]
    with pytest.raises(ModelConfigError):
        served_names_from_listing({"data": "nope"})


def test_more_models_than_a_registration_carries_are_refused_at_start() -> None:
    """The API refuses a registration of more than MAX_AGENT_MODELS: a server listing them all
    (every LoRA adapter is a model) must stop the agent with a reason, not start it unlisted."""
    names = [f"adapter-{i}" for i in range(MAX_AGENT_MODELS + 1)]
    with pytest.raises(ModelConfigError, match="AGENT_MODELS"):
        discovered_models(names)
    with pytest.raises(ModelConfigError, match="AGENT_MODELS"):
        parse_agent_models(",".join(names))
    assert len(discovered_models(names[:-1])[0].router_ids) == MAX_AGENT_MODELS
