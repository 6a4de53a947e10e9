"""What a row gets: each prompt's answer, the row's result, the counts of many rows, the output columns.

``PromptAnswer`` is one prompt's outcome for one row (a value or an error, the tokens paid, where
it came from, how it was bought); ``RowResult`` is a row's answers and its error text; ``RowCounts``
counts rows, errors by kind and their tokens (a chunk's counts in the manifest, a run's in its
summary). With ``output.metadata`` each prompt also gets typed columns saying how its answer was
bought (``METADATA_COLUMNS``, from the answer's ``Provenance``).

    >>> answers = {"caption": PromptAnswer("a red square", input_tokens=120, output_tokens=4)}
    >>> result = row_result(prompts, answers)
    >>> output_columns(prompts, "error", [result])
    {'caption': ['a red square'], 'error': [None]}
"""

from __future__ import annotations

import datetime
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from ..errors import ConfigError
from .prompts import Prompt, combined_error


@dataclass
class PromptAnswer:
    """One prompt's outcome for one row: a value (text, or the schema's fields as a dict) or an
    error (``"<Kind>: <message>"``), the tokens paid for it, and where it came from.

    An answer bought from the model also says how (``Provenance``); one from the cache cannot."""

    value: Any = None
    error: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    source: str = "request"  # request | log (an earlier run into this output.dir) | dedup | cache
    provenance: "Provenance | None" = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class Provenance:
    """How an answer was bought: the model that answered, why it stopped (``finish_reason``), how
    long the last attempt took, how many attempts it took, when (unix seconds) it arrived, and the
    input and output tokens its request(s) counted. An answer re-used (the cache, an identical
    image, an earlier run) keeps the provenance of its purchase."""

    model: str | None = None
    finish_reason: str | None = None
    latency_ms: int | None = None
    attempts: int | None = None
    answered_at: float | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None


@dataclass
class RowResult:
    """What one row gets: each prompt's answer by prompt name, and the row's error text."""

    answers: dict[str, PromptAnswer]
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def caption(self) -> Any:
        """The first prompt's value (the caption, for a run with one prompt)."""
        return next(iter(self.answers.values())).value if self.answers else None

    @property
    def input_tokens(self) -> int:
        return sum(a.input_tokens for a in self.answers.values())

    @property
    def output_tokens(self) -> int:
        return sum(a.output_tokens for a in self.answers.values())


def row_result(prompts: Sequence[Prompt], answers: dict[str, PromptAnswer]) -> RowResult | None:
    """The row's result once every prompt has an answer (None before)."""
    if not all(p.name in answers for p in prompts):
        return None
    return RowResult({p.name: answers[p.name] for p in prompts},
                     combined_error(prompts, {p.name: answers[p.name].error for p in prompts}))


# output.metadata: per prompt, how its answer was bought (``Provenance``), as typed columns named
# ``<prompt>_<field>``: the model, finish_reason, tokens, latency, attempts and the time answered.
METADATA_COLUMNS: dict[str, str] = {
    "model": "string", "finish_reason": "string", "input_tokens": "int64", "output_tokens": "int64",
    "latency_ms": "int64", "attempts": "int64", "answered_at": "timestamp[ms, tz=UTC]",
}


def metadata_features(prompts: Sequence[Prompt]) -> dict[str, Any]:
    """The metadata columns of ``prompts`` (``output.metadata``) with their datasets features;
    ConfigError when one is also a prompt's answer column."""
    import datasets

    answer_columns = {name for prompt in prompts for name in prompt.columns()}
    found = {}
    for prompt in prompts:
        for field_name, dtype in METADATA_COLUMNS.items():
            name = f"{prompt.name}_{field_name}"
            if name in answer_columns:
                raise ConfigError(f"output.metadata: column {name!r} is also an answer column; rename that field")
            found[name] = datasets.Value(dtype)
    return found


def _metadata_values(prompt: Prompt, answer: PromptAnswer) -> dict[str, Any]:
    bought = answer.provenance or Provenance()
    values = {f"{prompt.name}_{name}": getattr(bought, name) for name in METADATA_COLUMNS}
    if bought.answered_at is not None:
        values[f"{prompt.name}_answered_at"] = datetime.datetime.fromtimestamp(bought.answered_at, datetime.timezone.utc)
    return values


def output_columns(prompts: Sequence[Prompt], error_column: str, results: Sequence[RowResult], *,
                   metadata: bool = False) -> dict[str, list]:
    """The prompts' columns and the error column for these results, in order; with ``metadata``,
    then each prompt's metadata columns (``METADATA_COLUMNS``)."""
    columns: dict[str, list] = {name: [] for p in prompts for name in p.columns()}
    columns[error_column] = []
    if metadata:
        columns.update({name: [] for name in metadata_features(prompts)})
    for result in results:
        for prompt in prompts:
            answer = result.answers[prompt.name]
            values = prompt.values(answer.value)
            if metadata:
                values.update(_metadata_values(prompt, answer))
            for name, value in values.items():
                columns[name].append(value)
        columns[error_column].append(result.error)
    return columns


def output_features(source: Any, prompts: Sequence[Prompt], error_column: str, *, metadata: bool = False) -> Any:
    """The output's datasets Features: the source's (images decodable again on load), then the
    prompts' columns and the error column (and, with ``metadata``, the metadata columns); None when
    the source's are unknown. ConfigError for an output column the source already has."""
    if source is None:
        return None
    import datasets  # here: worker processes import the row's neighbours and need no datasets

    out = {name: datasets.Image() if isinstance(feature, datasets.Image) else feature for name, feature in source.items()}
    added = {name: feature for prompt in prompts for name, feature in prompt.columns().items()}
    added[error_column] = datasets.Value("string")
    if metadata:
        added.update(metadata_features(prompts))
    for name, feature in added.items():
        if name in out:
            raise ConfigError(f"the source already has a column {name!r}: choose another output column name "
                              f"(output.caption_column, output.error_column, a prompts: name or a schema field)")
        out[name] = feature
    return datasets.Features(out)


def error_kind(error: str) -> str:
    return error.split(":", 1)[0]


@dataclass
class RowCounts:
    """Rows, rows without error, rows by error kind (a row counts once per kind) and their tokens;
    with ``cost_usd`` when priced (a chunk's counts, as the manifest records them)."""

    rows: int = 0
    ok: int = 0
    errors: Counter = field(default_factory=Counter)
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float | None = None

    def add(self, result: RowResult) -> None:
        self.rows += 1
        self.input_tokens += result.input_tokens
        self.output_tokens += result.output_tokens
        if result.ok:
            self.ok += 1
        else:
            for kind in {error_kind(a.error) for a in result.answers.values() if a.error}:
                self.errors[kind] += 1

    @classmethod
    def of(cls, results: Iterable[RowResult]) -> "RowCounts":
        counts = cls()
        for result in results:
            counts.add(result)
        return counts

    @classmethod
    def total(cls, parts: Iterable["RowCounts"]) -> "RowCounts":
        """The sum of ``parts``; its cost is known when each part's is (None for none at all)."""
        parts = list(parts)
        costs = [part.cost_usd for part in parts]
        return cls(sum(p.rows for p in parts), sum(p.ok for p in parts), sum((p.errors for p in parts), Counter()),
                   sum(p.input_tokens for p in parts), sum(p.output_tokens for p in parts),
                   round(sum(costs), 6) if costs and None not in costs else None)

    def to_json(self) -> dict[str, Any]:
        data = {"rows": self.rows, "ok": self.ok, "errors": dict(self.errors),
                "input_tokens": self.input_tokens, "output_tokens": self.output_tokens}
        if self.cost_usd is not None:
            data["cost_usd"] = self.cost_usd
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "RowCounts":
        """From a manifest's record (those written before capstream recorded costs have none)."""
        return cls(int(data.get("rows") or 0), int(data.get("ok") or 0), Counter(data.get("errors") or {}),
                   int(data.get("input_tokens") or 0), int(data.get("output_tokens") or 0), data.get("cost_usd"))
