"""Prompts in-process: {column} templates, answer schemas (from YAML and pydantic), compiling several prompts."""

from __future__ import annotations

from typing import Literal, Optional

import datasets
import pytest
from pydantic import BaseModel

from capstream import ConfigError, config_from_dict
from capstream.errors import InvalidAnswer
from capstream.row.prompts import AnswerSchema, compile_prompts, fill, placeholders

# -- unit: schemas, templates ----------------------------------------------------------------------

def test_yaml_schema_types_and_strict_json_schema():
    schema = AnswerSchema.from_spec({
        "caption": "string", "tags": "list[string]", "people": "integer", "score": "number",
        "nsfw": "boolean", "label": ["safe", "unsafe"], "mood": "enum[happy, sad]", "note": "string?",
        "counts": "optional[list[integer]]", "alt": {"type": "string", "description": "alt text"},
    }, "prompt.schema")
    js = schema.json_schema()
    assert js["additionalProperties"] is False and js["required"] == list(js["properties"])
    assert js["properties"]["tags"] == {"type": "array", "items": {"type": "string"}}
    assert js["properties"]["label"] == {"type": "string", "enum": ["safe", "unsafe"]}
    assert js["properties"]["note"] == {"anyOf": [{"type": "string"}, {"type": "null"}]}
    assert js["properties"]["alt"]["description"] == "alt text"
    features = schema.features()
    assert features["people"] == datasets.Value("int64") and features["score"] == datasets.Value("float64")
    assert features["tags"] == datasets.List(datasets.Value("string")) and features["nsfw"] == datasets.Value("bool")
    fmt = schema.response_format()
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["strict"] is True


@pytest.mark.parametrize("spec, message", [
    ({"n": "int"}, "prompt.schema.n: unknown type 'int'"),
    ({"n": "list[string"}, "prompt.schema.n: unknown type"),
    ({"n": []}, "prompt.schema.n: an enum is a non-empty list of strings"),
    ({"bad name": "string"}, "field name 'bad name' must be an identifier"),
    ("string", "prompt.schema: expected a mapping"),
])
def test_bad_yaml_schema_names_the_key(spec, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        config_from_dict({"prompt": {"text": "x", "schema": spec}}, source="c.yaml")


def test_pydantic_schema_and_parsing():
    class Answer(BaseModel):
        caption: str
        tags: list[str]
        people: int
        rating: Literal["g", "r"]
        note: Optional[str] = None

    schema = AnswerSchema.from_spec(Answer, "prompt.schema")
    assert schema.json_schema()["properties"]["rating"] == {"type": "string", "enum": ["g", "r"]}
    good = '```json\n{"caption": "a dog", "tags": ["dog"], "people": 2, "rating": "g", "note": null, "extra": 1}\n```'
    assert schema.parse(good) == {"caption": "a dog", "tags": ["dog"], "people": 2, "rating": "g", "note": None}
    for bad, reason in [("a dog", "not valid JSON"), ("[1]", "expected a JSON object"),
                        ('{"caption": "a", "tags": [], "people": "many", "rating": "g", "note": null}', "people"),
                        ('{"caption": "a", "tags": [], "people": 1, "rating": "x", "note": null}', "rating")]:
        with pytest.raises(InvalidAnswer, match=reason) as info:
            schema.parse(bad)
        assert info.value.raw == bad


def test_templates():
    assert placeholders("Alt: {alt}. Title: {title}; JSON like {\"a\": 1} and {{alt}}") == ["alt", "title"]
    assert fill("Alt: {alt}, {{alt}}, {x y}, {n}", {"alt": "a cat", "n": None}) == "Alt: a cat, {alt}, {x y}, "


def test_prompt_and_prompts_together_is_an_error():
    with pytest.raises(ConfigError, match="either 'prompt'"):
        config_from_dict({"prompt": {"text": "a"}, "prompts": {"x": {"text": "b"}}})
    with pytest.raises(ConfigError, match="also written by"):
        compile_prompts(config_from_dict({"prompts": {
            "a": {"text": "x", "schema": {"tags": "list[string]"}}, "tags": {"text": "y"}}}))
