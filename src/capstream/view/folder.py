"""What an output folder holds, read for the viewer: the run's settings, its rows, every logged answer.

Everything comes from the folder's own files, never from the environment: the saved config
(``.capstream/config.json``, written with secrets removed), the manifest, ``summary.json``, the
shards and the results logs. A row whose chunk is written comes from its shard (its answers and
error as the dataset has them) with the details only the log keeps (tokens, latency, attempts,
each prompt's own error); a row of a chunk not written yet (a run still going, or stopped) comes
from the log alone, so a partial run shows what is done.

    >>> folder = RunFolder.open("out/demo")        # ConfigError: not a capstream output folder
    >>> answers = LoggedRecords.read(folder.layout.results_logs())
    >>> for row in folder.rows(answers): print(row.key_text, row.error)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pyarrow.parquet as pq
from pydantic import ValidationError

from ..config import Config
from ..cost.meter import Prices
from ..errors import ConfigError
from ..io.layout import OutputLayout
from ..io.results_log import LogRecord, hashable_key, merge_log, records
from ..io.store import Manifest
from ..io.summary import RunSummary
from ..row.prompts import Prompt, combined_error, compile_prompts
from ..row.results import Provenance, error_kind


@dataclass(frozen=True)
class RunFolder:
    """An output folder and the settings of the run that wrote it (from its saved config)."""

    layout: OutputLayout
    manifest: Manifest
    config: Config
    prompts: tuple[Prompt, ...]
    summary: RunSummary | None

    @classmethod
    def open(cls, out_dir: str | Path) -> "RunFolder":
        """ConfigError when ``out_dir`` is not a capstream output folder, or its saved config cannot be read."""
        out_dir = Path(out_dir)
        probe = OutputLayout(out_dir, "train")
        saved = probe.saved_config
        if not probe.manifest.is_file() or not saved.is_file():
            raise ConfigError(f"{out_dir}: not a capstream output folder (no {probe.manifest.relative_to(out_dir)} "
                              f"and {saved.relative_to(out_dir)}); give the folder a run wrote (output.dir)")
        try:
            # The saved config is validated as it is: no ${VAR} is read, nothing from the environment.
            config = Config.from_saved(json.loads(saved.read_text(encoding="utf-8")))
        except (OSError, ValueError, ValidationError, ConfigError) as err:
            raise ConfigError(f"{saved}: cannot read the run's saved config: {err}") from None
        layout = OutputLayout(out_dir, config.dataset.split)
        manifest = Manifest.read(layout)
        prompts = tuple(compile_prompts(config.prompt_specs(), config.output.error_column))
        return cls(layout, manifest, config, prompts, RunSummary.read(layout))

    @property
    def chunk_size(self) -> int:
        return self.manifest.chunk_size or self.config.run.chunk_size

    @property
    def prices(self) -> Prices:
        return Prices.of(self.config.model)

    def shard_columns(self) -> list[str]:
        """The columns a shard is read for (never the image: thumbnails read it on their own)."""
        names = [self.config.dataset.key_column] if self.config.dataset.key_column else []
        for prompt in self.prompts:
            names += list(prompt_columns(prompt))
        return names + [self.config.output.error_column]

    def rows(self, logged: "LoggedRecords") -> Iterator["RowView"]:
        """Every row done, in source order: the written chunks' rows, then (by chunk) the rows of
        chunks not written yet that have at least one answer logged."""
        # A shard the manifest lists but the disk lacks (deleted by hand): its rows come from the log.
        done = sorted(c for c in self.manifest.done if self.layout.shard_path(c).is_file())
        key_column, error_column = self.config.dataset.key_column, self.config.output.error_column
        for chunk in done:
            path = self.layout.shard_path(chunk)
            wanted = set(self.shard_columns())
            table = pq.read_table(path, columns=[c for c in pq.read_schema(path).names if c in wanted])
            columns = {name: table.column(name).to_pylist() for name in table.column_names}
            for offset in range(table.num_rows):
                position = chunk * self.chunk_size + offset
                key = columns[key_column][offset] if key_column else position
                found = logged.final.get(hashable_key(key), {})
                error = _at(columns, error_column, offset)
                answers = {}
                for prompt in self.prompts:
                    value = _value_of(prompt, columns, offset)
                    # Without the log (a folder whose log is gone), a prompt's own error is the row's
                    # when it is the only prompt, or when the row failed and this prompt has no value.
                    guessed = error if error and (len(self.prompts) == 1 or value is None) else None
                    answers[prompt.name] = AnswerView.of(value, found.get(prompt.name), unlogged_error=guessed)
                yield RowView(chunk, position, key, answers, error, written=True)
        for chunk in sorted(set(logged.chunk_keys) - set(done)):
            keys = logged.chunk_keys[chunk]  # rows answered out of order: positions put them back in order
            for key in sorted(keys) if key_column is None and all(isinstance(k, int) for k in keys) else keys:
                found = logged.final.get(key, {})
                answers = {p.name: AnswerView.of(found[p.name].value, found[p.name]) for p in self.prompts
                           if p.name in found}
                error = combined_error(list(self.prompts), {name: a.error for name, a in answers.items()})
                position = key if key_column is None and isinstance(key, int) else None
                yield RowView(chunk, position, key, answers, error, written=False)


def prompt_columns(prompt: Prompt) -> tuple[str, ...]:
    """The output columns of a prompt: its name, or its schema's fields."""
    return tuple(f.name for f in prompt.schema.fields) if prompt.schema is not None else (prompt.name,)


def _at(columns: dict[str, list], name: str, offset: int) -> Any:
    values = columns.get(name)
    return values[offset] if values is not None else None


def _value_of(prompt: Prompt, columns: dict[str, list], offset: int) -> Any:
    if prompt.schema is None:
        return _at(columns, prompt.name, offset)
    fields = {f.name: _at(columns, f.name, offset) for f in prompt.schema.fields}
    return fields if any(v is not None for v in fields.values()) else None


@dataclass(frozen=True)
class AnswerView:
    """One prompt's answer for one row, as the viewer shows it (what is not known is None): its
    value or error, the tokens it counted, and how it was bought (``Provenance``)."""

    value: Any
    error: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    provenance: Provenance | None = None
    answered_at: float | None = None

    @classmethod
    def of(cls, value: Any, record: LogRecord | None, *, unlogged_error: str | None = None) -> "AnswerView":
        """The answer ``value`` with what its log ``record`` says (without one: ``unlogged_error``)."""
        if record is None:
            return cls(value, unlogged_error)
        return cls(value, record.error, record.input_tokens, record.output_tokens, record.provenance,
                   record.answered_at)

    def to_json(self) -> dict[str, Any]:
        p = self.provenance or Provenance()
        data = {"v": self.value, "e": self.error, "ti": self.input_tokens, "to": self.output_tokens,
                "ms": p.latency_ms, "n": p.attempts, "m": p.model, "fr": p.finish_reason, "t": self.answered_at}
        return {k: v for k, v in data.items() if v is not None}


@dataclass
class RowView:
    """A row as the viewer shows it: where it is, its key, each prompt's answer, its error, and
    (``images.py``) its thumbnail."""

    chunk: int
    position: int | None  # in the source (None: a keyed row of a chunk not written yet)
    key: Any
    answers: dict[str, AnswerView]
    error: str | None
    written: bool  # its chunk's shard is written (else its answers come from the log alone)

    @property
    def error_kind(self) -> str | None:
        return error_kind(self.error) if self.error else None

    @property
    def key_text(self) -> str:
        return f"row {self.key}" if self.position is not None and self.key == self.position else str(self.key)


@dataclass
class LoggedRecords:
    """Every results log of the folder, read once: each record (the report's time series), the
    record that counts per key and prompt (``results_log.merge_log``'s rule), and each chunk's keys
    in the order they were first logged."""

    records: list[LogRecord] = field(default_factory=list)
    final: dict[Any, dict[str, LogRecord]] = field(default_factory=dict)
    chunk_keys: dict[int, list[Any]] = field(default_factory=dict)

    @classmethod
    def read(cls, logs: list[Path]) -> "LoggedRecords":
        every: list[LogRecord] = []
        final: dict[Any, dict[str, LogRecord]] = {}
        chunk_keys: dict[int, dict[Any, None]] = {}
        for log in logs:
            newest: dict[tuple[Any, str], LogRecord] = {}
            for record in records(log):
                key = hashable_key(record.key)
                every.append(record)
                newest[(key, record.prompt)] = record  # within a log, the newest wins
                chunk_keys.setdefault(record.chunk, {})[key] = None
            merge_log(final, newest)
        return cls(every, final, {chunk: list(keys) for chunk, keys in chunk_keys.items()})


__all__ = ["RunFolder", "RowView", "AnswerView", "LoggedRecords", "prompt_columns"]
