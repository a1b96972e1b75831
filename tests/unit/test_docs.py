"""Docs stay true: every setting any service reads is in the README's configuration table, every
row is read by some service, and a plain default there is the code's."""

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


def readme_rows() -> dict[str, str]:
    """Each row of the configuration table: variable -> its "default" cell."""
    readme = (ROOT / "README.md").read_text()
    row = re.compile(r"^\| `([A-Z0-9_]+)` \| [^|]+ \| (.+?) \| .+ \|$", flags=re.MULTILINE)
    return {match[1]: match[2].strip() for match in row.finditer(readme)}


def code_defaults() -> dict[str, set[str]]:
    """Each variable -> its default in every settings class that reads it, as README text."""

    def as_text(value: object) -> str:
        value = getattr(value, "get_secret_value", lambda: value)()
        value = getattr(value, "value", value)  # an enum
        if isinstance(value, bool):
            return str(value).lower()
        if isinstance(value, float) and value.is_integer():
            return str(int(value))
        return str(value)

    defaults: dict[str, set[str]] = {}
    for module, name in SETTINGS:
        settings_class: type[BaseSettings] = getattr(importlib.import_module(module), name)
        for field, info in settings_class.model_fields.items():
            defaults.setdefault(field.upper(), set()).add(as_text(info.default))
    return defaults


def test_every_readme_row_is_read_and_plain_defaults_match_the_code() -> None:
    """A row's default written as one literal (`5`, `durable`, or "empty") must be the code's;
    defaults that need words (a derived value, several cases) are left to the reader."""
    rows, defaults = readme_rows(), code_defaults()
    assert not sorted(set(rows) - set(defaults)), "README rows no service reads"
    wrong, compared = [], 0
    for variable, cell in rows.items():
        literal = re.fullmatch(r"`([^`<]*)`", cell)  # `router-vllm-<AGENT_NAME>` is derived
        if cell != "empty" and literal is None:
            continue
        compared += 1
        documented = "" if cell == "empty" else literal[1] if literal else cell
        if defaults[variable] != {documented}:
            wrong.append(f"{variable}: README {documented!r}, code {sorted(defaults[variable])}")
    assert not wrong, "\n".join(wrong)
    assert compared > len(rows) / 2  # most rows are plain: the check is not vacuous


def readers() -> dict[str, set[str]]:
    """Each variable -> the services whose settings read it (`api`, `dispatcher`, `agent`)."""
    read: dict[str, set[str]] = {}
    for module, name in SETTINGS:
        settings_class: type[BaseSettings] = getattr(importlib.import_module(module), name)
        service = module.split(".")[1]
        for field in settings_class.model_fields:
            read.setdefault(field.upper(), set()).add(service)
    return read


def test_the_readme_names_the_services_that_read_each_variable() -> None:
    """The table's second column (`api, dispatcher`, or `all`) is exactly who reads a variable:
    an operator sets it on those services, and only there."""
    readme = (ROOT / "README.md").read_text()
    row = re.compile(r"^\| `([A-Z0-9_]+)` \| ([^|]+) \|", flags=re.MULTILINE)
    every = {module.split(".")[1] for module, _ in SETTINGS}
    read = readers()
    wrong = []
    for variable, cell in row.findall(readme):
        named = every if cell.strip() == "all" else {s.strip() for s in cell.split(",")}
        if named != read.get(variable, set()):
            wrong.append(f"{variable}: README {sorted(named)}, read by {sorted(read[variable])}")
    assert not wrong, "\n".join(wrong)
