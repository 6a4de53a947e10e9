"""The run's Hub-ready folder, beyond its shards: the dataset card and the summary.

The card's YAML header names the shards (``configs: data_files``) so that both the Hub's viewer and
``datasets.load_dataset(output_dir)`` find them; its body says what was run and what came out.
Nothing here reads a secret: the config it shows is ``Config.redacted()``.
"""

from __future__ import annotations

import datetime as _dt
import json
from typing import Any

import pyarrow.parquet as pq
import yaml

from . import __version__
from .captioner import endpoint_label
from .config import Config
from .prompts import Prompt, compile_prompts
from .store import RunStore, atomic_write_bytes, atomic_write_json


def _sample_rows(store: RunStore, config: Config, column: str, n: int = 5) -> list[tuple[str, str]]:
    out = config.output
    for shard in store.shard_paths()[:3]:
        table = pq.read_table(shard, columns=[column, out.error_column])
        rows = [(c, e) for c, e in zip(table[column].to_pylist(), table[out.error_column].to_pylist())]
        rows = [r for r in rows if r[0]] or rows
        if rows:
            return [("" if c is None else str(c), e or "") for c, e in rows[:n]]
    return []


def _cell(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return text.replace("|", "\\|")


def _prompt_lines(prompt: Prompt, named: bool) -> list[str]:
    lines = [f"## Prompt `{prompt.name}`" if named else "## Prompt", ""]
    if prompt.system:
        lines += ["System:", "", "```text", prompt.system, "```", ""]
    lines += ["```text", prompt.text, "```", ""]
    if prompt.schema is not None:
        lines += ["Answer schema (JSON, strict):", "", "```json", json.dumps(prompt.schema.json_schema(), indent=2), "```", ""]
    return lines


def write_card(store: RunStore, config: Config, summary: dict[str, Any]) -> None:
    """Write ``README.md`` for the output folder: YAML header for the Hub, then what was run."""
    split = store.split
    header = {
        "configs": [{"config_name": "default", "data_files": [{"split": split, "path": f"data/{split}-*.parquet"}]}],
        "tags": ["capstream", "image-captioning", "synthetic-captions"],
    }
    m, out = config.model, config.output
    prompts = compile_prompts(config)
    columns = [name for p in prompts for name in p.columns()]
    errors = summary.get("errors") or {}
    lines = [
        "---",
        yaml.safe_dump(header, sort_keys=False).strip(),
        "---",
        "",
        f"# Captions by {m.name}",
        "",
        f"Made with capstream {__version__}: every image of "
        f"`{config.dataset.path or 'a dataset given in code'}` (split `{config.dataset.split}`) was sent to "
        f"`{m.name}` ({endpoint_label(config)}) with the prompt{'s' if len(prompts) > 1 else ''} below. "
        f"Column{'s' if len(columns) > 1 else ''} {', '.join(f'`{c}`' for c in columns)} hold the answers; "
        f"`{out.error_column}` says why a row has none.",
        "",
        *[line for p in prompts for line in _prompt_lines(p, len(prompts) > 1)],
        "## Counts",
        "",
        "| rows | captioned | errors | input tokens | output tokens |",
        "| --- | --- | --- | --- | --- |",
        f"| {summary.get('rows', 0)} | {summary.get('ok', 0)} | {sum(errors.values())} | "
        f"{summary.get('input_tokens', 0)} | {summary.get('output_tokens', 0)} |",
        "",
        *([f"Errors by kind: " + ", ".join(f"{k}: {v}" for k, v in sorted(errors.items())), ""] if errors else []),
        *([_cost_line(summary), ""] if summary.get("cost_usd") is not None else []),
        f"Complete: {'yes' if summary.get('complete') else 'no (the run can be resumed)'}. "
        f"Updated {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}.",
        "",
    ]
    samples = _sample_rows(store, config, columns[0])
    if samples:
        lines += ["## Sample captions", "", f"| {columns[0]} | {out.error_column} |", "| --- | --- |"]
        lines += [f"| {_cell(c)} | {_cell(e)} |" for c, e in samples]
        lines.append("")
    lines += [
        "## Settings",
        "",
        "```yaml",
        yaml.safe_dump(config.redacted(), sort_keys=False).strip(),
        "```",
        "",
    ]
    atomic_write_bytes(store.dir / "README.md", "\n".join(lines).encode("utf-8"))


def _cost_line(summary: dict[str, Any]) -> str:
    prices = summary.get("prices") or {}
    return (f"Cost: ${summary['cost_usd']:.4f} for every answer received, all runs (at ${prices.get('input_per_mtok'):g} "
            f"input / ${prices.get('output_per_mtok'):g} output per million tokens; prices: {prices.get('source')}).")


def write_summary(store: RunStore, summary: dict[str, Any]) -> None:
    atomic_write_json(store.dir / "summary.json", summary)
