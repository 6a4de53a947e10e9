"""``run.backend: ray``: the same run on a Ray cluster, with one rate limit for the whole cluster.

    driver: Ray Data read (ordered) ──chunks of chunk_size──▶ least-loaded CaptionWorker actor
            ◀── captions + errors ── shard + manifest (the driver alone writes them)
    CaptionWorker (one per run.workers): CaptionSession (prepare, retries, error rows) whose limits
            are BlockLimits on the one LimitBroker actor; answers appended to its own results log

* Input: ``dataset.path: parquet`` with ``data_files`` (any fsspec path: local, s3://, gs://, hf://,
  globs) is read by ``ray.data.read_parquet``; anything else is opened as a local run opens it
  (``source.open_source``) and handed to ``ray.data.from_huggingface``. Ray Data keeps source order
  (``preserve_order``) and the driver cuts the stream into chunks of exactly ``run.chunk_size`` rows,
  so shards, row keys and resume are the local backend's.
* Every worker appends each answer to ``.capstream/results-ray-<n>.jsonl`` the moment it arrives;
  ``RunStore.logged_results`` reads every log on resume. ``output.dir`` must therefore be a folder
  every node can write (local disk for a one-machine Ray, else NFS or a mounted bucket).
* Image bytes travel driver -> worker once per chunk and only captions travel back.

Ray is imported only when this backend runs.

    >>> from capstream import run
    >>> run({"dataset": {...}, "model": {...}, "run": {"backend": "ray", "workers": 4}, "output": {"dir": "out"}})
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import datasets

from .captioner import Captioner, NotSent
from .results import PromptAnswer, RowResult, Stats, answers_from_log, output_columns, output_layout, row_result
from .answers import default_cache_dir
from .config import Config, DatasetConfig
from .errors import ConfigError, RunStopped
from .global_limits import BlockLimits, LimitBroker
from .prompts import compile_prompts
from .source import open_source
from .store import RunStore

WORKER_CPUS = 0.5  # caption workers wait on the network; leave CPUs for Ray Data's read tasks


class CaptionWorker:
    """A Ray actor (async): captions the rows of the chunks it is given with capstream's own session.

    ``secret``: the API key from the driver's environment, for workers on nodes without it.
    """

    def __init__(self, config: Config, out_dir: str, split: str, name: str, broker: Any, base_dir: str | None,
                 secret: str | None):
        cfg = config.model_copy(deep=True)
        cfg.run.workers = 1  # this actor is the worker: it sends its own requests
        if secret and cfg.model.api_key_env:
            os.environ.setdefault(cfg.model.api_key_env, secret)  # this actor's own process
        self.captioner = Captioner(cfg)
        self.log = RunStore(out_dir, split, results_name=f"results-{name}.jsonl")
        self.broker = broker
        self.base_dir = base_dir
        self.session = None
        self.failure: str | None = None

    def _session(self):
        if self.session is None:  # created on the actor's event loop, on first use
            self.session = self.captioner.session(self.base_dir)
            self.session.limits = BlockLimits(self.broker.grant.remote, self.broker.observe_many.remote)
            self.row_slots = asyncio.Semaphore(2 * self.captioner.config.limits.max_concurrency)
        return self.session

    async def caption_chunk(self, chunk_index: int, keys: list, images: list, rows: list[dict],
                            known: list[dict[str, PromptAnswer]]) -> dict:
        """Caption ``images`` (``rows``: each one's template columns, ``known``: its answers already
        logged); ``results`` holds a RowResult per row, None for a row not done because the run is
        stopping (``failure`` says why, if it failed)."""
        session = self._session()
        results = await asyncio.gather(*(self._row(session, chunk_index, *item) for item in zip(keys, images, rows, known)))
        return {"results": results, "failure": self.failure}

    async def _row(self, session, chunk_index: int, key: Any, value: Any, row: dict,
                   known: dict[str, PromptAnswer]) -> RowResult | None:
        def record(prompt: str, answer: PromptAnswer) -> None:
            self.log.log_answer(chunk_index, key, prompt, answer)

        async with self.row_slots:  # bounds the images prepared ahead of their requests
            if session.stopping.is_set():
                return None
            try:
                result = await session.caption(value, row, known=known, record=record)
            except NotSent:
                return None
            except RunStopped as err:
                self._fail(str(err))
                return None
            except Exception as err:  # a bug must stop the run cleanly, not hang the chunk
                self._fail(f"internal error: {type(err).__name__}: {err}")
                return None
        return result

    def _fail(self, message: str) -> None:
        if self.failure is None:
            self.failure = message
        self.session.stopping.set()

    def stop(self) -> None:
        """Send no new request; requests in flight finish."""
        self._session().stopping.set()

    async def close(self) -> dict:
        """Close the session; return this worker's request counts."""
        stats = {"requests": 0, "retries": 0}
        if self.session is not None:
            self.session.limits.flush()
            stats = {"requests": self.session.stats.requests, "retries": self.session.stats.retries}
            await self.session.aclose()
        self.log.close()
        self.captioner.close()
        return stats


@dataclass
class _Chunk:
    index: int
    columns: dict[str, list]
    results: list
    worker: int = -1
    todo: list[int] = field(default_factory=list)  # offsets sent to the worker


def _parquet_files(cfg: DatasetConfig) -> tuple[list[str], Any] | None:
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


def open_ray_dataset(cfg: DatasetConfig, data: Any):
    """(Ray Dataset in source order, output-side datasets Features or None, base_dir, row count or None)."""
    import ray

    parquet = _parquet_files(cfg) if data is None else None
    if parquet is not None:
        import pyarrow.parquet as pq

        files, filesystem = parquet
        features = datasets.Features.from_arrow_schema(pq.read_schema(files[0], filesystem=filesystem))
        if cfg.image_column not in features:
            raise ConfigError(f"dataset.image_column: no column {cfg.image_column!r} in the dataset "
                              f"(columns: {', '.join(features)})")
        ds = ray.data.read_parquet(files, filesystem=filesystem)
        num_rows = None
        base_dir = None
    else:
        src = open_source(cfg, data)
        ds = ray.data.from_huggingface(src.data)
        features, num_rows, base_dir = src.features, src.num_rows, src.base_dir
    if cfg.limit is not None:
        ds = ds.limit(cfg.limit)  # from_huggingface may read the Hub's parquet files, not the selection
    return ds, features, base_dir, num_rows


class RayRun:
    """One pass over the input on Ray into a store. Use once: ``RayRun(...).run()``."""

    def __init__(self, config: Config, store: RunStore, *, retry_errors: bool, progress=None,
                 on_chunk_written: Callable[[int], None] | None = None):
        self.config = config
        self.store = store
        self.on_chunk_written = on_chunk_written  # once a shard is recorded (the Hub export listens)
        self.skip_chunks = store.chunks_to_skip(retry_errors)
        self.retry_errors = retry_errors
        self.progress = progress or (lambda n: None)
        self.stats = Stats()
        self.rows_from_log = 0
        self.failure: RunStopped | None = None
        self.interrupted = False
        self.chunk_count = 0
        self.first_sent: float | None = None  # when the first chunk went to a worker

    def run(self, ds, features, base_dir: str | None) -> None:
        import ray

        cfg = self.config
        self.prompts = compile_prompts(cfg)
        self.features, self.template_columns = output_layout(self.prompts, features, cfg.dataset.image_column,
                                                             cfg.output.error_column)
        self.base_dir = base_dir
        logged = self.store.logged_results(self.skip_chunks, ok_only=self.retry_errors)
        self.store.close()
        broker = ray.remote(LimitBroker).options(num_cpus=0).remote(
            cfg.limits.requests_per_minute, cfg.limits.tokens_per_minute)
        secret = os.environ.get(cfg.model.api_key_env) if cfg.model.api_key_env else None
        actor = ray.remote(CaptionWorker).options(num_cpus=WORKER_CPUS, max_concurrency=1000)
        config = cfg.model_copy(deep=True)  # sent pickled: a pydantic answer schema travels as it is
        if config.run.cache and not config.run.cache_dir:  # the driver's cache folder, not each actor's environment's
            config.run.cache_dir = str(default_cache_dir())
        self.workers = [actor.remote(config, str(self.store.dir), self.store.split, f"ray-{i}", broker, base_dir, secret)
                        for i in range(cfg.run.workers)]
        self.load = [0] * len(self.workers)  # rows in flight per worker
        self.pending: dict[Any, _Chunk] = {}
        try:
            self._dispatch(ds, logged)
            while self.pending and self.failure is None:
                self._collect(block=True)
        except KeyboardInterrupt:
            self.interrupted = True
        finally:
            if self.pending:  # stopping: no new request; the ones in flight finish
                self._stop_workers()
                self._drain()
            for counts in ray.get([w.close.remote() for w in self.workers]):
                self.stats.requests += counts["requests"]
                self.stats.retries += counts["retries"]
            for w in self.workers + [broker]:
                ray.kill(w)
        if self.failure is not None:
            raise self.failure
        if self.interrupted:
            from .engine import Interrupted

            raise Interrupted("stopped by request")
        self.store.finish(self.chunk_count)

    def _dispatch(self, ds, logged: dict) -> None:
        cfg = self.config
        key_column, image_column = cfg.dataset.key_column, cfg.dataset.image_column
        start = 0
        batches = ds.iter_batches(batch_size=cfg.run.chunk_size, batch_format="pyarrow", prefetch_batches=2)
        for index, table in enumerate(batches):
            self.chunk_count = index + 1
            n, start = table.num_rows, start + table.num_rows
            if index in self.skip_chunks:
                continue  # read and dropped: no request
            columns = table.to_pydict()
            keys = columns[key_column] if key_column else range(start - n, start)
            chunk = _Chunk(index, columns, [None] * n)
            known = []
            for offset, key in enumerate(keys):
                answers = answers_from_log(logged.pop(key, {}))
                chunk.results[offset] = row_result(self.prompts, answers)
                if chunk.results[offset] is not None:
                    self.rows_from_log += 1
                else:
                    chunk.todo.append(offset)
                    known.append(answers)
            if not chunk.todo:
                self._write(chunk)
            else:
                rows = [{c: columns[c][o] for c in self.template_columns} for o in chunk.todo]
                self._send(chunk, [keys[o] for o in chunk.todo], [columns[image_column][o] for o in chunk.todo], rows, known)
            self._collect(block=len(self.pending) >= cfg.run.window_chunks)
            if self.failure is not None:
                return

    def _send(self, chunk: _Chunk, keys: list, images: list, rows: list, known: list) -> None:
        if self.first_sent is None:
            self.first_sent = time.time()
        chunk.worker = min(range(len(self.workers)), key=self.load.__getitem__)  # the least loaded
        self.load[chunk.worker] += len(keys)
        self.pending[self.workers[chunk.worker].caption_chunk.remote(chunk.index, keys, images, rows, known)] = chunk

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
            chunk = self.pending.pop(ref)
            self.load[chunk.worker] -= len(chunk.todo)
            try:
                answer = ray.get(ref)
            except ray.exceptions.RayError as err:
                self._fail(RunStopped(f"caption worker failed: {type(err).__name__}: {err}"))
                continue
            if answer["failure"] and self.failure is None:
                self._fail(RunStopped(answer["failure"]))
            for offset, result in zip(chunk.todo, answer["results"]):
                if result is not None:
                    chunk.results[offset] = result
                    self.stats.add_answered_elsewhere(result)
                    self.progress(1)
            if all(r is not None for r in chunk.results):
                self._write(chunk)

    def _write(self, chunk: _Chunk) -> None:
        columns = {**chunk.columns, **output_columns(self.prompts, self.config.output.error_column, chunk.results)}
        try:
            self.store.write_shard(chunk.index, columns, self.features, self.base_dir)
            counts = Stats()
            for r in chunk.results:
                counts.add(r)
            self.store.mark_done(chunk.index, counts.as_counts())
        except RunStopped as err:
            self._fail(err)
            return
        if self.on_chunk_written is not None:
            self.on_chunk_written(chunk.index)

    def _fail(self, err: RunStopped) -> None:
        if self.failure is None:
            self.failure = err
            self._stop_workers()

    def _stop_workers(self) -> None:
        for w in getattr(self, "workers", []):
            w.stop.remote()

    def _drain(self) -> None:
        """Wait for the chunk calls in flight (their requests finish, bounded by the model's timeout)."""
        deadline = time.monotonic() + self.config.model.timeout_s + 30
        while self.pending and time.monotonic() < deadline:
            self._collect(block=True, timeout=max(0.0, deadline - time.monotonic()))
        if self.pending and self.failure is None:
            self.failure = RunStopped(f"{len(self.pending)} chunks still unanswered {self.config.model.timeout_s + 30:.0f} s "
                                      f"after the stop; their answers so far are logged")


def run_on_ray(config: Config, data: Any = None, *, llm: Any = None, overwrite: bool = False,
               retry_errors: bool = False, show_progress: bool = True):
    """``api.run`` for ``run.backend: ray``; returns ``api.RunResult``."""
    from . import hub
    from .api import RunResult, check_store, open_store, push_at_end, run_dates, run_summary
    from .progress import ProgressBar
    from .sinks import write_card, write_summary

    started = time.time()
    if llm is not None:
        raise ConfigError("run.backend: ray builds the model on every worker from config.model; llm= in code "
                          "is for the local backend")
    if config.run.max_cost_usd is not None:
        raise ConfigError("run.max_cost_usd is not supported with run.backend: ray yet (watch the cost in "
                          "summary.json)")
    Captioner(config).close()  # checks the model config and the key before anything starts
    store, fingerprint = check_store(config, data, overwrite)
    resuming = open_store(store, config, fingerprint, overwrite)
    exporter = None
    if config.output.push_to_hub:  # pushed from the driver, which alone writes the shards
        hub.bound_hub_calls(config.output.hub_timeout_s)
        exporter = hub.HubExporter.from_config(store.dir, config.output, config.dataset.split)
    runner = RayRun(config, store, retry_errors=retry_errors,
                    on_chunk_written=exporter.chunk_written if exporter else None)
    failure: RunStopped | None = None
    nothing_to_do = store.nothing_to_do(runner.skip_chunks)
    if not nothing_to_do:  # a finished run starts no Ray
        started_ray = _init_ray(config, show_progress)
        bar = None
        try:
            ds, features, base_dir, num_rows = open_ray_dataset(config.dataset, data)
            bar = ProgressBar(num_rows, runner.stats, enabled=show_progress, initial=store.rows_in(runner.skip_chunks))
            runner.progress = lambda n: bar.bar.update(n)
            runner.run(ds, features, base_dir)
        except RunStopped as err:
            failure = err
        finally:
            if bar is not None:
                bar.close()
            if started_ray:
                import ray

                ray.shutdown()
            if exporter is not None:
                exporter.stop()
    runner.stats.worker_requests = runner.stats.requests  # every request went from a worker
    summary = {
        **run_summary(config, store, runner.stats, runner.rows_from_log, started, failure),
        "backend": "ray",
        "ray_workers": config.run.workers,
        # Starting Ray, its first read and the actors, until the first chunk goes out.
        "startup_s": round(runner.first_sent - started, 3) if runner.first_sent else None,
        **run_dates(store, started, resuming=resuming, rerun_of_finished=nothing_to_do),
    }
    write_summary(store, summary)
    write_card(store, config, summary)
    if exporter is not None and not runner.interrupted:
        failure = push_at_end(exporter, config, store, summary, failure)
    if failure is not None:
        failure.summary = summary
        raise failure
    return RunResult(summary, store)


def _init_ray(config: Config, show_progress: bool) -> bool:
    """Join ``run.ray_address`` (or RAY_ADDRESS, or the Ray already started in this process), else
    start a local Ray; True when this call started it (and so must shut it down)."""
    try:
        import ray
    except ImportError:
        raise ConfigError("run.backend: ray needs Ray: pip install 'capstream[ray]'") from None
    started = False
    if not ray.is_initialized():
        ray.init(address=config.run.ray_address, include_dashboard=False, logging_level="WARNING",
                 configure_logging=True, log_to_driver=True)
        started = True
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # shards, keys and resume rely on source order
    context.enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # its per-dataset INFO lines drown the report
    return started


__all__ = ["run_on_ray", "CaptionWorker", "RayRun", "open_ray_dataset"]
