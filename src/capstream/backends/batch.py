"""``run.backend: batch``: the same run bought through the provider's Batch API, at its batch price.

    source ──chunks──▶ plan: run core's rows to ask ─▶ BatchRows.plan (image prepared as online; the
       ▲               response cache first) ─▶ request files (≤ max_requests lines, ≤ max_bytes), ledger
       │                                                        │ upload, create (metadata: the run)
       │               poll (a growing interval) ◀──────────────┘
       │               collect: output + error files ─▶ each answer logged, kept; 5xx / expired lines
       │                                               ─▶ a later request file (batch.max_resubmits)
       └── read again ─▶ a chunk whose every answer is in ─▶ core.open_chunk, row_done, write_shard

* **Planning** reads the input in chunks as the local backend does and asks the run core which rows
  to ask (``peek_chunk``: answers logged by earlier runs are re-used). Each row's image is prepared
  once, exactly as online; each prompt is served from the response cache or becomes one line whose
  body is what ``ChatOpenAI`` sends for it. Identical requests within one request file are one line.
  Lines go to numbered request files on disk (``io/batch_ledger.py``), never all in memory; at most
  ``PLAN_AHEAD`` files wait for their batch, so the disk holds what is in flight and a little more.
* **Batches**: every file recorded is uploaded and a batch made of it (``completion_window``,
  metadata naming the run and the file). ``run.max_cost_usd`` is checked before each batch, with
  what the file is expected to cost (at the batch price) and what the batches in flight may still
  cost. A batch refused for the enqueued-token limit waits and is made again; one refused for any
  other reason stops the run.
* **Collecting**: a batch done (completed, expired, cancelled) has its output and error files
  downloaded and read line by line: each answer is logged the moment it is read (and a good one put
  into the response cache); a 4xx line is an error row; a 5xx, expired or cancelled line, and an
  answer that does not match the prompt's schema (``retry.invalid_answer_attempts``), go into a new
  request file, up to ``batch.max_resubmits`` later batches.
* **Writing**: a second pass over the input, in order, writes each chunk whose rows have all their
  answers (no file still out holds one of its lines) as the local backend writes it (``open_chunk``,
  ``row_done``, ``write_shard``, ``shard_written``); the pass holds the first chunk still waiting
  and goes on when it has its answers. A chunk that needed no request is written when planned.
  Answers wait in memory only until their chunk is written; the input is read twice in all.
* **Durable**: the ledger records each step before the next (see ``io/batch_ledger.py``); a rerun
  continues the planning where the ledger says it got, keeps polling the batches in flight, adopts
  a batch made just before a kill (found by its metadata), collects those done, and never makes a
  second batch of the same file. Ctrl-C stops planning and polling: the batches go on at the
  provider and a rerun picks them up. ``capstream status`` and ``capstream cancel``
  are ``batch_control.py``.
* ``batch.submit: false`` writes the request files and submits nothing; result files put into
  ``.capstream/batch/results/`` are read by the next run.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from ..core.run import RowToDo, RunCore
from ..errors import BudgetReached, Interrupted, RunStopped
from ..io.batch_ledger import (
    BatchLedger,
    BatchTry,
    Follower,
    IndexEntry,
    RequestFile,
    RequestWriter,
    read_index,
    request_lines,
)
from ..io.results_log import hashable_key, records
from ..io.source import Chunk, Source
from ..model.batch_api import (
    TOKEN_LIMIT,
    WITH_RESULTS,
    BatchAPI,
    BatchState,
    ResultLine,
    read_result_lines,
    request_line,
)
from ..row.batch_rows import BatchRows, LineOutcome
from ..row.results import PromptAnswer, row_result
from ..row.session import SessionSpec
from .local import run_on_own_loop, stop_on_signals

if TYPE_CHECKING:
    from ..config import BatchConfig

PLAN_AHEAD = 2  # request files recorded and waiting for their batch before planning waits
ROWS_AT_ONCE = 64  # rows whose images are prepared together while planning
STOPPING = "stopping; the batches stay at the provider and a rerun collects them (Ctrl-C again to quit at once)"


class BatchBackend:
    """The provider's Batch API, driven from this process; see the module's docstring."""

    name = "batch"
    workers = None
    startup_s = None

    def __init__(self, source: Source, spec: SessionSpec, settings: "BatchConfig", *, chunk_size: int,
                 prep_threads: int, handle_signals: bool = False):
        self.source = source
        self.spec = spec
        self.settings = settings
        self.chunk_size = chunk_size
        self.prep_threads = prep_threads
        self.handle_signals = handle_signals

    def run(self, core: RunCore) -> int:
        pool = ThreadPoolExecutor(self.prep_threads, thread_name_prefix="capstream-prep")
        try:
            return run_on_own_loop(self._main(core, pool))
        finally:
            pool.shutdown(wait=False)

    async def _main(self, core: RunCore, pool: ThreadPoolExecutor) -> int:
        stopping = asyncio.Event()
        with stop_on_signals(stopping, STOPPING) if self.handle_signals else contextlib.nullcontext():
            ledger = BatchLedger.open(core.store.layout)
            rows = BatchRows.open(self.spec, prep_pool=pool, base_dir=self.source.base_dir)
            api = (BatchAPI(self.spec.model, max_attempts=self.spec.retry.max_attempts,
                            max_wait_s=self.spec.retry.max_wait_s) if self.settings.submit else None)
            try:
                run = _BatchRun(core, ledger, rows, api, self.source, self.settings, chunk_size=self.chunk_size,
                                invalid_answer_attempts=self.spec.retry.invalid_answer_attempts, stopping=stopping)
                return await run.run()
            finally:
                await rows.aclose()
                if api is not None:
                    await api.aclose()


class _BatchRun:
    """One pass of a batch run. Use once: ``await _BatchRun(...).run()``."""

    def __init__(self, core: RunCore, ledger: BatchLedger, rows: BatchRows, api: BatchAPI | None, source: Source,
                 settings: "BatchConfig", *, chunk_size: int, invalid_answer_attempts: int, stopping: asyncio.Event):
        self.core = core
        self.ledger = ledger
        self.rows = rows
        self.api = api
        self.source = source
        self.settings = settings
        self.chunk_size = chunk_size
        self.invalid_answer_attempts = invalid_answer_attempts
        self.stopping = stopping
        self.url = api.endpoint if api is not None else "/v1/chat/completions"
        self.prompts = [p.name for p in core.shape.prompts]
        self.keyed = core.shape.key_column is not None
        self.writer = RequestWriter(ledger, max_requests=settings.max_requests, max_bytes=settings.max_bytes,
                                    on_file=lambda record: self.file_ready.set())
        self.received: dict[tuple[int, int], dict[str, PromptAnswer]] = {}  # (chunk, offset) -> answers, unwritten
        self.waiting: set[int] = set()  # chunks planned whose shard waits for answers
        self.planned_before = 0  # chunks below this index are planned (or were by an earlier run)
        # The writer's one pass over the input, in order (a streamed input read again from the start
        # at every write would cost reading the dataset once per chunk), and the chunk it holds.
        self.to_write: Iterator[Chunk] | None = None
        self.held: Chunk | None = None
        self.failure: RunStopped | None = None
        self.budget_note: str | None = None  # why a file was not submitted: the budget
        self.file_ready = asyncio.Event()  # the planner recorded a file
        self.room = asyncio.Event()  # a file got its batch: the planner may write more
        self.planning_done = False

    # -- the run -----------------------------------------------------------------------------------

    async def run(self) -> int:
        if self.ledger.round == 0 or self.ledger.settled:
            self.ledger.start_round()
        planner = asyncio.create_task(self._plan())
        try:
            await self._follow_batches()
        finally:
            if not planner.done():  # stopped, or held by the budget: planning goes no further
                planner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await planner
        if self.failure is not None:
            raise self.failure
        if self.stopping.is_set():
            raise Interrupted("stopped by request; the batches keep going at the provider: rerun the same "
                              "command to collect them")
        if self.budget_note is not None:
            raise BudgetReached(self.budget_note)
        if self.api is None and self.ledger.open_files:
            raise RunStopped(f"batch.submit is false: {len(self.ledger.open_files)} request file(s) in "
                             f"{self.ledger.layout.batch_dir} wait for their results; put the result files into "
                             f"{self.ledger.layout.batch_results} and run again")
        return self.ledger.chunks

    async def _follow_batches(self) -> None:
        """Submit, poll and collect until every file is collected and every chunk written (or a stop)."""
        interval = self.settings.poll_s
        while self.failure is None and not self.stopping.is_set():
            try:
                changed = await (self._submit_and_poll() if self.api is not None else self._ingest())
                changed |= await self._write_ready()
            except RunStopped as err:
                self._fail(err)
                return
            except Exception as err:  # a bug must stop the run cleanly, its state saved
                self._fail(RunStopped(f"internal error: {type(err).__name__}: {err}"))
                return
            if self.planning_done and not self.waiting and not self.ledger.open_files:
                return
            if (self.planning_done or self.budget_note is not None) and not changed and self._nothing_to_wait_for():
                return
            interval = self.settings.poll_s if changed else min(interval * 1.5, 20 * self.settings.poll_s)
            await self._pause(interval)

    def _nothing_to_wait_for(self) -> bool:
        """Only files no batch will answer are left: held by the budget, or (submit: false) waiting
        for result files put back by hand."""
        if self.api is None:
            return True
        return self.budget_note is not None and all(f.batch is None for f in self.ledger.open_files)

    async def _pause(self, seconds: float) -> None:
        """Wait ``seconds``, or less when the planner records a file or the run is stopping."""
        self.file_ready.clear()
        waits = [asyncio.ensure_future(e.wait()) for e in (self.file_ready, self.stopping)]
        await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        for w in waits:
            w.cancel()

    def _fail(self, err: RunStopped) -> None:
        if self.failure is None:
            self.failure = err
        self.stopping.set()

    # -- planning ----------------------------------------------------------------------------------

    async def _plan(self) -> None:
        """Read the chunks not planned yet, and write their requests into request files. Stopped (or
        cancelled), it records the file it was writing: a rerun continues after its last line."""
        try:
            if self.ledger.planned_all:  # planned by an earlier run: its chunks wait for their answers
                self.waiting |= set(range(self.ledger.chunks or 0)) - set(self.core.skip)
                self.planned_before = self.ledger.chunks or 0
            else:
                await self._plan_chunks()
        except RunStopped as err:
            self.writer.abandon()
            self._fail(err)
        except Exception as err:  # a source that breaks mid-stream, or a bug: the run stops cleanly
            self.writer.abandon()
            self._fail(RunStopped(f"planning the batches failed: {type(err).__name__}: {err}"))
        finally:
            try:
                self.writer.finish()
            except RunStopped as err:
                self._fail(err)
            self.planning_done = True
            self.file_ready.set()

    async def _plan_chunks(self) -> None:
        start = self.ledger.planned_through  # the round's planning got this far before (a rerun)
        skip = set(self.core.skip)
        if start is not None:
            before = set(range(start[0]))
            self.waiting |= before - skip  # planned by an earlier run, not written yet
            skip |= before
            self.planned_before = start[0]
        chunks = self.source.chunks(self.chunk_size, skip=skip)
        while not self.stopping.is_set():
            await self._room_to_plan()
            chunk = await asyncio.to_thread(next, chunks, None)
            if chunk is None:
                self.writer.finish()
                self.ledger.planned(self.source.chunk_count)
                self.planned_before = self.source.chunk_count
                return
            if len(chunk) and not self.stopping.is_set():
                await self._plan_chunk(chunk, start)
            if not self.stopping.is_set():
                self.planned_before = chunk.index + 1

    async def _room_to_plan(self) -> None:
        """With batches to make, wait while ``PLAN_AHEAD`` files already wait for theirs."""
        while (self.api is not None and not self.stopping.is_set()
               and sum(f.batch is None for f in self.ledger.open_files) >= PLAN_AHEAD):
            self.room.clear()
            await self.room.wait()

    async def _plan_chunk(self, chunk: Chunk, start: tuple[int, int, int] | None) -> None:
        todo = self.core.peek_chunk(chunk)
        for first in range(0, len(todo), ROWS_AT_ONCE):
            part = todo[first:first + ROWS_AT_ONCE]
            asks = [self._to_ask(chunk.index, item, start) for item in part]
            planned = await asyncio.gather(*(self.rows.plan(item.image, item.row, ask)
                                             for item, ask in zip(part, asks)))
            for item, plan in zip(part, planned):
                for name, answer in plan.answers.items():
                    if answer.source == "cache":
                        self.core.usage.count_reused("cache")
                    self._keep(chunk.index, item.offset, item.key, name, answer)
                for ask in plan.asks:
                    self._add_line(chunk.index, item, ask)
        if chunk.index in self.writer.open_chunks or chunk.index in self.ledger.touched_chunks():
            self.waiting.add(chunk.index)
        else:
            await self._write(chunk)  # every answer is in already: the chunk in hand is written

    def _to_ask(self, chunk: int, item: RowToDo, start: tuple[int, int, int] | None) -> list[str]:
        """The row's prompts to plan: not logged, and not in a file recorded by an earlier run."""
        names = [name for name in self.prompts if name not in item.known]
        if start is not None and (chunk, item.offset) <= start[:2]:
            if (chunk, item.offset) < start[:2]:
                return []
            names = [name for name in names if self.prompts.index(name) > start[2]]
        return names

    def _add_line(self, chunk: int, item: RowToDo, ask) -> None:
        position = (chunk, item.offset, ask.prompt_index)
        row_key = item.key if self.keyed else None
        if self.writer.follow(ask.key, Follower(chunk, item.offset, ask.prompt_index, row_key), position):
            return
        entry = IndexEntry(self.ledger.round, chunk, item.offset, ask.prompt_index, ask.key, row_key)
        self.writer.add(entry, request_line(entry.custom_id, self.url, ask.body_json),
                        (ask.input_tokens, ask.output_tokens), position)

    # -- batches: submit, poll, collect ------------------------------------------------------------

    async def _submit_and_poll(self) -> bool:
        changed = await self._submit()
        for record in list(self.ledger.open_files):
            if self.failure is not None or self.stopping.is_set():
                break
            if record.batch is not None:
                changed |= await self._poll(record)
        return changed

    async def _submit(self) -> bool:
        """A batch for each recorded file without one, in order, as long as the budget and the
        enqueued-token limit let them go."""
        changed = False
        for record in self.ledger.open_files:
            if self.stopping.is_set():
                break
            if record.batch is not None:
                continue
            if record.wait_until is not None and time.time() < record.wait_until:
                break  # the enqueued-token limit: later files would be refused too
            if not self._within_budget(record):
                break
            await self._make_batch(record)
            changed = True
            self.room.set()
        return changed

    def _within_budget(self, record: RequestFile) -> bool:
        if self.core.budget is None:
            return True
        prices = self.core.meter.prices
        spent = self.core.meter.total_usd() or 0.0
        in_flight = sum(prices.usd(*f.tokens) or 0.0 for f in self.ledger.open_files if f.batch is not None)
        expected = prices.usd(*record.tokens) or 0.0
        limit = self.core.budget.max_usd
        if spent + in_flight + expected <= limit:
            self.budget_note = None  # it fits now (batches in flight were paid for less than expected)
            return True
        self.budget_note = (
            f"run.max_cost_usd: {record.name} ({record.requests:,} requests, about ${expected:.4f} at the batch "
            f"price) would take {self.core.store.dir} past its budget (${spent:.4f} spent, up to ${in_flight:.4f} "
            f"in batches in flight, budget ${limit:g}); it was not submitted. Raise run.max_cost_usd "
            f"(e.g. --set run.max_cost_usd={max(limit * 2, spent + in_flight + expected):g}) and rerun to resume")
        return False

    async def _make_batch(self, record: RequestFile) -> None:
        """Upload the file (once) and make its batch, or adopt the one a killed run made of it."""
        if record.file_id is None:
            file_id = await self.api.upload(self.ledger.path_of(record))
            record.uploaded(file_id, time.time())
            self.ledger.save()
        identity = self.ledger.identity(record)  # the folder's name is sent too, for people only
        if record.creating_at is not None:  # a kill came between asking for the batch and recording it
            found = await self.api.find(identity, since=record.creating_at - 3600)
            if found:
                self._created(record, await self.api.adopt(found))
                return
        record.creating(time.time())
        self.ledger.save()
        state = await self.api.create(record.file_id, completion_window=self.settings.completion_window,
                                      metadata={**identity, "capstream_output": self.core.store.dir.name[:500]},
                                      identity=identity)
        if state.refusal == TOKEN_LIMIT:
            self._wait_for_token_limit(record)
            return
        self._created(record, state)

    def _created(self, record: RequestFile, state: BatchState) -> None:
        record.created(BatchTry.of(state))
        self.ledger.save()

    def _wait_for_token_limit(self, record: RequestFile) -> None:
        refusals = sum(t.refusal == TOKEN_LIMIT for t in record.tries) + 1
        wait = min(self.settings.poll_s * 2 ** (refusals - 1), 20 * self.settings.poll_s)
        record.refused(TOKEN_LIMIT, at=time.time(), wait_until=time.time() + wait)
        self.ledger.save()

    async def _poll(self, record: RequestFile) -> bool:
        batch = record.batch
        changed = False
        if batch.status not in WITH_RESULTS:  # a done batch's files are recorded
            state = await self.api.retrieve(batch.id)
            changed = record.seen(BatchTry.of(state))
            if changed:
                self.ledger.save()
            if state.status == "failed":
                if state.refusal == TOKEN_LIMIT:
                    self._wait_for_token_limit(record)
                    return True
                record.refused(state.refusal, at=time.time(), wait_until=None)  # a rerun makes a new batch
                self.ledger.save()
                raise RunStopped(f"{self.api.refusal.endpoint} refused batch {batch.id} of {record.name}: "
                                 f"{self.api.refusal.scrub(state.refusal_text())}")
            batch = record.batch
        if batch.status in WITH_RESULTS:
            paths = []
            for kind, file_id in (("output", batch.output_file_id), ("errors", batch.error_file_id)):
                if file_id:
                    path = self.ledger.download_path(record, batch.id, kind)
                    if not path.exists():
                        await self.api.download(file_id, path)
                    paths.append(path)
            self._collect(record, _lines_of(paths), complete=False)
            return True
        return changed

    async def _ingest(self) -> bool:
        """``batch.submit: false``: collect each open file whose every line has a result in
        ``.capstream/batch/results/``."""
        if not self.planning_done:
            return False
        wanted = {}
        for record in self.ledger.open_files:
            wanted.update({cid: record for cid in read_index(self.ledger.index_path(record))})
        found: dict[str, dict[str, ResultLine]] = {}
        for path in sorted(self.ledger.layout.batch_results.glob("*.jsonl")):
            for line in read_result_lines(path):
                record = wanted.get(line.custom_id)
                if record is not None:
                    found.setdefault(record.name, {})[line.custom_id] = line
        changed = False
        for record in list(self.ledger.open_files):
            lines = found.get(record.name, {})
            if len(lines) == record.requests:
                self._collect(record, lines.values(), complete=True)
                changed = True
        return changed

    def _collect(self, record: RequestFile, lines: Iterable[ResultLine], *, complete: bool) -> None:
        """Log the answer of every line of a finished batch; the lines it did not answer, and those to
        ask again, go into new request files, recorded with the file's collection in one write."""
        index = read_index(self.ledger.index_path(record))
        logged = self._logged_since(record) if record.collect_started is not None else set()
        record.collecting(time.time())
        self.ledger.save()
        counts = {"answered": 0, "errors": 0, "again": 0}
        again: list[tuple[IndexEntry, LineOutcome]] = []
        seen = set()
        for line in lines:
            entry = index.get(line.custom_id)
            if entry is not None and line.custom_id not in seen:
                seen.add(line.custom_id)
                self._take(entry, line, logged, again, counts)
        if not complete:
            for custom_id, entry in index.items():
                if custom_id not in seen:  # in neither file: not run
                    self._take(entry, ResultLine(custom_id, error_code="not_answered"), logged, again, counts)
        self.ledger.settle(record, counts, self._resubmit(record, again))
        self.ledger.remove_files_of(record)
        # A refused key or model stops the run only now: every answer the file holds is logged, and its
        # refused lines wait in a later request file for the rerun.
        refused = next((outcome.stops_run for _, outcome in again if outcome.stops_run), None)
        if refused is not None:
            raise RunStopped(refused)

    def _take(self, entry: IndexEntry, line: ResultLine, logged: set, again: list, counts: dict[str, int]) -> None:
        outcome = self.rows.read(self.prompts[entry.prompt], line, attempts=entry.attempts + 1, paid=entry.paid)
        answer = outcome.answer
        key = hashable_key(self._key(entry.chunk, entry.offset, entry.row_key))
        own = (entry.chunk, key, self.prompts[entry.prompt])
        if line.status is not None and own not in logged:  # a request the provider ran: an attempt, and its cost
            self.core.usage.count_attempt(retry=entry.attempts > 0)
            self.core.usage.add_paid(answer.input_tokens - entry.paid[0], answer.output_tokens - entry.paid[1])
        if outcome.again is not None:
            allowed = outcome.stops_run is not None or (
                entry.invalid + 1 < self.invalid_answer_attempts if outcome.invalid
                else entry.attempts < self.settings.max_resubmits)
            if allowed:
                again.append((entry, outcome))
                counts["again"] += 1
                return
        counts["answered" if answer.ok else "errors"] += 1
        self._settle(entry, answer, logged)

    def _settle(self, entry: IndexEntry, answer: PromptAnswer, logged: set) -> None:
        """The answer of a line for its own row and the rows asking the same."""
        for n, (chunk, offset, prompt, row_key) in enumerate(entry.rows()):
            if n:
                self.core.usage.count_reused("dedup")
            given = answer if n == 0 else PromptAnswer(answer.value, answer.error, source="dedup",
                                                       provenance=answer.provenance)
            key = self._key(chunk, offset, row_key)
            name = self.prompts[prompt]
            if (chunk, hashable_key(key), name) in logged:
                self.received.setdefault((chunk, offset), {})[name] = given  # logged by the run that was killed
            else:
                self._keep(chunk, offset, key, name, given)
        self.rows.keep(entry.content_key, answer)

    def _key(self, chunk: int, offset: int, row_key: Any) -> Any:
        """A row's key in the results log: ``dataset.key_column``'s value, else its position."""
        return row_key if self.keyed else chunk * self.chunk_size + offset

    def _keep(self, chunk: int, offset: int, key: Any, prompt: str, answer: PromptAnswer) -> None:
        """An answer of this run: logged now, kept until its chunk is written."""
        self.core.log_answer(chunk, key, prompt, answer)
        self.received.setdefault((chunk, offset), {})[prompt] = answer

    def _logged_since(self, record: RequestFile) -> set[tuple[int, Any, str]]:
        """(chunk, key, prompt) of the answers logged since the file's collection began: a run killed
        while collecting it logged them; the rerun does not log them twice."""
        found = set()
        for log in self.core.store.layout.results_logs():
            for r in records(log):
                when = r.provenance.answered_at if r.provenance is not None else None
                if r.chunk in record.chunks and when is not None and when >= record.collect_started:
                    found.add((r.chunk, hashable_key(r.key), r.prompt))
        return found

    def _resubmit(self, record: RequestFile, again: list[tuple[IndexEntry, LineOutcome]]) -> list[RequestFile]:
        """New request files (not recorded yet) of the lines to submit again, copied from this one."""
        if not again:
            return []
        wanted = {entry.custom_id: (entry, outcome) for entry, outcome in again}
        writer = RequestWriter(self.ledger, max_requests=self.settings.max_requests,
                               max_bytes=self.settings.max_bytes, defer=True)
        per_line = (record.tokens[0] // max(1, record.requests), record.tokens[1] // max(1, record.requests))
        for custom_id, line in request_lines(self.ledger.path_of(record), set(wanted)):
            entry, outcome = wanted[custom_id]
            paid = (outcome.answer.input_tokens - entry.paid[0], outcome.answer.output_tokens - entry.paid[1])
            later = entry.again(invalid=outcome.invalid, paid=paid)
            writer.add(later, line.replace(f'"{custom_id}"'.encode(), f'"{later.custom_id}"'.encode(), 1), per_line)
        writer.finish()
        return writer.finished

    # -- writing -----------------------------------------------------------------------------------

    async def _write_ready(self) -> bool:
        """Read the input again, once and in order, writing each chunk waiting for answers as soon
        as it has them all; a chunk still waiting is held (with the answers of the chunks after it)
        until it has them."""
        ready = self.waiting - self.ledger.touched_chunks() - self.writer.open_chunks
        if not ready:
            return False
        if self.to_write is None:
            self.to_write = self.source.chunks(self.chunk_size, skip=set(self.core.skip))
        wrote = False
        while True:
            chunk = self.held if self.held is not None else await asyncio.to_thread(next, self.to_write, None)
            self.held = None
            if chunk is None:
                return wrote
            if chunk.index not in self.waiting and chunk.index < self.planned_before:
                continue  # written when planned (no request), or empty
            if chunk.index not in ready:  # its answers, or its planning, are still to come
                self.held = chunk
                return wrote
            await self._write(chunk)
            self.waiting.discard(chunk.index)
            wrote = True

    async def _write(self, chunk: Chunk) -> None:
        work = self.core.open_chunk(chunk)
        for item in work.todo:
            answers = {**item.known, **self.received.pop((chunk.index, item.offset), {})}
            result = row_result(self.core.shape.prompts, answers)
            if result is None:
                missing = [name for name in self.prompts if name not in answers]
                raise RunStopped(f"chunk {chunk.index}, row {item.offset}: no answer for {missing[0]!r}, although "
                                 f"no request file holds it (the ledger {self.ledger.layout.batch_ledger} and the "
                                 "results log disagree)")
            self.core.row_done(work, item.offset, result)
        await asyncio.to_thread(self.core.write_shard, work)
        self.core.shard_written(work)


def _lines_of(paths: list) -> Iterable[ResultLine]:
    for path in paths:
        yield from read_result_lines(path)


__all__ = ["BatchBackend", "PLAN_AHEAD"]
