"""The async runner: rows flow continuously through a bounded window of chunks.

    reader thread ──chunks──▶ feeder ──row tasks──▶ CaptionSession.caption ──▶ results log
                                                                              └─▶ chunk done ─▶ shard

* The reader pulls chunks from the source in a worker thread, one ahead of the feeder.
* The feeder starts one task per row whose prompts do not all have a logged answer (those it has
  are handed to the task, not asked again), never more than
  ``2 * max_concurrency`` at once (so images are prepared while earlier requests run), and never
  more than ``run.window_chunks`` unfinished chunks: memory is bounded by the window, not the dataset.
* Each answer (one per row and prompt) is appended to the results log the moment it arrives, before
  the row counts as done; a chunk whose rows are all done is written as a shard in a worker thread
  while later chunks go on (then ``on_chunk_written``, which the Hub export listens to). Chunks
  finish out of order; shard names keep source order.
* A ``RunStopped`` from any row (endpoint down, bad key, disk full) or a stop request (Ctrl-C) stops
  the feeder; requests already in flight finish (bounded), everything received is written, and the
  error is raised for the caller. A rerun resumes.

This module knows nothing of YAML, the CLI or the Hub.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

from .captioner import Captioner, NotSent
from .errors import RunStopped
from .results import PromptAnswer, RowResult, Stats, answers_from_log, output_layout, row_result
from .source import Chunk, Source
from .store import RunStore


class Interrupted(RunStopped):
    """The user asked the run to stop (Ctrl-C); what was received is saved."""


class _ChunkState:
    def __init__(self, chunk: Chunk):
        self.chunk = chunk
        self.pending = len(chunk)


class Runner:
    """One pass over a source into a store. Use once: ``await Runner(...).run()``."""

    def __init__(self, source: Source, captioner: Captioner, store: RunStore, *, retry_errors: bool = False,
                 progress: Callable[[RowResult], None] | None = None, drain_timeout_s: float | None = None,
                 on_chunk_written: Callable[[int], None] | None = None):
        self.source = source
        # Chunks not to read at all: every written shard, except (with retry_errors) those with errors.
        self.skip_chunks = store.chunks_to_skip(retry_errors)
        self.retry_errors = retry_errors
        self.captioner = captioner
        self.store = store
        self.config = captioner.config
        self.progress = progress or (lambda result: None)
        self.on_chunk_written = on_chunk_written  # called (in the loop, must not block) once a shard is recorded
        self.drain_timeout_s = drain_timeout_s if drain_timeout_s is not None else self.config.model.timeout_s + 5
        self.features, self.template_columns = output_layout(
            captioner.prompts, source.features, source.image_column, self.config.output.error_column)
        # Answers already paid for; with retry_errors only the good ones, so error rows are asked again.
        self.logged = store.logged_results(self.skip_chunks, ok_only=retry_errors)
        self.stop_requested = asyncio.Event()
        self.failure: RunStopped | None = None
        self.stats = Stats()
        self._row_tasks: set[asyncio.Task] = set()
        self._chunk_tasks: set[asyncio.Task] = set()
        self.rows_from_log = 0  # rows whose answer an earlier run had already received
        self.before_send: Callable[[], None] = lambda: None  # checked before each request (run.max_cost_usd)

    def request_stop(self) -> None:
        """Stop taking new rows; in-flight requests finish; the run then raises ``Interrupted``."""
        self.stop_requested.set()

    async def run(self) -> None:
        cfg = self.config
        self.session = self.captioner.session(base_dir=self.source.base_dir)
        self.session.stats = self.stats
        self.session.stopping = self.stop_requested
        self.session.files_read = {}  # image files read by path, embedded by _write without a second read
        self.session.before_send = self.before_send
        self.window = asyncio.Semaphore(cfg.run.window_chunks)
        self.row_slots = asyncio.Semaphore(2 * cfg.limits.max_concurrency)
        queue: asyncio.Queue = asyncio.Queue(maxsize=1)
        chunks = self.source.chunks(cfg.run.chunk_size, skip=self.skip_chunks)
        reader = asyncio.create_task(self._read(chunks, queue))
        try:
            await self._feed(queue)
        finally:
            reader.cancel()
            await self._drain()
            await self.session.aclose()
            self.store.close()
        if self.failure is not None:
            raise self.failure
        if self.stop_requested.is_set():
            raise Interrupted("stopped by request")
        self.store.finish(self.source.chunk_count)

    async def _read(self, chunks, queue: asyncio.Queue) -> None:
        try:
            while True:
                chunk = await asyncio.to_thread(next, chunks, None)
                await queue.put(chunk)
                if chunk is None:
                    return
        except asyncio.CancelledError:
            raise
        except RunStopped as err:
            self._fail(err)
            await queue.put(None)
        except Exception as err:  # a source that breaks mid-stream (network, corrupt file)
            self._fail(RunStopped(f"reading the dataset failed: {type(err).__name__}: {err}"))
            await queue.put(None)

    async def _feed(self, queue: asyncio.Queue) -> None:
        image_column = self.source.image_column
        key_column = self.config.dataset.key_column
        while await self._acquire_unless_stopped(self.window):
            chunk = await queue.get()
            if chunk is None or self.stop_requested.is_set():
                self.window.release()
                return
            state = _ChunkState(chunk)
            keys = chunk.columns[key_column] if key_column else range(chunk.start, chunk.start + len(chunk))
            images = chunk.columns.get(image_column)
            if images is None:
                self._fail(RunStopped(f"dataset.image_column: no column {image_column!r} in the rows read"))
                self.window.release()
                return
            missing = [name for name in self.template_columns if name not in chunk.columns]
            if missing:
                self._fail(RunStopped(f"prompt placeholder {{{missing[0]}}}: no column {missing[0]!r} in the rows read"))
                self.window.release()
                return
            for offset, key in enumerate(keys):
                known = answers_from_log(self.logged.pop(key, {}))
                if (result := row_result(self.captioner.prompts, known)) is not None:
                    self.rows_from_log += 1
                    self._row_done(state, offset, result)
                    continue
                if not await self._acquire_unless_stopped(self.row_slots):
                    return
                row = {name: chunk.columns[name][offset] for name in self.template_columns}
                task = asyncio.create_task(self._row(state, offset, key, images[offset], row, known))
                self._row_tasks.add(task)
                task.add_done_callback(self._row_tasks.discard)
            if len(chunk) == 0:
                self.window.release()

    async def _acquire_unless_stopped(self, semaphore: asyncio.Semaphore) -> bool:
        """Acquire ``semaphore``, unless a stop comes first (rows left unsent never free their chunk's
        window slot, so a feeder waiting for one must wake up on the stop instead)."""
        if self.stop_requested.is_set():
            return False
        if not semaphore.locked():
            return await semaphore.acquire()  # does not wait
        acquire = asyncio.ensure_future(semaphore.acquire())
        stop = asyncio.ensure_future(self.stop_requested.wait())
        await asyncio.wait({acquire, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not acquire.done():
            acquire.cancel()
            return False
        if self.stop_requested.is_set():
            semaphore.release()
            return False
        return True

    async def _row(self, state: _ChunkState, offset: int, key: Any, value: Any, row: dict[str, Any],
                   known: dict[str, PromptAnswer]) -> None:
        def record(prompt: str, answer: PromptAnswer) -> None:
            self.store.log_answer(state.chunk.index, key, prompt, answer)

        try:
            result = await self.session.caption(value, row, known=known, record=record)
        except NotSent:
            return  # the run is stopping: the row stays to do, nothing was paid
        except RunStopped as err:
            self._fail(err)
            return
        except Exception as err:  # a bug must stop the run cleanly, not leave the window waiting
            self._fail(RunStopped(f"internal error: {type(err).__name__}: {err}"))
            return
        finally:
            self.row_slots.release()
        self.progress(result)
        self._row_done(state, offset, result)

    def _row_done(self, state: _ChunkState, offset: int, result: RowResult) -> None:
        state.chunk.results[offset] = result
        state.pending -= 1
        if state.pending == 0:
            task = asyncio.create_task(self._write(state.chunk))
            self._chunk_tasks.add(task)
            task.add_done_callback(self._chunk_tasks.discard)

    async def _write(self, chunk: Chunk) -> None:
        results = [chunk.results[i] for i in range(len(chunk))]
        columns = {**chunk.columns, **self.captioner.output_columns(results)}
        try:
            await asyncio.to_thread(self.store.write_shard, chunk.index, columns, self.features, self.source.base_dir,
                                    self.session.files_read)
            counts = Stats()
            for r in results:
                counts.add(r)
            self.store.mark_done(chunk.index, counts.as_counts())
            if self.on_chunk_written is not None:
                self.on_chunk_written(chunk.index)
        except RunStopped as err:
            self._fail(err)
        finally:
            self.window.release()

    def _fail(self, err: RunStopped) -> None:
        if self.failure is None:
            self.failure = err
        self.stop_requested.set()

    async def _drain(self) -> None:
        """Let in-flight requests finish (bounded), then wait for the shard writes they trigger."""
        if self._row_tasks:
            _, late = await asyncio.wait(set(self._row_tasks), timeout=self.drain_timeout_s)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)
        while self._chunk_tasks:
            await asyncio.wait(set(self._chunk_tasks))

