"""The configuration reference, generated from the pydantic models of :mod:`evoray.config`.

``evoray config-reference`` prints :func:`config_reference` (Markdown); the README's
"Configuration reference" is this text, so it cannot drift from the code: each section is a table
of key, type, default and description taken from the models' fields and ``Field(description=...)``.
Nested models get their own section (``rate``, ``optimize``, ``providers[].price``, ...);
``providers`` is a list of :class:`~evoray.config.ProviderConfig`.
"""

from __future__ import annotations

import json
import types
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from .config import JobConfig

_INTRO = (
    "Every key below can be set in the YAML config or overridden on the command line with "
    "`--set key.path=value`. Unknown keys are errors that name the key. Secrets never go in the "
    "config: a provider names the environment variable that holds its key (`api_key_env`)."
)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation (``Model``, ``list[Model]``, ``Model | None``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        m = _model_in(arg)
        if m is not None:
            return m
    return None


def type_name(annotation: Any) -> str:
    """A short readable name of a field's type (``int | null``, ``list[string]``, ``openai | anthropic``)."""
    if annotation is None or annotation is type(None):
        return "null"
    origin = get_origin(annotation)
    if origin is Literal:
        return " | ".join(str(a) for a in get_args(annotation))
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in get_args(annotation))
    if origin in (list, tuple, set, frozenset):
        args = get_args(annotation)
        return f"list[{type_name(args[0]) if args else 'any'}]"
    if origin is dict:
        args = get_args(annotation)
        return f"map[{type_name(args[0])}, {type_name(args[1])}]" if args else "map"
    if isinstance(annotation, type):
        if issubclass(annotation, BaseModel):
            return annotation.__name__
        return {str: "string", int: "int", float: "float", bool: "bool"}.get(annotation, annotation.__name__)
    return str(annotation).replace("typing.", "")


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        try:
            value = field.default_factory()
        except TypeError:  # factories that take the validated data
            return "(computed)"
    elif field.default is PydanticUndefined:
        return "**required**"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "see below"
    if isinstance(value, list) and value and isinstance(value[0], BaseModel):
        return "`" + json.dumps([v.model_dump(exclude_defaults=True) for v in value]) + "`"
    return "`" + json.dumps(value, default=str) + "`"


def _cell(text: str) -> str:
    return (text or "").replace("|", "\\|").replace("\n", " ")


def _walk(model: type[BaseModel], path: str, out: list[tuple[str, type[BaseModel]]], seen: set) -> None:
    key = (path, model)
    if key in seen:
        return
    seen.add(key)
    out.append((path, model))
    for name, field in model.model_fields.items():
        sub = _model_in(field.annotation)
        if sub is not None:
            _walk(sub, _child_path(path, name, field), out, seen)


def model_sections(root: type[BaseModel] = JobConfig) -> list[tuple[str, type[BaseModel]]]:
    """(key path, model) of the root and every nested model, depth first (``""`` is the root)."""
    out: list[tuple[str, type[BaseModel]]] = []
    _walk(root, "", out, set())
    return out


def _section(path: str, model: type[BaseModel]) -> str:
    title = f"`{path}`" if path else "Top level"
    lines = [f"### {title}", ""]
    doc = (model.__doc__ or "").strip().splitlines()
    if path.endswith("[]"):
        lines.append(f"A list; each entry is a `{model.__name__}` with these keys.")
        lines.append("")
    elif doc and not doc[0].startswith(("Base of every", "Usage docs", "!!!")) and path:
        lines.append(doc[0])
        lines.append("")
    lines += ["| key | type | default | description |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        desc = field.description or ""
        sub = _model_in(field.annotation)
        if sub is not None:
            desc += f" (see `{_child_path(path, name, field)}`)"
        lines.append(f"| `{name}` | {_cell(type_name(field.annotation))} | {_cell(_default(field))} | {_cell(desc)} |")
    return "\n".join(lines)


def _child_path(path: str, name: str, field: FieldInfo) -> str:
    is_list = get_origin(field.annotation) in (list, tuple)
    base = f"{path}.{name}" if path else name
    return base + ("[]" if is_list else "")


def config_reference(root: type[BaseModel] = JobConfig) -> str:
    """Markdown: an intro, then one table per config model (key, type, default, description)."""
    parts = ["## Configuration reference", "", _INTRO, "",
             "<!-- generated by `evoray config-reference` from evoray/config.py; do not edit by hand -->", ""]
    for path, model in model_sections(root):
        parts.append(_section(path, model))
        parts.append("")
    return "\n".join(parts).rstrip() + "\n"


__all__ = ["config_reference", "model_sections", "type_name"]
