"""The run's Hub-ready folder, beyond its shards: the dataset card and the summary.

The card's YAML header names the shards (``configs: data_files``) and their features (read from the
shards' own parquet schema) so that both the Hub's viewer and ``datasets.load_dataset(output_dir)``
find and type them; its body says what was run and what came out. Nothing here reads a secret: the
config it shows is ``Config.redacted()`` and the endpoint is shown as provider and host only.

The local folder's card names no ``configs`` when datasets finds the shards without them (the
splits ``train``, ``validation``, ``test``): datasets 5.2 keys its cache of a local folder whose card
names ``configs`` by the folder's name and the card alone, not by the files, so it would serve the
rows of its first load after a resume or ``--retry-errors`` rewrote shards. Without ``configs`` it
resolves the files itself and keys the cache by their paths and modification times.

    >>> text = render_card(store.dir, config, summary, CardLayout(split="train", data_glob="data/train-*.parquet"))
    >>> write_card(store.layout, config, summary)      # the local README.md, for the local layout
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import pyarrow.parquet as pq
import yaml

from .. import __version__
from ..config import Config
from ..errors import ConfigError
from ..row.prompts import Prompt, compile_prompts
from .files import atomic_write_bytes
from .layout import OutputLayout
from .store import Manifest, SettingsChange
from .summary import RunSummary


@dataclass
class CardLayout:
    """Where the card says the shards are: the local folder's names, or the names in a Hub repo."""

    split: str
    data_glob: str  # e.g. "data/train-*.parquet"
    config_name: str = "default"
    repo_id: str | None = None  # for the loading example
    other_configs: list[dict[str, Any]] = field(default_factory=list)  # entries already in the repo's card
    name_configs: bool = True  # False: datasets finds the shards by its own patterns (see the module's docstring)


def _sample_rows(shards: list[Path], config: Config, column: str, n: int = 5) -> list[tuple[str, str]]:
    out = config.output
    for shard in shards[:3]:
        try:
            table = pq.read_table(shard, columns=[column, out.error_column])
        except (OSError, KeyError, ValueError):
            continue
        rows = list(zip(table[column].to_pylist(), table[out.error_column].to_pylist()))
        rows = [r for r in rows if r[0] is not None] or rows
        if rows:
            return [("" if c is None else str(c), e or "") for c, e in rows[:n]]
    return []


def _prompt_lines(prompt: Prompt, named: bool) -> list[str]:
    lines = [f"## Prompt `{prompt.name}`" if named else "## Prompt", ""]
    if prompt.system:
        lines += ["System:", "", "```text", prompt.system, "```", ""]
    lines += ["```text", prompt.text, "```", ""]
    if prompt.schema is not None:
        lines += ["Answer schema (JSON, strict):", "", "```json", json.dumps(prompt.schema.json_schema(), indent=2), "```", ""]
    return lines


def _metadata_sentence(prompts: list[Prompt]) -> str:
    names = ", ".join(f"`{prompt.name}_*`" for prompt in prompts)
    return (f" {names}: how each answer was bought, from the provider's response: `_model` (the model that "
            "answered), `_finish_reason`, `_input_tokens` / `_output_tokens` (its request's usage), `_latency_ms`, "
            "`_attempts` and `_answered_at` (UTC); an answer re-used from capstream's response cache keeps those "
            "of its purchase, and a row without an answer has nulls.")


def _features_yaml(shards: list[Path]) -> list[dict] | None:
    """The shards' features as the card's ``dataset_info.features`` (from the file, not assumed)."""
    if not shards:
        return None
    try:
        schema = pq.read_schema(shards[0])
        return datasets.Features.from_arrow_schema(schema)._to_yaml_list()
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _cell(text: Any, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return text.replace("|", "\\|")


def _header(layout: CardLayout, features: list[dict] | None) -> dict[str, Any]:
    ours = {"config_name": layout.config_name, "data_files": [{"split": layout.split, "path": layout.data_glob}]}
    configs = []
    for entry in layout.other_configs:  # keep what the repo already has; merge our split into our config
        if entry.get("config_name", "default") == layout.config_name:
            files = entry.get("data_files")
            kept = [f for f in files if isinstance(f, dict) and f.get("split") != layout.split] if isinstance(files, list) else []
            ours["data_files"] = kept + ours["data_files"]
        else:
            configs.append(entry)
    configs.append(ours)
    header: dict[str, Any] = {"configs": configs} if layout.name_configs else {}
    if features and len(configs) == 1:  # with several configs, each keeps the features its own shards carry
        header["dataset_info"] = {"config_name": layout.config_name, "features": features}
    header["tags"] = ["capstream", "image-captioning", "synthetic-captions"]
    header["task_categories"] = ["image-to-text"]
    return header


def _change_text(change: SettingsChange) -> str:
    values = []
    for key, (old, new) in change.changed.items():
        if isinstance(old, dict) and isinstance(new, dict):  # a whole prompt (prompts.<name>): what differs in it
            values += [f"`{key}.{k}` {json.dumps(old.get(k))} → {json.dumps(new.get(k))}"
                       for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        else:
            values.append(f"`{key}` {json.dumps(old)} → {json.dumps(new)}")
    return f"{change.at}{' (--retry-errors)' if change.retry_errors else ''}: {'; '.join(values)}"


def _settings_table(config: Config, summary: RunSummary, changes: list[SettingsChange]) -> list[str]:
    m, d, img = config.model, config.dataset, config.image
    rows = [
        ("model", f"`{m.name}`"),
        ("provider", config.model.endpoint_label()),
        ("source", f"`{d.path or 'a dataset given in code'}`" + (f" (config `{d.name}`)" if d.name else "")
         + f", split `{d.split}`" + (f", revision `{d.revision}`" if d.revision else "")),
        ("image", f"longest side {img.max_side} px, detail `{img.detail}`, JPEG quality {img.quality}"),
        ("generation", f"temperature {m.temperature if m.temperature is not None else 'server default'}, "
                       f"max_tokens {m.max_tokens}"),
        ("capstream", __version__),
    ]
    rows += [("changed by a rerun", _change_text(change)) for change in changes]
    if summary.started:
        rows.append(("started", summary.started))
    if summary.finished:
        rows.append(("finished", summary.finished))
    return ["| setting | value |", "| --- | --- |", *[f"| {k} | {_cell(v, 300)} |" for k, v in rows]]


def _counts(summary: RunSummary) -> list[str]:
    cols = ["rows", "captioned", "errors", "input tokens", "output tokens"]
    vals = [summary.rows, summary.ok, sum(summary.errors.values()), summary.input_tokens, summary.output_tokens]
    lines = [f"| {' | '.join(cols)} |", f"|{' --- |' * len(cols)}", f"| {' | '.join(str(v) for v in vals)} |", ""]
    if summary.errors:
        lines += ["Errors by kind: " + ", ".join(f"{k}: {v}" for k, v in sorted(summary.errors.items())), ""]
    if summary.cost_usd is not None:
        prices = summary.prices
        spent_on = "every answer received, all runs" if summary.complete else "the answers received so far"
        batch = ", Batch API" if prices.get("batch") else ""
        lines += [f"Cost: ${summary.cost_usd:.4f} for {spent_on} (at "
                  f"${prices.get('input_per_mtok', 0):g} input / ${prices.get('output_per_mtok', 0):g} output per "
                  f"million tokens; prices: {prices.get('source', '?')}{batch}).", ""]
    lines.append(f"Complete: {'yes' if summary.complete else 'no (the run can be resumed)'}.")
    return lines


def render_card(out_dir: Path, config: Config, summary: RunSummary, layout: CardLayout,
                shards: list[Path] | None = None) -> str:
    """The card's text for the shards of ``out_dir`` named as ``layout`` says."""
    shards = shards if shards is not None else OutputLayout(out_dir, layout.split).shard_paths()
    m, out = config.model, config.output
    prompts = compile_prompts(config.prompt_specs(), out.error_column)
    columns = [name for p in prompts for name in p.columns()]
    load_from = layout.repo_id or "path/to/this/folder"
    load_args = f'"{load_from}"' + (f', "{layout.config_name}"' if layout.config_name != "default" else "")
    lines = [
        "---",
        yaml.safe_dump(_header(layout, _features_yaml(shards)), sort_keys=False).strip(),
        "---",
        "",
        f"# Captions by {m.name}",
        "",
        f"Made with capstream {__version__}: every image of "
        f"`{config.dataset.path or 'a dataset given in code'}` (split `{config.dataset.split}`) was sent to "
        f"`{m.name}` ({m.endpoint_label()}) with the prompt{'s' if len(prompts) > 1 else ''} below. "
        f"Column{'s' if len(columns) > 1 else ''} {', '.join(f'`{c}`' for c in columns)} hold"
        f"{'' if len(columns) > 1 else 's'} the answer{'s' if len(columns) > 1 else ''}; "
        f"`{out.error_column}` says why a row has none (`<Kind>: <message>`)."
        + (_metadata_sentence(prompts) if out.metadata else ""),
        "",
        "```python",
        "import datasets",
        f'ds = datasets.load_dataset({load_args}, split="{layout.split}")',
        "```",
        "",
        *[line for p in prompts for line in _prompt_lines(p, len(prompts) > 1)],
        "## What was run",
        "",
        *_settings_table(config, summary, _changes(out_dir, config)),
        "",
        "## Counts",
        "",
        *_counts(summary),
        "",
    ]
    samples = _sample_rows(shards, config, columns[0])
    if samples:
        lines += ["## Sample captions", "", f"| {columns[0]} | {out.error_column} |", "| --- | --- |"]
        lines += [f"| {_cell(c)} | {_cell(e)} |" for c, e in samples]
        lines.append("")
    lines += [
        "## Config",
        "",
        "The run's configuration (no key is ever part of it; credentials in URLs are masked):",
        "",
        "```yaml",
        yaml.safe_dump(config.redacted(), sort_keys=False).strip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def _changes(out_dir: Path, config: Config) -> list[SettingsChange]:
    """The settings reruns changed, as the folder's manifest records them (none when unreadable)."""
    try:
        manifest = Manifest.read(OutputLayout(out_dir, config.dataset.split))
    except ConfigError:
        return []
    return manifest.changes if manifest is not None else []


def found_by_datasets(layout: OutputLayout) -> bool:
    """Whether ``datasets.load_dataset(folder)``, given a card without ``configs``, finds exactly the
    folder's shards under its split (datasets' own default patterns: ``data/train-*`` and the like)."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    shards = sorted(p.resolve().as_posix() for p in layout.shard_paths())
    if not shards:
        return False
    try:
        found = DataFilesDict.from_patterns(get_data_patterns(layout.dir.resolve().as_posix()),
                                            base_path=layout.dir.resolve().as_posix())
    except Exception:  # datasets finds no data, or reads folders otherwise in another version: name the configs
        return False
    return {str(split) for split in found} == {layout.split} and sorted(found[layout.split]) == shards


def loading_code(layout: OutputLayout) -> str:
    """The Python line that loads the folder's rows as they are now: ``datasets.load_dataset`` when
    datasets finds the shards by its own patterns, else ``capstream.load_output``."""
    if found_by_datasets(layout):
        return f'datasets.load_dataset("{layout.dir}", split="{layout.split}")'
    return f'capstream.load_output("{layout.dir}")'


def write_card(layout: OutputLayout, config: Config, summary: RunSummary) -> None:
    """Write ``README.md`` for the output folder: YAML header, then what was run. It names
    ``configs`` only when datasets would not find the shards without them (see the module's docstring)."""
    card = CardLayout(split=layout.split, data_glob=layout.shard_glob, name_configs=not found_by_datasets(layout))
    text = render_card(layout.dir, config, summary, card, shards=layout.shard_paths())
    atomic_write_bytes(layout.card, text.encode("utf-8"))
