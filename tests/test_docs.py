"""The configuration reference covers every field of every config model."""

from __future__ import annotations

import re

from pydantic import BaseModel

from evoray import config as cfgmod
from evoray.cli import main
from evoray.docs import config_reference, model_sections


def _all_models() -> list[type[BaseModel]]:
    """Every config model defined in evoray.config (the Base class itself excluded)."""
    return [obj for obj in vars(cfgmod).values()
            if isinstance(obj, type) and issubclass(obj, cfgmod.Base) and obj is not cfgmod.Base]


def _sections(md: str) -> dict[str, str]:
    parts = re.split(r"^### ", md, flags=re.M)[1:]
    return {p.splitlines()[0].strip(): p for p in parts}


def test_every_model_is_reached_from_jobconfig():
    reached = {m for _, m in model_sections()}
    missing = [m.__name__ for m in _all_models() if m not in reached]
    assert not missing, f"config models not in the reference: {missing}"


def test_every_field_of_every_model_has_a_row():
    md = config_reference()
    sections = _sections(md)
    for path, model in model_sections():
        title = f"`{path}`" if path else "Top level"
        body = sections[title]
        for name, field in model.model_fields.items():
            row = next((ln for ln in body.splitlines() if ln.startswith(f"| `{name}` |")), None)
            assert row is not None, f"{title}: no row for {name}"
            assert field.description and field.description.split(";")[0][:30].replace("|", "\\|") in row, (title, name)
            assert row.count(" | ") >= 3  # key, type, default, description


def test_nested_sections_and_defaults():
    md = config_reference()
    s = _sections(md)
    assert "`providers[]`" in s and "`providers[].price`" in s and "`rate`" in s and "`optimize`" in s
    assert "A list; each entry is a `ProviderConfig`" in s["`providers[]`"]
    assert "| `threshold` | float | `4.5` |" in s["`rate`"]
    assert "| `name` | string | **required** |" in s["`providers[]`"]
    assert "openai \\| anthropic \\| local" in s["`providers[]`"]


def test_cli_prints_the_reference(capsys):
    assert main(["config-reference"]) == 0
    assert capsys.readouterr().out.strip() == config_reference().strip()
