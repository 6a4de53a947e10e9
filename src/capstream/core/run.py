"""The run core: what every run does, wherever its requests go.

    setup.py ──parts──▶ RunCore.run(backend)
                          ├─ skip the chunks done, re-use logged answers, meter the cost
                          ├─ backend.run(core): for each chunk it reads ─▶ core.open_chunk
                          │      rows of ChunkWork.todo ──(sent its own way)──▶ each answer logged
                          │      core.row_done(row's result) ─▶ chunk complete ─▶ core.write_shard,
                          │                                                      core.shard_written
                          └─ summary, card, the Hub export's last push

A backend (``backends/local.py``: this process's event loop; ``backends/ray.py``: Ray actors) only
decides where the rows are sent and how their answers come back. Everything else is here, once:
which chunks are skipped, which answers are re-used, what a chunk's shard and counts are, the cost
meter and budget, progress, the summary, the card, the Hub export and the last push.

    >>> core = RunCore(config, store, shape, retry_errors=False, exporter=None, total_rows=1000,
    ...                show_progress=True, started=time.time(), resuming=False)
    >>> result = core.run(LocalBackend(...))     # RunStopped (with .summary) when it stops early
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, Sequence

from ..cost.meter import BudgetGuard, CostMeter, Prices
from ..errors import ConfigError, HubError, Interrupted, RunStopped
from ..io.card import loading_code, write_card
from ..io.events_log import EventsLog, RunMark
from ..io.hub import HubExporter
from ..io.results_log import LogRecord, hashable_key
from ..io.source import Chunk
from ..io.store import RunStore
from ..io.summary import HubReport, RunSummary
from ..model.sending import Usage
from ..row.downloads import embedded_images
from ..row.images import KeptFiles
from ..row.prompts import Prompt, check_placeholders
from ..row.results import PromptAnswer, RowCounts, RowResult, error_kind, output_columns, output_features, row_result
from ..row.session import RecordAnswer
from .progress import ProgressBar

if TYPE_CHECKING:
    from ..config import Config

log = logging.getLogger("capstream.run")

# Requests in flight when a run stops finish within model.timeout_s; this much more is allowed for
# their answers to come back (over a Ray actor call, for instance) before they are given up.
DRAIN_GRACE_S = 10.0


@dataclass(frozen=True)
class RowShape:
    """How a chunk's rows are read and written: the prompts, the columns they read (image, key,
    ``{column}`` placeholders), where relative image paths point, and the output's features."""

    prompts: tuple[Prompt, ...]
    image_column: str
    key_column: str | None
    template_columns: tuple[str, ...]
    error_column: str
    features: Any  # datasets.Features of the output, or None when the source's are unknown
    base_dir: str | None = None
    metadata: bool = False  # output.metadata: each prompt's metadata columns too
    # output.embed_images: the Image column that gets the downloaded bytes (the image column itself
    # when it is an Image column whose paths are URLs), or None.
    embedded: str | None = None

    @classmethod
    def of(cls, prompts: Sequence[Prompt], source_features: Any, *, image_column: str, key_column: str | None,
           error_column: str, base_dir: str | None, metadata: bool = False,
           embedded_column: str | None = None) -> "RowShape":
        """ConfigError for a placeholder naming no column, or an output column the source has.
        ``embedded_column``: with ``output.embed_images``, the Image column to add beside a column of
        URL strings."""
        features = output_features(source_features, prompts, error_column, metadata=metadata)
        check_placeholders(list(prompts), list(source_features) if source_features is not None else None, image_column)
        template = sorted({name for prompt in prompts for name in prompt.placeholders})
        embedded = embedded_column
        if embedded_column is not None and features is not None:
            import datasets

            if isinstance(features.get(image_column), datasets.Image):
                embedded = image_column  # the bytes go into the Image values themselves
            else:
                features = _with_column_after(features, image_column, embedded_column, datasets.Image())
        return cls(tuple(prompts), image_column, key_column, tuple(template), error_column, features, base_dir,
                   metadata=metadata, embedded=embedded)


@dataclass(frozen=True)
class RowToDo:
    """A row a backend must ask about: its place, its key, its image, the columns its prompts'
    placeholders read, and the answers already logged for some of its prompts."""

    offset: int
    key: Any
    image: Any
    row: dict[str, Any]
    known: dict[str, PromptAnswer]


class ChunkWork:
    """One chunk as a run goes through it: every row's result, as they come back."""

    def __init__(self, chunk: Chunk, results: list[RowResult | None], todo: list[RowToDo]):
        self.chunk = chunk
        self.results = results
        self.todo = todo
        self.pending = len(todo)

    @property
    def index(self) -> int:
        return self.chunk.index

    @property
    def complete(self) -> bool:
        return self.pending == 0

    def done(self, offset: int, result: RowResult) -> bool:
        """A row's result is in; True once every row's is."""
        self.results[offset] = result
        self.pending -= 1
        return self.complete


class Backend(Protocol):
    """Where a run's requests go. ``run(core)`` asks about every row of the chunks the core does not
    skip and returns how many chunks the input has; it raises ``RunStopped`` when the run stops early
    (``Interrupted`` for a stop request). ``name``, ``workers`` and ``startup_s`` go in the summary."""

    name: str
    workers: int | None
    startup_s: float | None

    def run(self, core: "RunCore") -> int: ...


@dataclass
class RunResult:
    summary: RunSummary
    store: RunStore


class RunCore:
    """One pass of a run into its output folder (opened and checked by ``setup.py``). Use once."""

    def __init__(self, config: "Config", store: RunStore, shape: RowShape, *, retry_errors: bool,
                 exporter: HubExporter | None, total_rows: int | None, show_progress: bool, started: float,
                 resuming: bool):
        self.config = config
        self.store = store
        self.shape = shape
        self.exporter = exporter
        self.started = started
        self.resuming = resuming
        self.drain_timeout_s = config.model.timeout_s + DRAIN_GRACE_S
        # Chunks not to read at all: every written shard, except (with retry_errors) those with errors.
        self.skip = store.chunks_to_skip(retry_errors)
        self.nothing_to_do = store.nothing_to_do(self.skip)  # a finished run is not read again
        # Answers already paid for; with retry_errors only the good ones, so error rows are asked again.
        self.logged = {} if self.nothing_to_do else store.logged_answers(self.skip, ok_only=retry_errors).answers
        self.embeds_downloads = shape.embedded is not None  # the sessions keep what they download for the shards
        self.rows = RowCounts()  # the rows this run captioned
        self.rows_from_log = 0  # rows whose answers an earlier run had already received
        self.unwritten: dict[int, ChunkWork] = {}  # chunks opened whose shard is not written yet
        self.usage = Usage()  # what this run's requests paid (the backends' senders count into it)
        self.meter = CostMeter(Prices.of(config.model, batch=config.run.backend == "batch"), self.usage,
                               before=store.paid_tokens())
        self.budget = (BudgetGuard(self.meter, config.run.max_cost_usd, str(store.dir))
                       if config.run.max_cost_usd is not None else None)
        self.progress = ProgressBar(total_rows, self.rows, self.meter, enabled=show_progress and not self.nothing_to_do,
                                    initial=store.rows_in(self.skip))
        # What the answers do not say (failed attempts, the limits moving, starts and stops), for the
        # run report; a backend hands it to the senders of this process as their observer.
        self.events = EventsLog(store.layout.events_log())

    # -- what backends call ------------------------------------------------------------------------

    def open_chunk(self, chunk: Chunk) -> ChunkWork:
        """The chunk's rows: those whose every answer is logged are done, the rest are to ask.
        RunStopped when the rows read lack a column the run needs."""
        results: list[RowResult | None] = [None] * len(chunk)
        todo = []
        for offset, key, known, make in self._rows(chunk):
            self.logged.pop(hashable_key(key), None)
            results[offset] = row_result(self.shape.prompts, known)
            if results[offset] is not None:
                self.rows_from_log += 1
            else:
                todo.append(make())
        work = self.unwritten[chunk.index] = ChunkWork(chunk, results, todo)
        return work

    def peek_chunk(self, chunk: Chunk) -> list[RowToDo]:
        """The chunk's rows to ask, as ``open_chunk`` gives them, without taking the logged answers:
        a backend that asks now and writes the chunk later (the batch backend) opens it then."""
        return [make() for _, _, known, make in self._rows(chunk) if row_result(self.shape.prompts, known) is None]

    def _rows(self, chunk: Chunk):
        """(offset, key, logged answers, a RowToDo maker) of each row of the chunk."""
        shape, columns = self.shape, chunk.columns
        images = columns.get(shape.image_column)
        if images is None:
            raise RunStopped(f"dataset.image_column: no column {shape.image_column!r} in the rows read")
        missing = [name for name in shape.template_columns if name not in columns]
        if missing:
            raise RunStopped(f"prompt placeholder {{{missing[0]}}}: no column {missing[0]!r} in the rows read")
        keys = columns[shape.key_column] if shape.key_column else range(chunk.start, chunk.start + len(chunk))
        for offset, key in enumerate(keys):
            known = self.logged.get(hashable_key(key), {})

            def make(offset: int = offset, key: Any = key, known: dict = known) -> RowToDo:
                row = {name: columns[name][offset] for name in shape.template_columns}
                return RowToDo(offset, key, images[offset], row, known)

            yield offset, key, known, make

    def answer_log(self, work: ChunkWork, key: Any) -> RecordAnswer:
        """``record(prompt, answer)`` for one row: appends each answer to this process's results log."""
        def record(prompt: str, answer: PromptAnswer) -> None:
            self.log_answer(work.index, key, prompt, answer)

        return record

    def log_answer(self, chunk_index: int, key: Any, prompt: str, answer: PromptAnswer) -> None:
        """Append one answer to this process's results log (a backend holding no ``ChunkWork`` for the
        chunk while its answers come in: the batch backend)."""
        self.store.log_answer(LogRecord.of(chunk_index, key, prompt, answer))

    def row_done(self, work: ChunkWork, offset: int, result: RowResult) -> bool:
        """A row the backend captioned: counted, shown, its error logged (INFO: ``--log-file``);
        True once its chunk is complete."""
        self.rows.add(result)
        self.progress(result)
        if result.error is not None:
            log.info("row %s: %s", self._key(work, offset), result.error)
        return work.done(offset, result)

    def _key(self, work: ChunkWork, offset: int) -> Any:
        """The row's key (``dataset.key_column``), else its position in the source."""
        column = self.shape.key_column
        return work.chunk.columns[column][offset] if column else work.chunk.start + offset

    def write_shard(self, work: ChunkWork, files_read: KeptFiles | None = None) -> None:
        """Write a complete chunk's shard (touches nothing shared: may run in a worker thread).
        ``files_read``: image files the session already read by path (and images it downloaded),
        embedded without a second read."""
        shape = self.shape
        columns = {**work.chunk.columns, **output_columns(shape.prompts, shape.error_column, work.results,
                                                          metadata=shape.metadata)}
        if shape.embedded is not None:
            usable = [not any(a.error and error_kind(a.error) == "ImageError" for a in r.answers.values())
                      for r in work.results]
            columns[shape.embedded] = embedded_images(work.chunk.columns[shape.image_column], usable, files_read,
                                                      self.config.image, in_place=shape.embedded == shape.image_column)
        self.store.write_shard(work.index, columns, shape.features, shape.base_dir, files_read)

    def shard_written(self, work: ChunkWork) -> None:
        """Record the written shard with its counts and cost (last), then tell the Hub export."""
        counts = RowCounts.of(work.results)
        counts = dataclasses.replace(counts, cost_usd=_rounded(self.meter.prices.usd(counts.input_tokens,
                                                                                      counts.output_tokens)))
        self.store.mark_done(work.index, counts)
        self.unwritten.pop(work.index, None)
        if self.exporter is not None:
            self.exporter.chunk_written(work.index)

    # -- the run -----------------------------------------------------------------------------------

    def run(self, backend: Backend) -> RunResult:
        """Run ``backend`` over what is left to do, then write the summary and the card and make the
        last push; raises the run's ``RunStopped`` (with its summary) when it stopped early."""
        failure: RunStopped | None = None
        if not self.nothing_to_do:
            self.events(RunMark("started", backend=backend.name, resumed=self.resuming))
        try:
            if not self.nothing_to_do:
                self.store.finish(backend.run(self))
        except RunStopped as err:
            failure = err
        finally:
            if not self.nothing_to_do:
                self.events(RunMark("stopped", backend=backend.name, detail=str(failure) if failure else None))
            self.events.close()
            self.progress.close()
            self.store.close()
            if self.exporter is not None:
                self.exporter.stop()
        summary = self._summary(backend, failure)
        summary.write(self.store.layout)
        write_card(self.store.layout, self.config, summary)
        if self.exporter is not None and not isinstance(failure, Interrupted):
            summary, failure = self._push_at_end(summary, failure)
        if failure is not None:
            raise failure.with_summary(summary)
        return RunResult(summary, self.store)

    def _summary(self, backend: Backend, failure: RunStopped | None) -> RunSummary:
        seconds = time.time() - self.started
        paid_in, paid_out = self.meter.tokens()
        started, finished = self._dates()
        return RunSummary.of_counts(
            self.store.totals(), complete=self.store.complete,
            rows_this_run=self.rows.rows, rows_from_log=self.rows_from_log,
            rows_pending=sum(len(work.chunk) - work.pending for work in self.unwritten.values()),
            requests=self.usage.requests,
            retries=self.usage.retries, worker_requests=self.usage.sent_to_processes, reused=dict(self.usage.reused),
            seconds=round(seconds, 3), rows_per_s=round(self.rows.rows / max(1e-9, seconds), 2),
            model=self.config.model.name, endpoint=self.config.model.endpoint_label(), output_dir=str(self.store.dir),
            load_with=loading_code(self.store.layout) if self.store.layout.shard_paths() else None,
            stopped=str(failure) if failure else None,
            paid_input_tokens=paid_in, paid_output_tokens=paid_out, cost_usd=_rounded(self.meter.total_usd()),
            cost_usd_this_run=_rounded(self.meter.this_run_usd()), prices=self.meter.prices.as_dict(),
            max_cost_usd=self.config.run.max_cost_usd, started=started, finished=finished,
            backend=backend.name, ray_workers=backend.workers, startup_s=backend.startup_s)

    def _dates(self) -> tuple[str, str | None]:
        """A resumed run keeps the first run's start; a finished run run again keeps its dates (and
        so its card)."""
        previous = RunSummary.read(self.store.layout) if self.resuming else None
        started = (previous.started if previous else None) or _iso(self.started)
        finished = None
        if self.store.complete:
            finished = (previous.finished if previous and self.nothing_to_do else None) or _iso(time.time())
        return started, finished

    def _push_at_end(self, summary: RunSummary, failure: RunStopped | None) -> tuple[RunSummary, RunStopped | None]:
        """The last push, after the summary so that the card pushed carries its dates and totals; a
        Hub failure becomes the run's failure and the summary says so."""
        try:
            pushed = self.exporter.finish()
            summary = dataclasses.replace(summary, hub=HubReport(pushed.repo_id, pushed.commit, pushed.shards_on_hub))
        except HubError as err:
            failure = failure or err
            summary = dataclasses.replace(summary, hub=HubReport(self.config.output.push_to_hub, error=str(err)),
                                          stopped=str(failure))
        summary.write(self.store.layout)
        return summary, failure


def _with_column_after(features: Any, after: str, name: str, feature: Any) -> Any:
    """``features`` with ``name`` right after the column ``after``; ConfigError when it is taken."""
    import datasets

    if name in features:
        raise ConfigError(f"output.embedded_image_column: the output already has a column {name!r}; "
                          "choose another name")
    items = list(features.items())
    place = next((i + 1 for i, (column, _) in enumerate(items) if column == after), len(items))
    return datasets.Features(dict(items[:place] + [(name, feature)] + items[place:]))


def _rounded(usd: float | None) -> float | None:
    return None if usd is None else round(usd, 6)


def _iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


__all__ = ["RunCore", "RunResult", "RowShape", "RowToDo", "ChunkWork", "Backend", "DRAIN_GRACE_S"]
