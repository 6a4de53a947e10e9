"""``run.backend: ray``: the same run on a Ray cluster, with one rate limit and one budget for all.

    driver: Ray Data read (ordered) ──chunks of chunk_size──▶ run core ──rows to ask──▶ least-loaded
            CaptionActor ◀── results ── run core: shard + manifest (the driver alone writes them)
    CaptionActor (one per run.workers): a CaptionSession (prepare, retries, error rows) whose limits
            are BlockLimits on the one LimitBroker actor; answers appended to its own results log

* Input: ``dataset.path: parquet`` with ``data_files`` (any fsspec path: local, s3://, gs://, hf://,
  globs) is read by ``ray.data.read_parquet``; anything else is opened as a local run opens it
  (``io.source.open_source``) and handed to ``ray.data.from_huggingface``. Ray Data keeps source
  order (``preserve_order``) and the driver cuts the stream into chunks of exactly
  ``run.chunk_size`` rows, so shards, row keys and resume are the local backend's.
* Every actor appends each answer to ``.capstream/results-ray-<n>.jsonl`` the moment it arrives;
  the run core reads every log on resume. Each actor keeps its own events log too
  (``events-ray-<n>.jsonl``: failed attempts), and the broker one for the cluster's limits
  (``events-ray-broker.jsonl``). ``output.dir`` must therefore be a folder every node can
  write (local disk for a one-machine Ray, else NFS or a mounted bucket).
* Image bytes travel driver -> actor once per chunk and only results travel back.

Ray is imported only when this backend runs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import datasets

from ..core.run import ChunkWork, RowToDo, RunCore
from ..errors import ConfigError, Interrupted, NotSent, RunStopped
from ..io.events_log import EventsLog
from ..io.layout import OutputLayout
from ..io.results_log import LogRecord
from ..io.source import Chunk, open_source
from ..io.store import RunStore
from ..model.sending import Usage
from ..row.session import SessionSpec
from .broker import BlockLimits, LimitBroker

if TYPE_CHECKING:
    from ..config import DatasetConfig
    from ..row.results import RowResult

ACTOR_CPUS = 0.5  # caption actors wait on the network; leave CPUs for Ray Data's read tasks


@dataclass
class ChunkAnswer:
    """An actor's answer for a chunk's rows: a result per row (None for a row not done because the
    run is stopping) and, when the actor failed, why."""

    results: list["RowResult | None"]
    failure: RunStopped | None = None


class CaptionActor:
    """A Ray actor (async): captions the rows it is given with capstream's own session.

    ``secret``: the API key from the driver's environment, for actors on nodes without it.
    """

    def __init__(self, spec: SessionSpec, out_dir: str, split: str, name: str, broker: Any, base_dir: str | None,
                 prep_threads: int, secret: str | None):
        if secret and spec.model.api_key_env:
            os.environ.setdefault(spec.model.api_key_env, secret)  # this actor's own process
        self.spec = spec
        layout = OutputLayout(out_dir, split)
        self.store = RunStore(layout, log_name=f"results-{name}")
        self.events = EventsLog(layout.events_log(f"events-{name}"))
        self.broker = broker
        self.base_dir = base_dir
        self.pool = ThreadPoolExecutor(prep_threads, thread_name_prefix="capstream-prep")
        self.row_slots = asyncio.Semaphore(2 * spec.limits.max_concurrency)  # images prepared ahead of requests
        self.usage = Usage()
        self.limits = BlockLimits(broker.grant.remote, broker.observe_many.remote, usage=self.usage)
        self.session = None  # opened on the actor's event loop, at the first chunk
        self.failure: RunStopped | None = None

    def _session(self):
        if self.session is None:
            self.session = self.spec.open(prep_pool=self.pool, usage=self.usage, limits=self.limits,
                                          base_dir=self.base_dir, observer=self.events)
        return self.session

    async def caption_chunk(self, chunk_index: int, rows: list[RowToDo]) -> ChunkAnswer:
        """Caption the rows of one chunk, each answer logged as it arrives."""
        session = self._session()
        results = await asyncio.gather(*(self._row(session, chunk_index, row) for row in rows))
        return ChunkAnswer(list(results), self.failure)

    async def _row(self, session, chunk_index: int, item: RowToDo) -> "RowResult | None":
        def record(prompt: str, answer) -> None:
            self.store.log_answer(LogRecord.of(chunk_index, item.key, prompt, answer))

        async with self.row_slots:
            if session.stopping.is_set():
                return None
            try:
                return await session.caption(item.image, item.row, known=item.known, record=record)
            except NotSent:
                return None
            except RunStopped as err:
                self._fail(err)
            except Exception as err:  # a bug must stop the run cleanly, not hang the chunk
                self._fail(RunStopped(f"internal error: {type(err).__name__}: {err}"))
        return None

    def _fail(self, err: RunStopped) -> None:
        if self.failure is None:
            self.failure = err
        self.session.stopping.set()

    def stop(self) -> None:
        """Send no new request; requests in flight finish."""
        self._session().stopping.set()

    async def close(self) -> Usage:
        """Close the session; return what this actor's requests were."""
        if self.session is not None:
            self.limits.flush()
            await self.session.aclose()
        self.store.close()
        self.events.close()
        self.pool.shutdown(wait=False)
        return self.usage


@dataclass
class RayInput:
    """The input as the driver reads it: parquet files for ``ray.data.read_parquet``, or a datasets
    Dataset for ``ray.data.from_huggingface``; and what setup needs to know before anything is
    written (the features, where relative image paths point, the row count when known)."""

    features: Any
    base_dir: str | None = None
    num_rows: int | None = None
    files: list[str] = field(default_factory=list)
    filesystem: Any = None
    data: Any = None  # a datasets Dataset, when not read from parquet files
    limit: int | None = None

    @classmethod
    def open(cls, cfg: "DatasetConfig", data: Any) -> "RayInput":
        """What ``dataset`` (or ``data`` given in code) names; ConfigError when it cannot be read."""
        parquet = _parquet_files(cfg) if data is None else None
        if parquet is None:
            src = open_source(cfg, data)
            return cls(src.features, src.base_dir, src.num_rows, data=src.data, limit=cfg.limit)
        import pyarrow.parquet as pq

        files, filesystem = parquet
        features = datasets.Features.from_arrow_schema(pq.read_schema(files[0], filesystem=filesystem))
        if cfg.image_column not in features:
            raise ConfigError(f"dataset.image_column: no column {cfg.image_column!r} in the dataset "
                              f"(columns: {', '.join(features)})")
        return cls(features, files=files, filesystem=filesystem, limit=cfg.limit)

    def dataset(self):
        """The Ray Dataset, in source order (call with Ray started)."""
        import ray

        ds = (ray.data.from_huggingface(self.data) if self.data is not None
              else ray.data.read_parquet(self.files, filesystem=self.filesystem))
        if self.limit is not None:
            ds = ds.limit(self.limit)  # from_huggingface may read the Hub's parquet files, not the selection
        return ds


def _parquet_files(cfg: "DatasetConfig") -> tuple[list[str], Any] | None:
    """(files, pyarrow filesystem or None) when ``dataset`` names parquet files Ray Data can read."""
    if cfg.path != "parquet" or not cfg.data_files:
        return None
    patterns = cfg.data_files
    if isinstance(patterns, dict):
        if cfg.split not in patterns:
            raise ConfigError(f"dataset.data_files: no files for split {cfg.split!r} (splits: {', '.join(patterns)})")
        patterns = patterns[cfg.split]
    import fsspec

    files, fs = [], None
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
        fs, path = fsspec.core.url_to_fs(pattern)
        matched = sorted(fs.glob(path)) if any(c in path for c in "*?[") else [path]
        if not matched or not all(fs.isfile(m) for m in matched):
            raise ConfigError(f"dataset.data_files: no parquet file at {pattern!r}")
        files += matched
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fs, LocalFileSystem):
        return files, None
    import pyarrow.fs

    return files, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


class RayBackend:
    """Caption actors on a Ray cluster (a local Ray when none is given), fed by this driver."""

    name = "ray"

    def __init__(self, source: RayInput, spec: SessionSpec, *, chunk_size: int, window_chunks: int, workers: int,
                 prep_threads: int, ray_address: str | None):
        self.source = source
        self.spec = dataclasses.replace(spec, processes=1)  # each actor sends its own requests
        self.chunk_size = chunk_size
        self.window_chunks = window_chunks
        self.workers = workers
        self.prep_threads = prep_threads
        self.ray_address = ray_address
        self.startup_s: float | None = None  # starting Ray, its first read and the actors, until the first chunk goes out

    def run(self, core: RunCore) -> int:
        import ray

        started_ray = _init_ray(self.ray_address)
        broker = actors = None
        try:
            limits = self.spec.limits
            broker = ray.remote(LimitBroker).options(num_cpus=0).remote(
                limits.requests_per_minute, limits.tokens_per_minute, budget=core.budget,
                observer=EventsLog(core.store.layout.events_log("events-ray-broker")))
            model = self.spec.model
            secret = os.environ.get(model.api_key_env) if model.api_key_env else None
            actor = ray.remote(CaptionActor).options(num_cpus=ACTOR_CPUS, max_concurrency=1000)
            actors = [actor.remote(self.spec, str(core.store.dir), core.store.split, f"ray-{i}", broker,
                                   self.source.base_dir, self.prep_threads, secret) for i in range(self.workers)]
            driver = _Driver(core, actors, self.window_chunks, on_first_send=self._first_sent)
            return driver.run(self.source.dataset(), self.chunk_size)
        finally:
            for a in (actors or []) + ([broker] if broker is not None else []):
                ray.kill(a)
            if started_ray:
                ray.shutdown()

    def _first_sent(self, started: float) -> None:
        self.startup_s = round(time.time() - started, 3)


class _Driver:
    """Feeds chunks to the actors and takes their results in. Use once: ``_Driver(...).run(ds, n)``."""

    def __init__(self, core: RunCore, actors: list, window_chunks: int, on_first_send):
        self.core = core
        self.actors = actors
        self.window_chunks = window_chunks
        self.on_first_send = on_first_send
        self.load = [0] * len(actors)  # rows in flight per actor
        self.pending: dict[Any, tuple[ChunkWork, int]] = {}  # chunk call -> (chunk, actor)
        self.failure: RunStopped | None = None
        self.chunk_count = 0

    def run(self, ds, chunk_size: int) -> int:
        import ray

        interrupted = False
        try:
            self._dispatch(ds, chunk_size)
            while self.pending and self.failure is None:
                self._collect(block=True)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            if self.pending:  # stopping: no new request; the ones in flight finish
                self._stop_actors()
                self._drain()
            for usage in ray.get([a.close.remote() for a in self.actors]):
                self.core.usage.add_requests(usage, from_processes=True)  # every request went from an actor
        if self.failure is not None:
            raise self.failure
        if interrupted:
            raise Interrupted("stopped by request")
        return self.chunk_count

    def _dispatch(self, ds, chunk_size: int) -> None:
        start = 0
        batches = ds.iter_batches(batch_size=chunk_size, batch_format="pyarrow", prefetch_batches=2)
        for index, table in enumerate(batches):
            self.chunk_count = index + 1
            start += table.num_rows
            if index in self.core.skip:
                continue  # read and dropped: no request
            try:
                work = self.core.open_chunk(Chunk(index, start - table.num_rows, table.to_pydict()))
            except RunStopped as err:
                self._fail(err)
                return
            if work.complete:
                self._write(work)
            else:
                self._send(work)
            self._collect(block=len(self.pending) >= self.window_chunks)
            if self.failure is not None:
                return

    def _send(self, work: ChunkWork) -> None:
        if not self.pending and self.on_first_send is not None:
            self.on_first_send(self.core.started)
            self.on_first_send = None
        actor = min(range(len(self.actors)), key=self.load.__getitem__)  # the least loaded
        self.load[actor] += len(work.todo)
        self.pending[self.actors[actor].caption_chunk.remote(work.index, work.todo)] = (work, actor)

    def _collect(self, *, block: bool, timeout: float | None = None) -> None:
        """Take in finished chunk calls: all that are done, and at least one when ``block``."""
        import ray

        if not self.pending:
            return
        refs = list(self.pending)
        if block:
            ray.wait(refs, num_returns=1, timeout=timeout)
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        for ref in ready:
            work, actor = self.pending.pop(ref)
            self.load[actor] -= len(work.todo)
            try:
                answer: ChunkAnswer = ray.get(ref)
            except ray.exceptions.RayError as err:
                self._fail(RunStopped(f"caption actor failed: {type(err).__name__}: {err}"))
                continue
            if answer.failure is not None:
                self._fail(answer.failure)
            for item, result in zip(work.todo, answer.results):
                if result is not None:
                    self._count_paid(result)
                    self.core.row_done(work, item.offset, result)
            if work.complete:
                self._write(work)

    def _count_paid(self, result: "RowResult") -> None:
        """What an actor's answers cost this run (requests are counted when the actors close)."""
        for answer in result.answers.values():
            if answer.source == "request":
                self.core.usage.add_paid(answer.input_tokens, answer.output_tokens)
            elif answer.source in ("cache", "dedup"):
                self.core.usage.count_reused(answer.source)

    def _write(self, work: ChunkWork) -> None:
        try:
            self.core.write_shard(work)
            self.core.shard_written(work)
        except RunStopped as err:
            self._fail(err)

    def _fail(self, err: RunStopped) -> None:
        if self.failure is None:
            self.failure = err
            self._stop_actors()

    def _stop_actors(self) -> None:
        for a in self.actors:
            a.stop.remote()

    def _drain(self) -> None:
        """Wait for the chunk calls in flight (their requests finish, bounded by the model's timeout)."""
        deadline = time.monotonic() + self.core.drain_timeout_s
        while self.pending and time.monotonic() < deadline:
            self._collect(block=True, timeout=max(0.0, deadline - time.monotonic()))
        if self.pending and self.failure is None:
            self.failure = RunStopped(f"{len(self.pending)} chunks still unanswered {self.core.drain_timeout_s:.0f} s "
                                      f"after the stop; their answers so far are logged")


def _init_ray(address: str | None) -> bool:
    """Join ``run.ray_address`` (or RAY_ADDRESS, or the Ray already started in this process), else
    start a local Ray; True when this call started it (and so must shut it down)."""
    try:
        import ray
    except ImportError:
        raise ConfigError("run.backend: ray needs Ray: pip install 'capstream[ray]'") from None
    started = False
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, logging_level="WARNING",
                 configure_logging=True, log_to_driver=True)
        started = True
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # shards, keys and resume rely on source order
    context.enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # its per-dataset INFO lines drown the report
    return started


__all__ = ["RayBackend", "RayInput", "CaptionActor", "ChunkAnswer"]
