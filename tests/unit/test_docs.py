"""Docs stay true: every setting any service reads is in the README's configuration table."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
from pydantic_settings import BaseSettings

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = [
    ("services.api.settings", "ApiSettings"),
    ("services.dispatcher.settings", "DispatcherSettings"),
    ("services.agent.settings", "AgentSettings"),
]


def documented_variables() -> set[str]:
    readme = (ROOT / "README.md").read_text()
    return set(re.findall(r"^\| `([A-Z0-9_]+)` \|", readme, flags=re.MULTILINE))


@pytest.mark.parametrize(("module", "name"), SETTINGS)
def test_every_setting_is_in_the_readme_table(module: str, name: str) -> None:
    settings_class: type[BaseSettings] = getattr(importlib.import_module(module), name)
    variables = {field.upper() for field in settings_class.model_fields}
    missing = sorted(variables - documented_variables())
    assert not missing, f"README configuration table lacks: {missing}"
