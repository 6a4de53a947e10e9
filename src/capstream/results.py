"""What a row gets: each prompt's answer, the row's result, and running totals.

``PromptAnswer`` is one prompt's outcome for one row (a value or an error, the tokens paid, where
it came from); ``RowResult`` is a row's answers and its error text; ``Stats`` counts rows, errors by
kind, requests and tokens. The helpers turn results-log records into answers and results into the
output's columns; both backends (engine.py, ray_backend.py) use them.

    >>> answers = {"caption": PromptAnswer("a red square", input_tokens=120, output_tokens=4)}
    >>> result = row_result(prompts, answers)
    >>> output_columns(prompts, "error", [result])
    {'caption': ['a red square'], 'error': [None]}
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

from .prompts import Prompt, check_placeholders, combined_error
from .store import output_features


@dataclass
class PromptAnswer:
    """One prompt's outcome for one row: a value (text, or the schema's fields as a dict) or an
    error (``"<Kind>: <message>"``), the tokens paid for it, and where it came from."""

    value: Any = None
    error: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    source: str = "request"  # request | log (an earlier run into this output.dir) | dedup | cache

    @property
    def ok(self) -> bool:
        return self.error is None


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


def answers_from_log(records: dict[str, dict]) -> dict[str, PromptAnswer]:
    """A row's logged answers (prompt name -> results-log record) as PromptAnswers."""
    return {prompt: PromptAnswer(r["v"], r["e"], r["ti"], r["to"], source="log") for prompt, r in records.items()}


def row_result(prompts: Sequence[Prompt], answers: dict[str, PromptAnswer]) -> RowResult | None:
    """The row's result once every prompt has an answer (None before)."""
    if not all(p.name in answers for p in prompts):
        return None
    return RowResult({p.name: answers[p.name] for p in prompts},
                     combined_error(prompts, {p.name: answers[p.name].error for p in prompts}))


def output_columns(prompts: Sequence[Prompt], error_column: str, results: Sequence[RowResult]) -> dict[str, list]:
    """The prompts' columns and the error column for these results, in order."""
    columns: dict[str, list] = {name: [] for p in prompts for name in p.columns()}
    columns[error_column] = []
    for result in results:
        for prompt in prompts:
            for name, value in prompt.values(result.answers[prompt.name].value).items():
                columns[name].append(value)
        columns[error_column].append(result.error)
    return columns


def output_layout(prompts: Sequence[Prompt], source_features: Any, image_column: str,
                  error_column: str) -> tuple[Any, list[str]]:
    """The output's features (source + the prompts' columns + error) and the source columns the
    prompts' ``{column}`` placeholders read; ConfigError for a placeholder naming no column."""
    added = {name: feature for prompt in prompts for name, feature in prompt.columns().items()}
    features = output_features(source_features, added, error_column)
    check_placeholders(prompts, list(source_features) if source_features is not None else None, image_column)
    return features, sorted({name for prompt in prompts for name in prompt.placeholders})


def error_kind(error: str) -> str:
    return error.split(":", 1)[0]


@dataclass
class Stats:
    """Running totals of one session (or one run)."""

    rows: int = 0
    ok: int = 0
    errors: Counter = field(default_factory=Counter)  # rows by error kind (a row counts once per kind)
    requests: int = 0
    retries: int = 0
    worker_requests: int = 0  # attempts sent from worker processes (run.workers > 1)
    input_tokens: int = 0
    output_tokens: int = 0
    reused: Counter = field(default_factory=Counter)  # answers not bought: by source (log, dedup, cache)

    def add(self, result: RowResult, *, tokens: bool = True) -> None:
        """Count a row (``tokens=False``: its tokens were counted as each answer arrived)."""
        self.rows += 1
        if tokens:
            self.input_tokens += result.input_tokens
            self.output_tokens += result.output_tokens
        if result.ok:
            self.ok += 1
        else:
            for kind in {error_kind(a.error) for a in result.answers.values() if a.error}:
                self.errors[kind] += 1

    def add_answered_elsewhere(self, result: RowResult) -> None:
        """Count a row a worker process answered: only its answers bought this run cost tokens."""
        self.add(result, tokens=False)
        for answer in result.answers.values():
            if answer.source == "request":
                self.input_tokens += answer.input_tokens
                self.output_tokens += answer.output_tokens
            elif answer.source in ("cache", "dedup"):
                self.reused[answer.source] += 1

    def as_counts(self) -> dict:
        return {"rows": self.rows, "ok": self.ok, "errors": dict(self.errors),
                "input_tokens": self.input_tokens, "output_tokens": self.output_tokens}
