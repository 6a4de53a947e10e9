"""``capstream view OUT_DIR``: a self-contained static site of a run, in ``OUT_DIR/view/``.

    view/index.html          the gallery: thumbnails beside their answers, filters, search, pages
    view/report.html         the run report (report.py)
    view/assets/             the gallery's script and style (shipped in the package)
    view/pages/index.js      what the gallery needs first: the prompts, the counts, the error kinds
    view/pages/rows-000000.js    BLOCK_ROWS rows each, in source order, loaded as the pages need them
    view/pages/facets.js     per row, each prompt's error kind and answer length: loaded on the first
                             filter or sort, so the first page never waits for it
    view/thumbs/, view/large/    the thumbnails (thumbs.py), made once per shard

Data files are scripts (``capstream.block(n, rows)``), not JSON fetched: a page opened from the file
system may load scripts and images but not fetch files. Nothing is fetched from the network; every
text is set as text, never as HTML. What is shown comes from the folder alone (``folder.py``).

    >>> site = build_view("out/demo")
    >>> site.index          # out/demo/view/index.html
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ..io.events_log import read_events
from ..row.results import error_kind
from .folder import LoggedRecords, RowView, RunFolder, prompt_columns
from .report import ErrorCounts, write_report
from .thumbs import RowImage, Thumbnails

BLOCK_ROWS = 500  # rows per data file
PAGE_ROWS = 50  # rows per page of the gallery
_PENDING = -1  # a prompt's facet: not answered yet


@dataclass(frozen=True)
class ViewSite:
    """What ``build_view`` wrote."""

    index: Path
    report: Path
    rows: int
    error_rows: int
    pending_rows: int  # rows of chunks not written yet (answers from the log, no image)
    thumbnails_made: int  # this time (the others were re-used)
    seconds: float


def build_view(out_dir: str | Path, *, threads: int | None = None) -> ViewSite:
    """Write (or bring up to date) ``out_dir/view/``; ConfigError when ``out_dir`` is no output folder."""
    started = time.monotonic()
    folder = RunFolder.open(out_dir)
    logged = LoggedRecords.read(folder.layout.results_logs())
    view = folder.layout.view
    view.mkdir(exist_ok=True)
    dataset = folder.config.dataset
    thumbs = Thumbnails(view, dataset.image_column, base_dirs=[dataset.path or "", dataset.data_dir or ""],
                        threads=threads)
    pages = _fresh(view / "pages.new")
    writer = _PageWriter(pages, [p.name for p in folder.prompts])
    try:
        images: list[RowImage] = []
        chunk = None
        for row in folder.rows(logged):
            if row.written and row.chunk != chunk:
                chunk = row.chunk
                images = thumbs.chunk(chunk, folder.layout.shard_path(chunk))
            offset = row.position - row.chunk * folder.chunk_size if row.written else None
            image = images[offset] if offset is not None and offset < len(images) else RowImage(
                note=f"the image is in the output once chunk {row.chunk} is written")
            writer.add(row, image)
        writer.finish(_meta(folder, writer))
    finally:
        thumbs.close(keep=set(folder.manifest.done))
    _swap(pages, view / "pages")
    _copy_assets(view)
    report = write_report(view, folder, logged, read_events(folder.layout.events_logs()), writer.errors)
    return ViewSite(view / "index.html", report, writer.rows, writer.errors.rows, writer.pending, thumbs.made,
                    round(time.monotonic() - started, 3))


class _PageWriter:
    """Rows into data files of BLOCK_ROWS, and each row's facets, as they come."""

    def __init__(self, folder: Path, prompts: list[str]):
        self.folder = folder
        self.prompts = prompts
        self.block: list[dict[str, Any]] = []
        self.blocks = 0
        self.rows = 0
        self.pending = 0
        self.kinds: dict[str, int] = {}  # error kind -> its facet code (1, 2, ...)
        self.facet_kinds: list[list[int]] = [[] for _ in prompts]
        self.facet_lengths: list[list[int]] = [[] for _ in prompts]
        self.errors = ErrorCounts(prompts)

    def add(self, row: RowView, image: RowImage) -> None:
        answers = []
        for i, name in enumerate(self.prompts):
            answer = row.answers.get(name)
            answers.append(answer.to_json() if answer is not None else None)
            if answer is None:
                self.facet_kinds[i].append(_PENDING)
                self.facet_lengths[i].append(0)
                continue
            kind = error_kind(answer.error) if answer.error else None
            self.facet_kinds[i].append(self.kinds.setdefault(kind, len(self.kinds) + 1) if kind else 0)
            self.facet_lengths[i].append(len(answer_text(answer.value)))
        self.errors.add(row)
        data = {"r": self.rows, "c": row.chunk, "x": row.position, "k": row.key_text, "f": image.name,
                "t": image.thumb, "g": image.large, "in": image.note, "e": row.error, "w": int(row.written),
                "a": answers}
        self.block.append({k: v for k, v in data.items() if v is not None})
        self.rows += 1
        self.pending += not row.written
        if len(self.block) == BLOCK_ROWS:
            self._flush()

    def _flush(self) -> None:
        _write_script(self.folder / f"rows-{self.blocks:06d}.js", f"capstream.block({self.blocks}, ", self.block)
        self.blocks += 1
        self.block = []

    def finish(self, meta: dict[str, Any]) -> None:
        if self.block:
            self._flush()
        _write_script(self.folder / "facets.js", "capstream.facets(", {"k": self.facet_kinds, "n": self.facet_lengths})
        meta.update(rows=self.rows, pending=self.pending, blocks=self.blocks, block=BLOCK_ROWS, page=PAGE_ROWS,
                    kinds=[k for k, _ in sorted(self.kinds.items(), key=lambda item: item[1])],
                    errors=self.errors.rows, by_kind=dict(self.errors.by_kind.most_common()))
        _write_script(self.folder / "index.js", "capstream.index(", meta)


def answer_text(value: Any) -> str:
    """An answer as plain text (a schema's fields joined), for its length."""
    if value is None:
        return ""
    if isinstance(value, dict):
        return " ".join(answer_text(v) for v in value.values())
    if isinstance(value, list):
        return " ".join(answer_text(v) for v in value)
    return str(value)


def _meta(folder: RunFolder, writer: _PageWriter) -> dict[str, Any]:
    config, summary = folder.config, folder.summary
    manifest = folder.manifest
    return {
        "title": folder.layout.dir.resolve().name,
        "generated": time.strftime("%Y-%m-%d %H:%M:%S"),
        "complete": manifest.complete,
        "stopped": summary.stopped if summary is not None and not manifest.complete else None,
        "written": sum(counts.rows for counts in manifest.done.values()),
        "chunks_written": len(manifest.done),
        "chunks": manifest.chunks,
        "model": config.model.name,
        "endpoint": config.model.endpoint_label(),
        "prompts": [{"name": p.name, "fields": list(prompt_columns(p)) if p.schema is not None else None,
                     "lists": [f.name for f in p.schema.fields if f.is_list] if p.schema is not None else []}
                    for p in folder.prompts],
        "key_column": config.dataset.key_column,
    }


def _write_script(path: Path, call: str, data: Any) -> None:
    path.write_text(call + json.dumps(data, ensure_ascii=False, separators=(",", ":")) + ");\n", encoding="utf-8")


def _fresh(folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def _swap(new: Path, target: Path) -> None:
    """Put the freshly written ``new`` in place of ``target`` (a page open meanwhile sees one or the other)."""
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def _copy_assets(view: Path) -> None:
    assets = resources.files("capstream.view") / "assets"
    (view / "assets").mkdir(exist_ok=True)
    for name in ("gallery.js", "style.css"):
        (view / "assets" / name).write_bytes((assets / name).read_bytes())
    (view / "index.html").write_bytes((assets / "index.html").read_bytes())


__all__ = ["build_view", "ViewSite", "BLOCK_ROWS", "PAGE_ROWS", "answer_text"]
