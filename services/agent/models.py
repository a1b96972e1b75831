"""Which router-facing `local*` model ids this agent serves, and their names on its server.

The rule (one prefix, applied one way):
- `AGENT_MODELS` empty: every model the server lists at `/v1/models` is exposed as
  `local_<served name>`.
- `local_x=served-x`: the router id `local_x` is served as `served-x` (the id must start
  with `local`).
- `local_x` (starts with `local_`): served as `x`.
- `x` (anything else): served as `x`, exposed as `local_x`.

Clients always see the router id: requests are rewritten to the served name on the way in, and
every response body and stream chunk carries the router id on the way out.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from shared.messages import LOCAL_MODEL_PATTERN, MAX_AGENT_MODELS

PREFIX = "local_"
_LOCAL_MODEL_RE = re.compile(LOCAL_MODEL_PATTERN)


class ModelConfigError(ValueError):
    """AGENT_MODELS (or the server's model list) names a model the router cannot carry."""


@dataclass(frozen=True)
class ModelMap:
    """Router id -> served name, in configuration order."""

    served: Mapping[str, str]

    def __post_init__(self) -> None:
        # The API refuses a registration of more: an agent that started anyway would take
        # its models' jobs while the registry never lists it.
        if len(self.served) > MAX_AGENT_MODELS:
            raise ModelConfigError(
                f"{len(self.served)} models, but an agent serves at most {MAX_AGENT_MODELS}: "
                "name the ones to serve in AGENT_MODELS"
            )

    @property
    def router_ids(self) -> list[str]:
        return list(self.served)

    def served_name(self, router_id: str) -> str | None:
        return self.served.get(router_id)

    def __bool__(self) -> bool:
        return bool(self.served)


def _checked(router_id: str) -> str:
    if not _LOCAL_MODEL_RE.match(router_id):
        raise ModelConfigError(f"not a valid local model id: {router_id!r}")
    return router_id


def parse_agent_models(text: str) -> ModelMap:
    """Parse `AGENT_MODELS`; an empty map means "ask the server". Raises ModelConfigError."""
    served: dict[str, str] = {}
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        router_id, sep, name = (part.strip() for part in item.partition("="))
        if sep:
            if not name:
                raise ModelConfigError(f"AGENT_MODELS entry without a served name: {item!r}")
            if not router_id.startswith("local"):
                raise ModelConfigError(f"router model ids must start with `local`: {item!r}")
        elif router_id.startswith(PREFIX):
            name = router_id[len(PREFIX) :]
        else:
            router_id, name = PREFIX + router_id, router_id
        if not name:
            raise ModelConfigError(f"AGENT_MODELS entry without a served name: {item!r}")
        if router_id in served:
            raise ModelConfigError(f"model {router_id!r} is listed twice in AGENT_MODELS")
        served[_checked(router_id)] = name
    return ModelMap(served)


def discovered_models(served_names: Iterable[str]) -> tuple[ModelMap, list[str]]:
    """Expose each served name as `local_<name>`; also returns the names that cannot be."""
    served: dict[str, str] = {}
    skipped: list[str] = []
    for name in served_names:
        router_id = PREFIX + name
        if _LOCAL_MODEL_RE.match(router_id):
            served[router_id] = name
        else:
            skipped.append(name)
    return ModelMap(served), skipped


def served_names_from_listing(listing: object) -> list[str]:
    """The ids of an OpenAI `/v1/models` answer (`{"object":"list","data":[{"id":..}]}`)."""
    if not isinstance(listing, dict) or not isinstance(listing.get("data"), list):
        raise ModelConfigError("the server's /v1/models answer is not a model list")
    return [
        entry["id"]
        for entry in listing["data"]
        if isinstance(entry, dict) and isinstance(entry.get("id"), str) and entry["id"]
    ]
