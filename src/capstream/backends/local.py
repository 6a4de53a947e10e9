"""``run.backend: local``: rows flow continuously through a bounded window of chunks on one event loop.

    reader thread ──chunks──▶ feeder ──row tasks──▶ CaptionSession.caption ──answers──▶ results log
                                                                             └─▶ chunk complete ─▶ shard

* The reader pulls chunks from the source in a worker thread, one ahead of the feeder.
* The feeder hands each chunk to the run core (which re-uses logged answers) and starts one task
  per row left to ask, never more than ``2 * max_concurrency`` at once (so images are prepared
  while earlier requests run; ``image.download_concurrency`` more for rows whose image is a URL, so
  that downloads run ahead: ``row/downloads.RowSlots``), and never more than ``run.window_chunks``
  unfinished chunks: memory is bounded by the window, not the dataset. ``run.workers`` > 1 adds
  worker processes that send requests for this loop (``model/processes.py``); limits and retries
  stay here.
* Each answer is appended to the results log the moment it arrives, before the row counts as done;
  a complete chunk's shard is written in a worker thread while later chunks go on. Chunks finish
  out of order; shard names keep source order.
* A ``RunStopped`` from any row (endpoint down, bad key, disk full, the budget) or a stop request
  (Ctrl-C) stops the feeder; requests already in flight finish (bounded), everything received is
  written, and the error is raised for the run core. A rerun resumes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Coroutine, Iterator

from ..core.run import ChunkWork, RowToDo, RunCore
from ..errors import Interrupted, NotSent, RunStopped
from ..io.source import Source
from ..row.session import CaptionSession, SessionSpec

if TYPE_CHECKING:
    from langchain_core.language_models import BaseChatModel


class LocalBackend:
    """This process's event loop (in a thread when the caller is already inside one: notebooks)."""

    name = "local"
    workers = None
    startup_s = None

    def __init__(self, source: Source, spec: SessionSpec, *, llm: "BaseChatModel | None" = None, chunk_size: int,
                 window_chunks: int, prep_threads: int, handle_signals: bool = False):
        self.source = source
        self.spec = spec
        self.llm = llm
        self.chunk_size = chunk_size
        self.window_chunks = window_chunks
        self.prep_threads = prep_threads
        self.handle_signals = handle_signals
        self._stop_on_loop: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None  # while running

    def request_stop(self) -> None:
        """Stop taking new rows (from any thread); in-flight requests finish; the run then raises
        ``Interrupted``, with what was received saved."""
        if self._stop_on_loop is not None:
            loop, stopping = self._stop_on_loop
            loop.call_soon_threadsafe(stopping.set)

    def run(self, core: RunCore) -> int:
        pool = ThreadPoolExecutor(self.prep_threads, thread_name_prefix="capstream-prep")
        try:
            run_on_own_loop(self._main(core, pool))
        finally:
            pool.shutdown(wait=False)
        return self.source.chunk_count

    async def _main(self, core: RunCore, pool: ThreadPoolExecutor) -> None:
        stopping = asyncio.Event()  # set by a failure or a stop request: no new request is sent
        self._stop_on_loop = (asyncio.get_running_loop(), stopping)
        with stop_on_signals(stopping) if self.handle_signals else contextlib.nullcontext():
            session = self.spec.open(prep_pool=pool, llm=self.llm, usage=core.usage, stopping=stopping,
                                     before_send=core.budget, base_dir=self.source.base_dir, keep_files=True,
                                     keep_downloads=core.embeds_downloads, observer=core.events)
            pipeline = _Pipeline(core, session, self.source.chunks(self.chunk_size, skip=core.skip),
                                 window_chunks=self.window_chunks)
            await pipeline.run()


class _Pipeline:
    """One pass of chunks through a session. Use once: ``await _Pipeline(...).run()``."""

    def __init__(self, core: RunCore, session: CaptionSession, chunks: Iterator, *, window_chunks: int):
        self.core = core
        self.session = session
        self.chunks = chunks
        self.stopping = session.stopping
        self.window = asyncio.Semaphore(window_chunks)
        self.failure: RunStopped | None = None
        self._row_tasks: set[asyncio.Task] = set()
        self._chunk_tasks: set[asyncio.Task] = set()

    async def run(self) -> None:
        queue: asyncio.Queue = asyncio.Queue(maxsize=1)
        reader = asyncio.create_task(self._read(queue))
        try:
            await self._feed(queue)
        finally:
            reader.cancel()
            await self._drain()
            await self.session.aclose()
        if self.failure is not None:
            raise self.failure
        if self.stopping.is_set():
            raise Interrupted("stopped by request")

    async def _read(self, queue: asyncio.Queue) -> None:
        try:
            while True:
                chunk = await asyncio.to_thread(next, self.chunks, None)
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
        while await self._acquire_unless_stopped(self.window):
            chunk = await queue.get()
            if chunk is None or self.stopping.is_set() or len(chunk) == 0:
                self.window.release()
                if chunk is None or self.stopping.is_set():
                    return
                continue
            try:
                work = self.core.open_chunk(chunk)
            except RunStopped as err:
                self._fail(err)
                self.window.release()
                return
            if work.complete:  # every row's answers were logged
                self._start_write(work)
            for item in work.todo:
                row_slots = self.session.row_slots.for_image(item.image)
                if not await self._acquire_unless_stopped(row_slots):
                    return
                task = asyncio.create_task(self._row(work, item, row_slots))
                self._row_tasks.add(task)
                task.add_done_callback(self._row_tasks.discard)

    async def _acquire_unless_stopped(self, semaphore: asyncio.Semaphore) -> bool:
        """Acquire ``semaphore``, unless a stop comes first (rows left unsent never free their chunk's
        window slot, so a feeder waiting for one must wake up on the stop instead)."""
        if self.stopping.is_set():
            return False
        if not semaphore.locked():
            return await semaphore.acquire()  # does not wait
        acquire = asyncio.ensure_future(semaphore.acquire())
        stop = asyncio.ensure_future(self.stopping.wait())
        await asyncio.wait({acquire, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not acquire.done():
            acquire.cancel()
            return False
        if self.stopping.is_set():
            semaphore.release()
            return False
        return True

    async def _row(self, work: ChunkWork, item: RowToDo, row_slots: asyncio.Semaphore) -> None:
        try:
            result = await self.session.caption(item.image, item.row, known=item.known,
                                                record=self.core.answer_log(work, item.key))
        except NotSent:
            return  # the run is stopping: the row stays to do, nothing was paid
        except RunStopped as err:
            self._fail(err)
            return
        except Exception as err:  # a bug must stop the run cleanly, not leave the window waiting
            self._fail(RunStopped(f"internal error: {type(err).__name__}: {err}"))
            return
        finally:
            row_slots.release()
        if self.core.row_done(work, item.offset, result):
            self._start_write(work)

    def _start_write(self, work: ChunkWork) -> None:
        task = asyncio.create_task(self._write(work))
        self._chunk_tasks.add(task)
        task.add_done_callback(self._chunk_tasks.discard)

    async def _write(self, work: ChunkWork) -> None:
        try:
            await asyncio.to_thread(self.core.write_shard, work, self.session.images.files_read)
            self.core.shard_written(work)
        except RunStopped as err:
            self._fail(err)
        finally:
            self.window.release()

    def _fail(self, err: RunStopped) -> None:
        if self.failure is None:
            self.failure = err
        self.stopping.set()

    async def _drain(self) -> None:
        """Let in-flight requests finish (bounded), then wait for the shard writes they trigger."""
        if self._row_tasks:
            _, late = await asyncio.wait(set(self._row_tasks), timeout=self.core.drain_timeout_s)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)
        while self._chunk_tasks:
            await asyncio.wait(set(self._chunk_tasks))


def run_on_own_loop(coro: Coroutine) -> Any:
    """Run on a fresh loop; in a thread when the caller is already inside one (notebooks)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(coro)
        except BaseException as err:  # re-raised in the caller's thread
            box["error"] = err

    thread = threading.Thread(target=target, name="capstream-run")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


STOPPING_MESSAGE = "finishing the requests in flight and saving (Ctrl-C again to quit at once)"


@contextlib.contextmanager
def stop_on_signals(stopping: asyncio.Event, message: str = STOPPING_MESSAGE):
    """First Ctrl-C (or SIGTERM): stop taking rows and finish in-flight ones. Second: exit at once.
    Installed only on the main thread's loop (a run from the CLI); ``message`` says what the first does."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stopping.is_set():
            print("\ncapstream: stopping now; rerun the same command to resume", file=sys.stderr, flush=True)
            os._exit(130)
        print(f"\ncapstream: {message}", file=sys.stderr, flush=True)
        stopping.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    try:
        yield
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


__all__ = ["LocalBackend", "run_on_own_loop", "stop_on_signals"]
