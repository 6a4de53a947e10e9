"""``summary.json``: the report of the last run into an output folder.

One writer (``RunSummary.to_json``, called by the run core) and one reader (``from_json``, used by
the card, the Hub export and the CLI). The folder's totals come from the manifest (the rows in the
written shards); the rest is this run's: its rows, requests, time, money, dates.

    >>> summary = RunSummary.read(layout)       # None when the folder has none yet
    >>> summary.cost_usd, summary.complete
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..row.results import RowCounts
from .files import atomic_write_json, read_json
from .layout import OutputLayout


@dataclass
class HubReport:
    """How the last push went: the repo, and its commit and shard count, or the error."""

    repo: str
    commit: str | None = None
    shards: int | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        if self.error is not None:
            return {"repo": self.repo, "error": self.error}
        return {"repo": self.repo, "commit": self.commit, "shards": self.shards}


@dataclass
class RunSummary:
    """What a run into a folder did; the keys of ``summary.json``."""

    # the folder's totals, over the written shards
    rows: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    input_tokens: int = 0
    output_tokens: int = 0
    complete: bool = False
    # this run
    rows_this_run: int = 0
    rows_from_log: int = 0  # rows whose answers an earlier run into the folder had received
    rows_pending: int = 0  # rows answered (this run, or from the log) in chunks not written yet: the rerun writes them
    requests: int = 0
    retries: int = 0
    worker_requests: int = 0  # attempts sent from worker processes (every one, on Ray)
    reused: dict[str, int] = field(default_factory=dict)  # answers not bought this run: cache, dedup
    seconds: float = 0.0
    rows_per_s: float = 0.0
    model: str | None = None
    endpoint: str | None = None
    output_dir: str | None = None
    load_with: str | None = None  # the Python line that loads the output folder
    stopped: str | None = None  # why the run stopped early; None when it did not
    # money, all runs into the folder
    paid_input_tokens: int = 0
    paid_output_tokens: int = 0
    cost_usd: float | None = None
    cost_usd_this_run: float | None = None
    prices: dict[str, Any] = field(default_factory=dict)
    max_cost_usd: float | None = None
    # dates (a resumed run keeps the first run's start)
    started: str | None = None
    finished: str | None = None
    # where the work ran
    backend: str = "local"
    ray_workers: int | None = None
    startup_s: float | None = None  # Ray: starting it, its first read and the actors
    hub: HubReport | None = None

    @classmethod
    def of_counts(cls, totals: RowCounts, **rest: Any) -> "RunSummary":
        """A summary whose folder totals are ``totals``."""
        return cls(rows=totals.rows, ok=totals.ok, errors=dict(totals.errors), input_tokens=totals.input_tokens,
                   output_tokens=totals.output_tokens, **rest)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["hub"] = self.hub.to_json() if self.hub is not None else None
        for key in ("ray_workers", "startup_s", "hub"):  # only where they say something
            if data[key] is None:
                del data[key]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "RunSummary":
        """From a ``summary.json`` of this or an earlier capstream (unknown keys are ignored)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in (data or {}).items() if k in known}
        if isinstance(values.get("hub"), dict):
            values["hub"] = HubReport(**{k: v for k, v in values["hub"].items()
                                         if k in ("repo", "commit", "shards", "error")})
        else:
            values.pop("hub", None)
        return cls(**values)

    @classmethod
    def read(cls, layout: OutputLayout) -> "RunSummary | None":
        try:
            data = read_json(layout.summary)
        except (OSError, ValueError):
            return None
        return cls.from_json(data) if isinstance(data, dict) else None

    def write(self, layout: OutputLayout) -> None:
        atomic_write_json(layout.summary, self.to_json())


__all__ = ["RunSummary", "HubReport"]
