"""The output folder's names, decided here once (the store, the Hub export and the card use them).

``output.dir`` is a Hub-ready dataset repo::

    data/<split>-000000.parquet   one shard per finished chunk (source columns + answers + error)
    README.md                     the dataset card (card.py)
    summary.json                  the last run's report (run/summary.py)
    .capstream/manifest.json      fingerprint, chunk size, finished chunks: written last, atomically
    .capstream/config.json        the resolved config, without secrets
    .capstream/pushed.json        what each Hub repo holds of this folder, after every commit
    .capstream/results.jsonl      every answer, appended the moment it arrives (results_log.py)
    .capstream/results-<name>.jsonl   the log of one Ray actor
    .capstream/results.000001.jsonl   a sealed segment of a log, with its .summary.json
    .capstream/batches.json       run.backend batch: the ledger of request files and their batches (batch_ledger.py)
    .capstream/batch/requests-000001.jsonl        a request file (OpenAI batch format), its .index.jsonl beside it
    .capstream/batch/requests-000001.<batch id>.output.jsonl   a batch's output (and .errors.jsonl), downloaded
    .capstream/batch/results/     result files put back by hand (batch.submit: false)
    .capstream/events.jsonl       what happened as the run went: failed attempts, limits, starts (events_log.py)
    .capstream/events-<name>.jsonl    the events of one Ray actor (or of the cluster's limit broker)
    view/                         the site ``capstream view`` writes (gallery, run report)

    >>> layout = OutputLayout("out/run", "train")
    >>> layout.shard_path(3).name
    'train-000003.parquet'
"""

from __future__ import annotations

import os
import re
from pathlib import Path

STATE_DIR = ".capstream"
DATA_DIR = "data"


def shard_name(split: str, chunk_index: int) -> str:
    """A shard's file name; the same locally and in a Hub repo (under another folder there)."""
    return f"{split}-{chunk_index:06d}.parquet"


def shard_pattern(split: str) -> str:
    """The glob matching every shard of ``split`` (``shard_name``'s shape)."""
    return f"{split}-*.parquet"


def shard_index(file_name: str, split: str) -> int | None:
    """The chunk index of a file named as ``shard_name(split, i)`` names it; None for any other name."""
    match = re.fullmatch(re.escape(split) + r"-(\d+)\.parquet", file_name)
    return int(match.group(1)) if match else None


class OutputLayout:
    """Where each file of one run's output folder lives."""

    def __init__(self, out_dir: str | os.PathLike, split: str):
        self.dir = Path(out_dir)
        self.split = split

    @property
    def state(self) -> Path:
        return self.dir / STATE_DIR

    @property
    def data(self) -> Path:
        return self.dir / DATA_DIR

    @property
    def manifest(self) -> Path:
        return self.state / "manifest.json"

    @property
    def saved_config(self) -> Path:
        return self.state / "config.json"

    @property
    def pushed(self) -> Path:
        return self.state / "pushed.json"

    @property
    def summary(self) -> Path:
        return self.dir / "summary.json"

    @property
    def card(self) -> Path:
        return self.dir / "README.md"

    @property
    def shard_glob(self) -> str:
        """The shards relative to the folder, as the card's ``data_files`` names them."""
        return f"{DATA_DIR}/{shard_pattern(self.split)}"

    def shard_path(self, chunk_index: int) -> Path:
        return self.data / shard_name(self.split, chunk_index)

    def shard_paths(self) -> list[Path]:
        return sorted(self.data.glob(shard_pattern(self.split)))

    def results_log(self, name: str = "results") -> Path:
        """The results log a process appends to: ``results`` for a local run, ``results-ray-<n>``
        for a Ray actor."""
        return self.state / f"{name}.jsonl"

    @property
    def batch_ledger(self) -> Path:
        return self.state / "batches.json"

    @property
    def batch_dir(self) -> Path:
        """Request files, their indexes and the batches' downloaded files."""
        return self.state / "batch"

    @property
    def batch_results(self) -> Path:
        """Where result files of request files run elsewhere go (``batch.submit: false``)."""
        return self.batch_dir / "results"

    def request_file(self, number: int) -> Path:
        return self.batch_dir / f"requests-{number:06d}.jsonl"

    def results_logs(self) -> list[Path]:
        """Every results log in the state folder (every process's, and their sealed segments)."""
        return sorted(self.state.glob("results*.jsonl")) if self.state.is_dir() else []

    def events_log(self, name: str = "events") -> Path:
        """The events log a process appends to: ``events`` for a local run, ``events-ray-<n>`` for a
        Ray actor, ``events-ray-broker`` for the cluster's limits."""
        return self.state / f"{name}.jsonl"

    def events_logs(self) -> list[Path]:
        """Every events log in the state folder."""
        return sorted(self.state.glob("events*.jsonl")) if self.state.is_dir() else []

    @property
    def view(self) -> Path:
        """The folder ``capstream view`` writes its site into (never pushed to the Hub)."""
        return self.dir / "view"


__all__ = ["OutputLayout", "STATE_DIR", "DATA_DIR", "shard_name", "shard_pattern", "shard_index"]
