"""The run directory: parquet shards, the append-only results log, the manifest, resume.

Layout of ``output.dir``::

    data/<split>-000000.parquet   one shard per finished chunk (source columns + caption + error)
    README.md                     the dataset card (sinks.py)
    summary.json                  the last run's report
    .capstream/results.jsonl      every answer, appended the moment it arrives
    .capstream/results.000001.jsonl  a sealed segment of it (the log is sealed every 64 MB) ...
    .capstream/results.000001.jsonl.summary.json  ... and what it holds: its chunks, the tokens paid
    .capstream/manifest.json      fingerprint, chunk size, finished chunks: written last, atomically
    .capstream/config.json        the resolved config, without secrets

Progress is recorded datatrove-style: a chunk counts as done only once its shard has been renamed
into place *and* the manifest says so; a rerun skips done chunks and re-uses logged answers for the
rest, so no answer is paid for twice. The same goes for the log's segments: a segment's summary is
written last, and a rerun reads no segment whose summary says all its chunks are done, so resuming
a 10M-row run reads the last segments, not every answer ever logged.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import ConfigError, ImageError, RunStopped
from .images import load_image_bytes

STATE_DIR = ".capstream"
SEGMENT_SUFFIX = ".summary.json"  # next to a sealed results-log segment: its chunks and paid tokens


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same folder and rename, so readers never see half a file."""
    if path.parent.exists() and not path.parent.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"{path.parent} is not a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def output_features(source: datasets.Features | None, added: dict[str, Any], error_column: str) -> datasets.Features | None:
    """Source features with images decodable again on load, plus the prompts' columns (``added``:
    name -> feature) and the error column."""
    if source is None:
        return None
    out = {}
    for name, feature in source.items():
        out[name] = datasets.Image() if isinstance(feature, datasets.Image) else feature
    for name, feature in {**added, error_column: datasets.Value("string")}.items():
        if name in out:
            raise ConfigError(f"the source already has a column {name!r}: choose another output column name "
                              f"(output.caption_column, output.error_column, a prompts: name or a schema field)")
        out[name] = feature
    return datasets.Features(out)


def _embed_image_files(values: list, base_dir: str | None, files_read: dict[str, bytes] | None = None) -> list:
    """Images stored as paths (local, or files of a Hub repo) get their file's bytes, so the output
    folder stands alone; taken from ``files_read`` (path as in the row -> bytes, emptied as used)
    when the run already read them."""
    out = []
    for v in values:
        if isinstance(v, dict) and v.get("bytes") is None and v.get("path"):
            path = v["path"]
            data = files_read.pop(path, None) if files_read is not None else None
            if data is not None:
                out.append({"bytes": data, "path": os.path.basename(path)})
                continue
            if base_dir and not os.path.isabs(path) and not path.startswith("hf://") and not os.path.exists(path):
                path = f"{base_dir}/{path}" if base_dir.startswith("hf://") else os.path.join(base_dir, path)
            try:
                if path.startswith("hf://"):  # a file of a Hub repo
                    v = {"bytes": load_image_bytes(path), "path": path.rsplit("/", 1)[-1]}
                else:
                    with open(path, "rb") as f:
                        v = {"bytes": f.read(), "path": os.path.basename(path)}
            except (OSError, ImageError):
                pass  # keep the path: the row's error column already says the image was unusable
        out.append(v)
    return out


class RunStore:
    """One run's ``output.dir``. Not thread-safe: the engine calls it from its event loop only,
    except ``write_shard``, which touches nothing shared and runs in a worker thread."""

    segment_bytes = 64 * 2**20  # this process's results log is sealed into a segment at this size

    def __init__(self, out_dir: str | os.PathLike, split: str, *, results_name: str = "results.jsonl"):
        self.dir = Path(out_dir)
        self.split = split
        self.state = self.dir / STATE_DIR
        self.manifest_path = self.state / "manifest.json"
        # The log this process appends to; workers of the Ray backend each have their own
        # (results-<worker>.jsonl) and every log is read on resume.
        self.results_path = self.state / results_name
        self.manifest: dict[str, Any] = {}
        self._paid: tuple[int, int] | None = None  # tokens in the results logs, once counted
        self._log = None
        self._log_bytes = 0
        self._log_tally = _Tally()
        self._open_log_tally: _Tally | None = None  # what logged_results counted in this process's log

    # -- opening, fingerprint, resume --------------------------------------------------------------

    def check(self, fingerprint: dict[str, Any], chunk_size: int, *, overwrite: bool = False) -> None:
        """ConfigError when the folder holds a run made with other settings (and not ``overwrite``)."""
        if overwrite or not self.manifest_path.exists():
            return
        saved = json.loads(self.manifest_path.read_text())
        changed = sorted(k for k in set(fingerprint) | set(saved.get("fingerprint", {}))
                         if fingerprint.get(k) != saved.get("fingerprint", {}).get(k))
        if saved.get("chunk_size") != chunk_size:
            changed.append("run.chunk_size")
        if changed:
            raise ConfigError(
                f"output.dir {str(self.dir)!r} holds a run made with other settings "
                f"(changed: {', '.join(changed)}); use another output.dir, or --overwrite to start again"
            )

    def open(self, fingerprint: dict[str, Any], chunk_size: int, *, overwrite: bool = False) -> None:
        """Start or resume. A state made with other settings refuses (ConfigError) unless ``overwrite``."""
        self.check(fingerprint, chunk_size, overwrite=overwrite)
        if overwrite and self.dir.exists():
            self._clear()
        if self.manifest_path.exists():
            self.manifest = json.loads(self.manifest_path.read_text())
        else:
            self.manifest = {"fingerprint": fingerprint, "chunk_size": chunk_size, "split": self.split,
                             "done": {}, "complete": False}
            self.state.mkdir(parents=True, exist_ok=True)
            self._save_manifest()
        for log in self.results_logs():
            try:
                self._repair_log_tail(log)
            except OSError as err:
                raise RunStopped(f"cannot use {log}: {err.strerror or err}") from None

    def _clear(self) -> None:
        for shard in self.shard_paths():
            shard.unlink()
        (self.state / "manifest.json").unlink(missing_ok=True)
        for log in self.results_logs():
            log.unlink()
            _summary_path(log).unlink(missing_ok=True)

    def results_logs(self) -> list[Path]:
        """Every results log in the state folder: this process's and the Ray workers' ones, and
        their sealed segments."""
        return sorted(self.state.glob("results*.jsonl")) if self.state.is_dir() else []

    def _repair_log_tail(self, log: Path) -> None:
        """A kill mid-write can leave half a line at the end: cut it so appends start on a clean line."""
        with open(log, "rb+") as f:
            end = f.seek(0, os.SEEK_END)
            pos = end
            while pos > 0:  # back, block by block, to the last newline
                start = max(0, pos - 65536)
                f.seek(start)
                block = f.read(pos - start)
                if pos == end and block.endswith(b"\n"):
                    return
                cut = block.rfind(b"\n")
                if cut >= 0:
                    f.truncate(start + cut + 1)
                    return
                pos = start
            f.truncate(0)  # no complete line at all

    @property
    def done_chunks(self) -> set[int]:
        return {int(i) for i in self.manifest.get("done", {})}

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    def chunks_with_errors(self) -> set[int]:
        return {int(i) for i, counts in self.manifest.get("done", {}).items() if counts.get("errors")}

    def chunks_to_skip(self, retry_errors: bool) -> set[int]:
        """Chunks a run need not read: the done ones, less those with errors when they are retried."""
        return self.done_chunks - (self.chunks_with_errors() if retry_errors else set())

    def nothing_to_do(self, skip_chunks: set[int]) -> bool:
        """A finished run run again, with nothing to retry: its input is not read again."""
        return self.complete and not skip_chunks ^ self.done_chunks

    def rows_in(self, chunks: Iterable[int]) -> int:
        done = self.manifest.get("done", {})
        return sum(done[str(i)]["rows"] for i in chunks if str(i) in done)

    def logged_results(self, skip_chunks: Iterable[int], *, ok_only: bool = False) -> dict[Any, dict[str, dict]]:
        """Answers already received for rows of chunks not skipped: key -> prompt name -> record.

        A log is append-only, so an answer given twice (``--retry-errors``) has its newest one win.
        Across several logs (Ray workers) there is no order: an answer without error wins over one
        with, which is the same thing, since only answers with an error are ever asked again.
        """
        skip = set(skip_chunks)
        found: dict[Any, dict[str, dict]] = {}
        paid_in = paid_out = 0
        for log in self.results_logs():
            summary = _read_summary(log)
            if summary is not None and set(summary["chunks"]) <= skip:  # nothing in it is needed
                paid_in, paid_out = paid_in + summary["paid"][0], paid_out + summary["paid"][1]
                continue
            in_log, tally = {}, _Tally()
            for r in self._records(log):
                tally.add(r["i"], r.get("ti"), r.get("to"))
                if r["i"] not in skip:
                    in_log[(_hashable(r["k"]), r["p"])] = r
            paid_in, paid_out = paid_in + tally.paid[0], paid_out + tally.paid[1]
            if log == self.results_path and self._log is None:
                self._open_log_tally = tally  # this process appends to it next: no second read then
            for (key, prompt), record in in_log.items():
                by_prompt = found.setdefault(key, {})
                if prompt not in by_prompt or by_prompt[prompt]["e"] is not None:
                    by_prompt[prompt] = record
        self._paid = (paid_in, paid_out)  # the same pass: paid_tokens() need not read the logs again
        if ok_only:
            found = {k: good for k, by_prompt in found.items()
                     if (good := {p: r for p, r in by_prompt.items() if r["e"] is None})}
        return found

    def paid_tokens(self) -> tuple[int, int]:
        """Input and output tokens of every answer in the results logs: what all runs into this folder
        paid for (an answer asked again with ``--retry-errors`` counts each time it was bought).
        Counted by ``logged_results`` when it ran (what the logs held then); read here otherwise."""
        if self._paid is not None:
            return self._paid
        paid_in = paid_out = 0
        for log in self.results_logs():
            summary = _read_summary(log)
            paid = summary["paid"] if summary is not None else self._tally(log).paid
            paid_in, paid_out = paid_in + paid[0], paid_out + paid[1]
        return paid_in, paid_out

    def _tally(self, log: Path) -> "_Tally":
        tally = _Tally()
        for record in self._records(log):
            tally.add(record["i"], record.get("ti"), record.get("to"))
        return tally

    @staticmethod
    def _records(log: Path) -> Iterator[dict]:
        """Every complete record of one results log (a line cut by a kill is skipped)."""
        try:
            with open(log, encoding="utf-8") as f:
                for line in f:
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError:
                        continue
        except OSError as err:
            raise RunStopped(f"cannot read {log}: {err.strerror or err}") from None

    # -- during the run ----------------------------------------------------------------------------

    def log_answer(self, chunk_index: int, key: Any, prompt: str, answer: Any) -> None:
        """Append one prompt's answer for one row; it is durable (in the OS) before it counts.

        Unbuffered: each line goes to the OS in one write, so a kill loses nothing written and a
        failed write (disk full) leaves no buffered bytes to fail again later. A line cut short is
        removed when the log is next opened.
        """
        line = (json.dumps({"i": chunk_index, "k": key, "p": prompt, "v": answer.value, "e": answer.error,
                            "ti": answer.input_tokens, "to": answer.output_tokens}, ensure_ascii=False) + "\n").encode()
        try:
            if self._log is None:
                self._log = open(self.results_path, "ab", buffering=0)
                self._log_bytes = self._log.seek(0, os.SEEK_END)
                # What the log already holds (an earlier run's answers), for the segment's summary:
                # counted by logged_results when it read the log at resume, else read here.
                self._log_tally = self._open_log_tally or (self._tally(self.results_path) if self._log_bytes
                                                           else _Tally())
                self._open_log_tally = None
            if self._log.write(line) != len(line):
                raise OSError(errno.ENOSPC, "short write (disk full?)")
            self._log_bytes += len(line)
            self._log_tally.add(chunk_index, answer.input_tokens, answer.output_tokens)
            if self._log_bytes >= self.segment_bytes:
                self._seal_log()
        except OSError as err:
            raise RunStopped(f"cannot write {self.results_path}: {err.strerror or err}") from None

    def _seal_log(self) -> None:
        """Rename this process's log to the next segment and write the segment's summary, last: a
        kill in between leaves a segment without one, which a rerun reads whole, as before."""
        os.fsync(self._log.fileno())
        self._log.close()
        self._log, self._log_bytes = None, 0
        stem = self.results_path.name[: -len(".jsonl")]
        numbers = [int(p.name[len(stem) + 1: -len(".jsonl")]) for p in self.state.glob(f"{stem}.*.jsonl")
                   if p.name[len(stem) + 1: -len(".jsonl")].isdigit()]
        segment = self.state / f"{stem}.{max(numbers, default=0) + 1:06d}.jsonl"
        os.replace(self.results_path, segment)
        atomic_write_json(_summary_path(segment), self._log_tally.summary())

    def shard_path(self, chunk_index: int) -> Path:
        return self.dir / "data" / f"{self.split}-{chunk_index:06d}.parquet"

    def shard_paths(self) -> list[Path]:
        return sorted((self.dir / "data").glob(f"{self.split}-*.parquet"))

    def write_shard(self, chunk_index: int, columns: dict[str, list], features: datasets.Features | None,
                    base_dir: str | None, files_read: dict[str, bytes] | None = None) -> None:
        """Write one finished chunk as a parquet shard, atomically (runs in a worker thread).
        ``files_read``: image files already read by path (see ``_embed_image_files``)."""
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
        try:
            atomic_write_bytes(self.shard_path(chunk_index), sink.getvalue().to_pybytes())
        except OSError as err:
            raise RunStopped(f"cannot write shard {self.shard_path(chunk_index)}: {err.strerror or err}") from None

    def mark_done(self, chunk_index: int, counts: dict[str, Any]) -> None:
        """Record a written shard with its counts (rows, ok, errors by kind, tokens): written last."""
        self.manifest["done"][str(chunk_index)] = counts
        self._save_manifest()

    def totals(self) -> dict[str, Any]:
        """Counts over every written shard, from the manifest (no shard is read)."""
        total: dict[str, Any] = {"rows": 0, "ok": 0, "errors": {}, "input_tokens": 0, "output_tokens": 0}
        for counts in self.manifest.get("done", {}).values():
            for name in ("rows", "ok", "input_tokens", "output_tokens"):
                total[name] += counts.get(name, 0)
            for kind, n in counts.get("errors", {}).items():
                total["errors"][kind] = total["errors"].get(kind, 0) + n
        return total

    def finish(self, total_chunks: int) -> None:
        self.manifest["complete"] = len(self.manifest["done"]) >= total_chunks
        self.manifest["chunks"] = total_chunks
        self._save_manifest()

    def _save_manifest(self) -> None:
        try:
            atomic_write_json(self.manifest_path, self.manifest)
        except OSError as err:
            raise RunStopped(f"cannot write {self.manifest_path}: {err.strerror or err}") from None

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


class _Tally:
    """What a results-log segment holds, counted as it is written: its chunks and the tokens paid."""

    def __init__(self) -> None:
        self.chunks: set[int] = set()
        self.paid = [0, 0]

    def add(self, chunk_index: int, input_tokens: int | None, output_tokens: int | None) -> None:
        self.chunks.add(chunk_index)
        self.paid[0] += input_tokens or 0
        self.paid[1] += output_tokens or 0

    def summary(self) -> dict[str, Any]:
        return {"chunks": sorted(self.chunks), "paid": list(self.paid)}


def _summary_path(log: Path) -> Path:
    return log.with_name(log.name + SEGMENT_SUFFIX)


def _read_summary(log: Path) -> dict | None:
    """A sealed segment's summary; None for a log still appended to, or one sealed by a run that
    was killed before it wrote the summary (read whole, then)."""
    try:
        summary = json.loads(_summary_path(log).read_text())
        return summary if isinstance(summary.get("chunks"), list) and len(summary.get("paid", ())) == 2 else None
    except (OSError, ValueError, AttributeError):
        return None


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key
