"""The run's output folder: its manifest, its shards, its results logs, and resume.

Progress is recorded datatrove-style: a chunk counts as done only once its shard has been renamed
into place *and* the manifest says so; a rerun skips done chunks and re-uses logged answers for the
rest (``results_log.py``), so no answer is paid for twice. The names of the files are
``layout.py``'s.

    >>> store = RunStore(OutputLayout("out/run", "train"))
    >>> store.check(fingerprint, chunk_size=1000)   # ConfigError: a run made with other settings
    >>> store.open(fingerprint, chunk_size=1000, changes=ResumeChanges(retry_errors=False))
    >>> store.log_answer(LogRecord.of(0, key, "caption", answer))
    >>> store.write_shard(0, columns, features); store.mark_done(0, RowCounts.of(results))
"""

from __future__ import annotations

import datetime
import os
import shutil
from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import ConfigError, ImageError, RunStopped
from ..row.images import KeptFiles, load_image_bytes, url_of
from ..row.results import RowCounts
from .files import atomic_write_bytes, atomic_write_json, read_state
from .layout import OutputLayout
from .results_log import LoggedAnswers, LogRecord, ResultsLog, paid_tokens, read_answers, remove_log, repair_tail


class MayChange(Protocol):
    """Which fingerprint changes a rerun may make (``config.ResumeChanges``)."""

    def allowed(self, key: str, old: Any, new: Any) -> bool: ...

    def hint(self, key: str, old: Any, new: Any) -> str | None: ...


@dataclass(frozen=True)
class SettingsChange:
    """Settings a rerun changed in the folder's fingerprint (``config.ResumeChanges`` says which
    may): when, each key's value before and after, and whether the rerun was ``--retry-errors``."""

    at: str  # ISO 8601, UTC
    changed: dict[str, tuple[Any, Any]]
    retry_errors: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"at": self.at, "changed": {k: list(v) for k, v in self.changed.items()}, "retry_errors": self.retry_errors}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "SettingsChange":
        return cls(data.get("at") or "", {k: tuple(v) for k, v in (data.get("changed") or {}).items()},
                   bool(data.get("retry_errors")))


@dataclass
class Manifest:
    """``.capstream/manifest.json``: what the folder's run is (its fingerprint and chunk size) and
    which chunks are done, with their counts, and the settings reruns changed. Written last,
    atomically, after each shard."""

    fingerprint: dict[str, Any]
    chunk_size: int
    split: str
    done: dict[int, RowCounts] = field(default_factory=dict)
    complete: bool = False
    chunks: int | None = None  # how many chunks the input has, once read to its end
    changes: list[SettingsChange] = field(default_factory=list)

    @classmethod
    def read(cls, layout: OutputLayout) -> "Manifest | None":
        """The folder's manifest, or None when it has none; ConfigError when it cannot be read."""
        data = read_state(layout.manifest)
        if data is None:
            return None
        return cls(data.get("fingerprint") or {}, data.get("chunk_size"), data.get("split") or layout.split,
                   {int(i): RowCounts.from_json(c) for i, c in (data.get("done") or {}).items()},
                   bool(data.get("complete")), data.get("chunks"),
                   [SettingsChange.from_json(c) for c in data.get("changes") or []])

    def to_json(self) -> dict[str, Any]:
        data = {"fingerprint": self.fingerprint, "chunk_size": self.chunk_size, "split": self.split,
                "done": {str(i): c.to_json() for i, c in sorted(self.done.items())}, "complete": self.complete}
        if self.chunks is not None:
            data["chunks"] = self.chunks
        if self.changes:
            data["changes"] = [c.to_json() for c in self.changes]
        return data

    def change(self, fingerprint: dict[str, Any], change: SettingsChange) -> None:
        """A rerun changed these settings: the folder's fingerprint is the new one from now on. When
        the rows may grow (``dataset.limit``), a short last chunk is done no longer: the rerun reads
        it whole (its logged answers re-used), and the input's end is not known any more."""
        self.fingerprint = dict(fingerprint)
        self.changes.append(change)
        if "dataset.limit" in change.changed:
            self.done = {i: c for i, c in self.done.items() if c.rows >= self.chunk_size}
            self.complete, self.chunks = False, None

    def finish(self, total_chunks: int) -> None:
        """The input has ``total_chunks`` chunks: complete once each is done."""
        self.chunks = total_chunks
        self.complete = len(self.done) >= total_chunks

    def totals(self, chunks: Iterable[int] | None = None) -> RowCounts:
        """Counts over the done chunks (``chunks``: only those), from the manifest: no shard is read."""
        wanted = self.done if chunks is None else {i: self.done[i] for i in chunks if i in self.done}
        return RowCounts.total(wanted.values())


class RunStore:
    """One run's ``output.dir``. Not thread-safe: a run calls it from one thread, except
    ``write_shard``, which touches nothing shared and may run in a worker thread.

    ``log_name``: the results log this process appends to (a Ray actor has its own).
    """

    def __init__(self, layout: OutputLayout, *, log_name: str = "results"):
        self.layout = layout
        self.manifest: Manifest | None = None
        self.log = ResultsLog(layout.results_log(log_name))
        self._paid: tuple[int, int] | None = None  # tokens in the results logs, once counted

    @property
    def dir(self):
        return self.layout.dir

    @property
    def split(self) -> str:
        return self.layout.split

    # -- opening, fingerprint, resume --------------------------------------------------------------

    def check(self, fingerprint: dict[str, Any], chunk_size: int, *, overwrite: bool = False,
              changes: MayChange | None = None) -> dict[str, tuple[Any, Any]]:
        """The settings that differ from the folder's run and that ``changes`` allows (key -> before,
        after); ConfigError when the folder holds a run made with others (and not ``overwrite``)."""
        saved = None if overwrite else Manifest.read(self.layout)
        if saved is None:
            return {}
        differ = {k: (saved.fingerprint.get(k), fingerprint.get(k)) for k in sorted(set(fingerprint) | set(saved.fingerprint))
                  if fingerprint.get(k) != saved.fingerprint.get(k)}
        allowed = {k: v for k, v in differ.items() if changes is not None and changes.allowed(k, *v)}
        refused = [k for k in differ if k not in allowed]
        if saved.chunk_size != chunk_size:
            refused.append("run.chunk_size")
        if refused:
            hints = [h for k in refused if k in differ and changes is not None and (h := changes.hint(k, *differ[k]))]
            raise ConfigError(
                f"output.dir {str(self.dir)!r} holds a run made with other settings "
                f"(changed: {', '.join(refused)}); use another output.dir, or --overwrite to start again"
                + "".join(f"; {hint}" for hint in hints))
        return allowed

    def open(self, fingerprint: dict[str, Any], chunk_size: int, *, overwrite: bool = False,
             changes: MayChange | None = None, retry_errors: bool = False) -> bool:
        """Start or resume; True when an earlier run is resumed. A state made with other settings
        refuses (ConfigError) unless ``changes`` allows them (recorded in the manifest) or
        ``overwrite``, which discards it."""
        changed = self.check(fingerprint, chunk_size, overwrite=overwrite, changes=changes)
        if overwrite and self.dir.exists():
            self._clear()
        self.manifest = Manifest.read(self.layout)
        resuming = self.manifest is not None
        if self.manifest is None:
            self.manifest = Manifest(fingerprint, chunk_size, self.split)
            self.layout.state.mkdir(parents=True, exist_ok=True)
            self._save_manifest()
        elif changed:
            at = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            self.manifest.change(fingerprint, SettingsChange(at, changed, retry_errors))
            self._save_manifest()
        for log in self.layout.results_logs():
            repair_tail(log)
        return resuming

    def save_config(self, redacted: dict[str, Any]) -> None:
        """The run's resolved config, secrets removed (``Config.redacted()``), for ``capstream push``."""
        atomic_write_json(self.layout.saved_config, redacted)

    def _clear(self) -> None:
        for shard in self.layout.shard_paths():
            shard.unlink()
        self.layout.manifest.unlink(missing_ok=True)
        for log in self.layout.results_logs():
            remove_log(log)
        self.layout.batch_ledger.unlink(missing_ok=True)  # a batch run's (none in flight: setup.py checks)
        if self.layout.batch_dir.is_dir():
            shutil.rmtree(self.layout.batch_dir)
        for log in self.layout.events_logs():  # the run report's events belong to the run discarded
            log.unlink(missing_ok=True)

    @property
    def done_chunks(self) -> set[int]:
        return set(self.manifest.done) if self.manifest else set()

    @property
    def complete(self) -> bool:
        return bool(self.manifest and self.manifest.complete)

    def chunks_to_skip(self, retry_errors: bool) -> set[int]:
        """Chunks a run need not read: the done ones, less those with errors when they are retried."""
        done = self.manifest.done if self.manifest else {}
        return {i for i, counts in done.items() if not (retry_errors and counts.errors)}

    def nothing_to_do(self, skip_chunks: set[int]) -> bool:
        """A finished run run again, with nothing to retry: its input is not read again."""
        return self.complete and not skip_chunks ^ self.done_chunks

    def rows_in(self, chunks: Iterable[int]) -> int:
        return self.manifest.totals(chunks).rows if self.manifest else 0

    def logged_answers(self, skip_chunks: Iterable[int], *, ok_only: bool = False) -> LoggedAnswers:
        """Answers already received for rows of chunks not skipped (see ``results_log.read_answers``);
        counts the tokens paid on the way, so ``paid_tokens`` need not read the logs again."""
        found = read_answers(self.layout.results_logs(), skip_chunks, ok_only=ok_only)
        self._paid = found.paid
        if self.log.path in found.tallies:  # this process appends to it next: no second read then
            self.log.holds(found.tallies[self.log.path])
        return found

    def paid_tokens(self) -> tuple[int, int]:
        """Input and output tokens of every answer in the results logs: what all runs into this folder
        paid for (an answer asked again with ``--retry-errors`` counts each time it was bought).
        Counted by ``logged_answers`` when it ran (what the logs held then); read here otherwise."""
        return self._paid if self._paid is not None else paid_tokens(self.layout.results_logs())

    # -- during the run ----------------------------------------------------------------------------

    def log_answer(self, record: LogRecord) -> None:
        """Append one answer to this process's results log; durable (in the OS) before it counts."""
        self.log.append(record)

    def write_shard(self, chunk_index: int, columns: dict[str, list], features: Any,
                    base_dir: str | None, files_read: KeptFiles | None = None) -> None:
        """Write one finished chunk as a parquet shard, atomically. ``files_read``: image files
        already read by path (see ``_embed_image_files``)."""
        import datasets

        columns = dict(columns)
        if features is not None:
            for name, feature in features.items():
                if isinstance(feature, datasets.Image):
                    columns[name] = _embed_image_files(columns[name], base_dir, files_read)
            table = pa.Table.from_pydict(columns, schema=features.arrow_schema)
        else:
            table = pa.Table.from_pydict(columns)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        path = self.layout.shard_path(chunk_index)
        try:
            atomic_write_bytes(path, sink.getvalue().to_pybytes())
        except OSError as err:
            raise RunStopped(f"cannot write shard {path}: {err.strerror or err}") from None

    def mark_done(self, chunk_index: int, counts: RowCounts) -> None:
        """Record a written shard with its counts (rows, ok, errors by kind, tokens, cost): written last."""
        self.manifest.done[chunk_index] = counts
        self._save_manifest()

    def totals(self) -> RowCounts:
        """Counts over every written shard, from the manifest (no shard is read)."""
        return self.manifest.totals() if self.manifest else RowCounts()

    def finish(self, total_chunks: int) -> None:
        self.manifest.finish(total_chunks)
        self._save_manifest()

    def _save_manifest(self) -> None:
        try:
            atomic_write_json(self.layout.manifest, self.manifest.to_json())
        except OSError as err:
            raise RunStopped(f"cannot write {self.layout.manifest}: {err.strerror or err}") from None

    def close(self) -> None:
        self.log.close()


def _embed_image_files(values: list, base_dir: str | None, files_read: KeptFiles | None = None) -> list:
    """Images stored as paths (local, or files of a Hub repo) get their file's bytes, so the output
    folder stands alone; taken from ``files_read`` (path as in the row -> bytes, emptied as used)
    when the run already read them. A URL is left as it is (``output.embed_images`` embeds those,
    through the downloads' safety rules: ``core/run.py``)."""
    out = []
    for v in values:
        if isinstance(v, dict) and v.get("bytes") is None and v.get("path") and url_of(v) is None:
            path = v["path"]
            data = files_read.pop(path, None) if files_read is not None else None
            if data is None:
                try:
                    data = load_image_bytes(path, base_dir=base_dir)
                except ImageError:
                    out.append(v)  # keep the path: the row's error column already says the image was unusable
                    continue
            v = {"bytes": data, "path": os.path.basename(path.rstrip("/"))}
        out.append(v)
    return out


__all__ = ["RunStore", "Manifest", "SettingsChange", "MayChange"]
