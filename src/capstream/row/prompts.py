"""What is asked of each image, and the columns the answers fill.

A run has one or more named prompts: ``prompt:`` is one, named after ``output.caption_column``;
``prompts:`` names each by its output column. A prompt has text (``{column}`` placeholders are
filled from the row), optional system text, an optional answer schema, and optional generation
parameters. Without a schema the answer is text in the prompt's column; with one, the answer must
be JSON matching it and each field becomes a typed column.

    >>> config = config_from_dict({"prompt": {"text": "Caption. Alt text: {alt}",
    ...                                      "schema": {"caption": "string", "people": "integer"}}})
    >>> [p] = compile_prompts(config.prompt_specs(), config.output.error_column)
    >>> p.render({"alt": "a dog"})[0]
    'Caption. Alt text: a dog'
    >>> p.parse('{"caption": "a dog", "people": 0}')
    {'caption': 'a dog', 'people': 0}
    >>> sorted(p.columns())
    ['caption', 'people']
"""

from __future__ import annotations

import enum
import json
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Optional, Sequence

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from ..errors import ConfigError, FilteredAnswer, InvalidAnswer, TruncatedAnswer

# "{name}" is a placeholder; "{{" and "}}" are literal braces; any other brace is literal text, so
# JSON examples in a prompt need no escaping.
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}")

_SCALARS = {"string": (str, "string"), "integer": (int, "int64"), "number": (float, "float64"),
            "boolean": (bool, "bool")}
_JSON_TYPES = {"string": "string", "integer": "integer", "number": "number", "boolean": "boolean"}
_TYPE_SPEC = re.compile(r"^(optional\[)?(list\[)?(string|integer|number|boolean)(\])?(\])?(\?)?$")
_ENUM_SPEC = re.compile(r"^enum\[(.*)\]$")


@dataclass(frozen=True)
class Field:
    """One typed field of an answer schema."""

    name: str
    kind: str  # string | integer | number | boolean
    is_list: bool = False
    optional: bool = False
    choices: tuple[str, ...] | None = None  # an enum of strings
    description: str | None = None

    def python_type(self) -> Any:
        base: Any = Literal[self.choices] if self.choices else _SCALARS[self.kind][0]
        if self.is_list:
            base = list[base]
        return Optional[base] if self.optional else base

    def json_schema(self) -> dict:
        item: dict[str, Any] = {"type": _JSON_TYPES[self.kind]}
        if self.choices:
            item["enum"] = list(self.choices)
        schema = {"type": "array", "items": item} if self.is_list else item
        if self.optional:  # OpenAI strict mode: every field is required, optional ones may be null
            schema = {"anyOf": [schema, {"type": "null"}]}
        if self.description:
            schema = {**schema, "description": self.description}
        return schema

    def feature(self) -> Any:
        import datasets  # here, not at the top: worker processes import this module and need no datasets

        value = datasets.Value(_SCALARS[self.kind][1])
        return datasets.List(value) if self.is_list else value


class AnswerSchema:
    """The shape a structured answer must have: a JSON schema for the request, a validator for the
    answer, a dataset feature per field."""

    def __init__(self, fields: list[Field], name: str = "answer"):
        self.fields = fields
        self.name = name
        self._model = create_model(  # validates answers; extra keys are ignored
            f"{name}_answer", __config__=ConfigDict(extra="ignore"),
            **{f.name: (f.python_type(), ...) if not f.optional else (f.python_type(), None) for f in fields},
        )

    def __reduce__(self):  # picklable (to Ray actors): rebuilt from its fields, not its pydantic model
        return (AnswerSchema, (self.fields, self.name))

    def json_schema(self) -> dict:
        return {"type": "object", "properties": {f.name: f.json_schema() for f in self.fields},
                "required": [f.name for f in self.fields], "additionalProperties": False}

    def response_format(self) -> dict:
        """OpenAI's ``response_format`` for structured outputs (strict JSON schema)."""
        return {"type": "json_schema", "json_schema": {"name": self.name, "schema": self.json_schema(), "strict": True}}

    def features(self) -> dict[str, Any]:
        return {f.name: f.feature() for f in self.fields}

    def parse(self, text: str) -> dict[str, Any]:
        """The answer's fields, typed; ``InvalidAnswer`` when it is not JSON of this shape."""
        body = _strip_code_fence(text)
        try:
            data = json.loads(body)
        except json.JSONDecodeError as err:
            raise InvalidAnswer(f"not valid JSON ({err.msg} at char {err.pos})", text) from None
        if not isinstance(data, dict):
            raise InvalidAnswer(f"expected a JSON object, got {type(data).__name__}", text)
        try:
            answer = self._model.model_validate(data)
        except ValidationError as err:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()[:5])
            raise InvalidAnswer(f"does not match the schema ({problems})", text) from None
        return {f.name: getattr(answer, f.name) for f in self.fields}

    # -- building ---------------------------------------------------------------------------------

    @classmethod
    def from_spec(cls, spec: Any, where: str, name: str = "answer") -> "AnswerSchema":
        """From YAML (``{field: type}``) or a pydantic model class; ConfigError names ``where``."""
        if isinstance(spec, type) and issubclass(spec, BaseModel):
            return cls([_field_from_annotation(n, f.annotation, f.description, f"{where}.{n}")
                        for n, f in spec.model_fields.items()], name)
        if not isinstance(spec, dict) or not spec:
            raise ConfigError(f"{where}: expected a mapping of field name to type, e.g. {{caption: string, tags: list[string]}}")
        fields = []
        for field_name, field_spec in spec.items():
            if not isinstance(field_name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", field_name):
                raise ConfigError(f"{where}: field name {field_name!r} must be an identifier")
            fields.append(_field_from_yaml(field_name, field_spec, f"{where}.{field_name}"))
        return cls(fields, name)


def _field_from_yaml(name: str, spec: Any, where: str) -> Field:
    description = None
    if isinstance(spec, dict):  # {type: ..., description: ...}
        unknown = set(spec) - {"type", "description"}
        if unknown or "type" not in spec:
            raise ConfigError(f"{where}: a field given as a mapping takes 'type' and optional 'description'")
        description, spec = spec.get("description"), spec["type"]
    if isinstance(spec, list):  # [a, b, c]: an enum of strings
        return _enum_field(name, spec, False, where, description)
    if not isinstance(spec, str):
        raise ConfigError(f"{where}: unknown type {spec!r}")
    text = spec.strip().replace(" ", "")
    optional = text.endswith("?") or text.startswith("optional[")
    if text.startswith("optional[") and text.endswith("]"):
        text = text[len("optional["):-1]
    text = text.rstrip("?")
    if m := _ENUM_SPEC.match(text):
        return _enum_field(name, [c for c in m.group(1).split(",") if c], optional, where, description)
    m = _TYPE_SPEC.match(text)
    if not m or bool(m.group(2)) != bool(m.group(4)):
        raise ConfigError(f"{where}: unknown type {spec!r} (use string, integer, number, boolean, "
                          f"list[<type>], enum[a, b], optional[<type>] or <type>?)")
    return Field(name, m.group(3), is_list=bool(m.group(2)), optional=optional, description=description)


def _enum_field(name: str, choices: list, optional: bool, where: str, description: str | None) -> Field:
    if not choices or not all(isinstance(c, str) for c in choices):
        raise ConfigError(f"{where}: an enum is a non-empty list of strings")
    return Field(name, "string", optional=optional, choices=tuple(choices), description=description)


def _field_from_annotation(name: str, annotation: Any, description: str | None, where: str) -> Field:
    optional = False
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            optional, annotation = True, rest[0]
    is_list = typing.get_origin(annotation) is list
    if is_list:
        (annotation,) = typing.get_args(annotation) or (str,)
    if typing.get_origin(annotation) is Literal and all(isinstance(a, str) for a in typing.get_args(annotation)):
        return Field(name, "string", is_list, optional, tuple(typing.get_args(annotation)), description)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return Field(name, "string", is_list, optional, tuple(str(m.value) for m in annotation), description)
    for kind, (python_type, _) in _SCALARS.items():
        if annotation is python_type:
            return Field(name, kind, is_list, optional, None, description)
    raise ConfigError(f"{where}: type {annotation!r} is not supported in an answer schema "
                      f"(str, int, float, bool, list of those, Literal of strings, Optional)")


def _strip_code_fence(text: str) -> str:
    """Servers without structured outputs often wrap JSON in a ```json fence."""
    stripped = text.strip()
    if stripped.startswith("```") and stripped.endswith("```"):
        stripped = stripped[3:-3]
        if stripped.startswith("json"):
            stripped = stripped[4:]
    return stripped.strip()


def placeholders(template: str | None) -> list[str]:
    """Column names used as ``{column}`` in a template, in order of first use."""
    found = [m.group(1) for m in _PLACEHOLDER.finditer(template or "") if m.group(1)]
    return list(dict.fromkeys(found))


def fill(template: str | None, row: dict[str, Any]) -> str | None:
    """``template`` with each ``{column}`` replaced by the row's value (None: empty text)."""
    if template is None:
        return None

    def sub(m: re.Match) -> str:
        if m.group(1) is None:
            return m.group(0)[0]
        value = row.get(m.group(1))
        return "" if value is None else str(value)

    return _PLACEHOLDER.sub(sub, template)


@dataclass(frozen=True)
class Prompt:
    """One compiled prompt: ``name`` is its output column (or, with a schema, its fields are)."""

    name: str
    text: str
    system: str | None = None
    schema: AnswerSchema | None = None
    options: tuple[tuple[str, Any], ...] = ()  # per-prompt generation parameters (temperature, max_tokens)

    @property
    def placeholders(self) -> list[str]:
        return list(dict.fromkeys(placeholders(self.text) + placeholders(self.system)))

    def render(self, row: dict[str, Any]) -> tuple[str, str | None]:
        return fill(self.text, row), fill(self.system, row)

    def request_options(self) -> dict[str, Any]:
        """Keyword arguments for the chat model's call (LangChain passes them into the request)."""
        options = dict(self.options)
        if self.schema is not None:
            options["response_format"] = self.schema.response_format()
        return options

    def parse(self, text: str) -> Any:
        return self.schema.parse(text) if self.schema is not None else text

    def read(self, text: str, finish_reason: str | None) -> Any:
        """The answer's value, read the same way whichever backend bought it: ``TruncatedAnswer``
        when the server cut it at max_tokens, ``FilteredAnswer`` when it withheld it,
        ``InvalidAnswer`` when it does not match the schema."""
        if finish_reason == "length":
            raise TruncatedAnswer(text)
        if finish_reason == "content_filter":
            raise FilteredAnswer(text)
        return self.parse(text)

    def columns(self) -> dict[str, Any]:
        """Output column -> datasets feature."""
        import datasets

        return self.schema.features() if self.schema is not None else {self.name: datasets.Value("string")}

    def values(self, value: Any) -> dict[str, Any]:
        """Output column -> value for one answer (None for every column when there is none)."""
        if self.schema is None:
            return {self.name: value}
        return {f.name: (value or {}).get(f.name) for f in self.schema.fields}

    def identity(self) -> dict[str, Any]:
        """What makes two requests with this prompt ask the same thing (for dedup and the cache)."""
        return {"schema": self.schema.json_schema() if self.schema else None, "options": list(self.options)}


def compile_prompts(specs: Sequence[tuple[str, Any, str]], error_column: str) -> list[Prompt]:
    """The run's prompts from ``(output name, prompt spec, where in the config)`` triples
    (``Config.prompt_specs()``); ConfigError when two write the same column."""
    prompts, owner = [], {}
    for name, spec, where in specs:
        options = tuple((k, getattr(spec, k)) for k in ("temperature", "max_tokens") if getattr(spec, k) is not None)
        schema = AnswerSchema.from_spec(spec.schema_, f"{where}.schema", name) if spec.schema_ is not None else None
        prompt = Prompt(name, spec.text, spec.system, schema, options)
        for column in prompt.columns():
            if column in owner:
                raise ConfigError(f"{where}: output column {column!r} is also written by {owner[column]}")
            if column == error_column:
                raise ConfigError(f"{where}: output column {column!r} is output.error_column")
            owner[column] = where
        prompts.append(prompt)
    return prompts


def check_placeholders(prompts: list[Prompt], columns: list[str] | None, image_column: str) -> None:
    """ConfigError when a ``{column}`` names no column of the dataset (checked before the run)."""
    if columns is None:
        return
    for prompt in prompts:
        where = "prompt" if len(prompts) == 1 else f"prompts.{prompt.name}"
        for name in prompt.placeholders:
            if name not in columns:
                raise ConfigError(f"{where}: placeholder {{{name}}} names no column of the dataset "
                                  f"(columns: {', '.join(columns)}); write {{{{{name}}}}} for literal braces")
            if name == image_column:
                raise ConfigError(f"{where}: placeholder {{{name}}} is the image column")


def combined_error(prompts: list[Prompt], errors: dict[str, str | None]) -> str | None:
    """The row's error text: the one error, or ``name: error`` per failed prompt (one per line)."""
    failed = [(p.name, errors[p.name]) for p in prompts if errors.get(p.name)]
    if not failed:
        return None
    distinct = {e for _, e in failed}
    if len(prompts) == 1 or (len(failed) == len(prompts) and len(distinct) == 1):
        return failed[0][1]
    return "\n".join(f"{name}: {error}" for name, error in failed)
