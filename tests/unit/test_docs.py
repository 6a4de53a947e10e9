"""The docs: the configuration reference lists every key of the schema with its default, and the
README stays a newcomer's page (at most 200 lines, the CI test command, no link out of the repo).

The reference is rendered by the MkDocs hook ``docs/hooks/config_reference.py`` (loaded here by
path, so mkdocs itself need not be installed). The keys are found by walking
``capstream.config.Config``, so a key added to the schema without reaching the page fails here.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any, get_args

import pytest
import yaml
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from capstream.config import Config

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "mkdocs.yml").is_file())  # wherever tests/ groups this file
HOOK = ROOT / "docs" / "hooks" / "config_reference.py"
TEST_COMMAND = "python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[test,ray]' && python -m pytest -q"


def load_hook():
    spec = importlib.util.spec_from_file_location("capstream_docs_config_reference", HOOK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def section_model(annotation: Any) -> type[BaseModel]:
    """The model whose fields a section's keys are: ``DatasetConfig``, or ``PromptConfig`` inside
    ``dict[str, PromptConfig] | None``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        try:
            return section_model(arg)
        except LookupError:
            pass
    raise LookupError(annotation)


def expected_keys() -> dict[str, dict[str, Any]]:
    """section -> key (YAML name) -> its default (``PydanticUndefined`` when it has none)."""
    found = {}
    for name, field in Config.model_fields.items():
        model = section_model(field.annotation)
        found[field.alias or name] = {
            key_field.alias or key: (key_field.default_factory() if key_field.default_factory else key_field.default)
            for key, key_field in model.model_fields.items()
        }
    return found


def tables(rendered: str) -> dict[str, dict[str, list[str]]]:
    """section -> key -> the cells of its row, read from the rendered Markdown."""
    found: dict[str, dict[str, list[str]]] = {}
    section = None
    for line in rendered.splitlines():
        if m := re.fullmatch(r"#+ `([\w.]+)`", line.strip()):
            section = m.group(1)
            found[section] = {}
        elif section and (m := re.match(r"\| `(\w+)` \|", line)):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            found[section][m.group(1)] = cells
    return found


def missing(rendered: str) -> list[str]:
    """Every ``section.key`` whose row is absent, or whose default cell is not its default in YAML."""
    rows = tables(rendered)
    problems = []
    for section, keys in expected_keys().items():
        for key, default in keys.items():
            cells = rows.get(section, {}).get(key)
            if cells is None:
                problems.append(f"{section}.{key}: no row")
                continue
            shown = cells[2].strip("`")
            if default is PydanticUndefined:
                ok = shown == "required"
            else:
                if isinstance(default, BaseModel):
                    default = default.model_dump(mode="json", by_alias=True)
                ok = yaml.safe_load(shown) == default and type(yaml.safe_load(shown)) is type(default)
            if not ok:
                problems.append(f"{section}.{key}: default shown as {shown!r}, is {default!r}")
    return problems


def test_reference_lists_every_key_with_its_default():
    rendered = load_hook().render_reference()
    sections = expected_keys()
    assert list(tables(rendered)) == list(sections)  # one table per section, in the schema's order
    assert {"dataset", "model", "prompt", "prompts", "image", "limits", "retry", "run", "output"} <= set(sections)
    assert "schema" in sections["prompt"] and "schema_" not in sections["prompt"]  # YAML names
    assert missing(rendered) == []


def test_the_check_notices_a_key_left_out():
    rendered = load_hook().render_reference()
    without = "\n".join(line for line in rendered.splitlines() if not line.startswith("| `max_concurrency` |"))
    assert missing(without) == ["limits.max_concurrency: no row"]
    wrong = "\n".join(line.replace("`1000`", "`100`") if line.startswith("| `chunk_size` |") else line
                      for line in rendered.splitlines())
    assert missing(wrong) == ["run.chunk_size: default shown as '100', is 1000"]


def test_every_key_is_described():
    undescribed = [
        f"{section}.{key}"
        for section, field in Config.model_fields.items()
        for key, key_field in section_model(field.annotation).model_fields.items()
        if not (key_field.description or "").strip()
    ]
    assert undescribed == []
    assert all((field.description or "").strip() for field in Config.model_fields.values())


def test_configuration_page_holds_the_marker():
    hook = load_hook()
    page = (ROOT / "docs" / hook.PAGE).read_text(encoding="utf-8")
    assert page.count(hook.MARKER) == 1


@pytest.fixture
def readme() -> str:
    return (ROOT / "README.md").read_text(encoding="utf-8")


def test_readme_is_short(readme):
    assert len(readme.splitlines()) <= 200


def test_readme_keeps_the_ci_test_command(readme):
    assert TEST_COMMAND in readme
    assert "capstream run configs/demo.yaml" in readme


def test_readme_links_stay_in_the_repository(readme):
    targets = re.findall(r"\]\(([^)\s]+)\)", readme)
    assert targets  # the links into the docs
    for target in targets:
        assert not re.match(r"[a-z]+://", target), target
        assert (ROOT / target.split("#")[0]).resolve().is_relative_to(ROOT), target
        assert (ROOT / target.split("#")[0]).exists(), target
