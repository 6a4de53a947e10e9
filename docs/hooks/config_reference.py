"""MkDocs hook: the configuration reference, generated from capstream's pydantic schema.

``docs/configuration.md`` holds the marker below; at build time it is replaced by one table per
section of ``capstream.config.Config`` (``dataset``, ``model``, ``prompt``, ``prompts``, ...), each
listing every key by its YAML name, its type, its default as YAML writes it, and the field's
``description``. A key added to the schema appears in the docs without anyone editing them, and
``tests/test_docs.py`` renders this too and checks that every key is there with its default.
"""

from __future__ import annotations

import json
import types
import typing
from typing import Any

import annotated_types
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

MARKER = "<!-- config-reference -->"
PAGE = "configuration.md"

_SCALARS = {str: "string", int: "integer", float: "number", bool: "boolean", type(None): "null"}


def sections() -> list[tuple[str, Any, type[BaseModel]]]:
    """(YAML name, the Config field, the model whose fields are that section's keys), in schema order.

    A section is a model (``dataset: DatasetConfig``) or a mapping of models
    (``prompts: dict[str, PromptConfig] | None``: each entry takes the keys of ``PromptConfig``).
    """
    from capstream.config import Config

    found = []
    for name, field in Config.model_fields.items():
        model = _model_in(field.annotation)
        if model is None:
            raise TypeError(f"Config.{name}: not a section (no pydantic model in {field.annotation!r})")
        found.append((field.alias or name, field, model))
    return found


def keys(model: type[BaseModel]) -> list[tuple[str, Any]]:
    """(YAML name, field) of every key of a section: ``schema``, not ``schema_``."""
    return [(field.alias or name, field) for name, field in model.model_fields.items()]


def yaml_default(field: Any) -> str:
    """The field's default as YAML writes it: ``null``, ``true``, ``1000``, ``60.0``, ``"auto"``;
    ``required`` for a key without one."""
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json", by_alias=True)
    return json.dumps(value, ensure_ascii=False)  # JSON scalars are YAML: null, true, "auto"


def type_name(annotation: Any) -> str:
    """A YAML-minded name for a type: ``integer``, ``string or null``, ``"low", "high" or "auto"``."""
    if annotation is Any:
        return "any"
    if annotation in _SCALARS:
        return _SCALARS[annotation]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return _one_of([type_name(a) for a in args])
    if origin is typing.Literal:
        return _one_of([json.dumps(a) for a in args])
    if origin is list:
        return f"list of {_inner(args[0])}"
    if origin is dict:
        return f"mapping of {_inner(args[0])} to {_inner(args[1])}"
    return getattr(annotation, "__name__", repr(annotation))


def _one_of(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def _inner(annotation: Any) -> str:
    """A type inside another, in brackets when it is a choice: ``list of (string or integer)``."""
    name = type_name(annotation)
    return f"({name})" if typing.get_origin(annotation) in (typing.Union, types.UnionType, typing.Literal) else name


def bounds(field: Any) -> str:
    """The field's numeric constraints: ``≥ 1``, ``> 0``, ``≥ 0, ≤ 2``."""
    signs = {annotated_types.Ge: ("≥", "ge"), annotated_types.Gt: (">", "gt"),
             annotated_types.Le: ("≤", "le"), annotated_types.Lt: ("<", "lt")}
    found = []
    for item in field.metadata:
        for kind, (sign, attr) in signs.items():
            if isinstance(item, kind):
                found.append(f"{sign} {getattr(item, attr)}")
    return ", ".join(found)


def render_section(name: str, field: Any, model: type[BaseModel]) -> str:
    """One section: a heading, what the section is, and the table of its keys."""
    lines = [f"### `{name}`", ""]
    if field.description:
        lines += [field.description, ""]
    if model is not _model_in_plain(field.annotation):  # a mapping of models: say what each entry takes
        lines += [f"Each entry of `{name}` (`{name}.<column>`) takes these keys:", ""]
    lines += ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    for key, key_field in keys(model):
        kind = type_name(key_field.annotation)
        if bound := bounds(key_field):
            kind += f", {bound}"
        lines.append(f"| `{key}` | {_cell(kind)} | `{_cell(yaml_default(key_field))}` | {_cell(key_field.description or '')} |")
    return "\n".join(lines) + "\n"


def render_reference() -> str:
    """Every section's table, in the schema's order: what replaces the marker."""
    return "\n".join(render_section(name, field, model) for name, field, model in sections())


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        raise ValueError(f"{PAGE}: the marker {MARKER} is missing; the configuration reference goes there")
    return markdown.replace(MARKER, render_reference())


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model a section's annotation holds: itself, or inside ``X | None`` / ``dict[str, X]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        if (model := _model_in(arg)) is not None:
            return model
    return None


def _model_in_plain(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")
