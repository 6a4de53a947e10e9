"""The Python entry point: ``caption_dataset(source, config=..., llm=...)``.

    >>> from capstream import caption_dataset
    >>> ds = caption_dataset("user/my-images", config={"model": {"provider": "mock"}, "output": {"dir": "out"}})
    >>> ds[0]["caption"], ds[0]["error"]

``run()`` is the same work returning the run's summary instead of the dataset; the CLI uses it.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any

import datasets

from . import hub
from .captioner import Captioner, endpoint_label
from .config import Config, resolve_config
from .cost import BudgetGuard, CostMeter, Prices
from .engine import Interrupted, Runner
from .errors import RunStopped
from .progress import ProgressBar
from .results import Stats
from .sinks import write_card, write_summary
from .source import open_source
from .store import RunStore, atomic_write_json


@dataclass
class RunResult:
    summary: dict[str, Any]
    store: RunStore


def _with_source(config: Config, source: Any) -> tuple[Config, Any]:
    """A Hub id or path given as ``source`` fills ``dataset.path``; a dataset object is used as is."""
    if isinstance(source, (str, os.PathLike)):
        config = config.model_copy(deep=True)
        config.dataset.path = str(source)
        return config, None
    return config, source


def run(config: Config | dict | str | None = None, source: Any = None, *, llm: Any = None, overwrite: bool = False,
        retry_errors: bool = False, show_progress: bool = True, handle_signals: bool = False) -> RunResult:
    """Caption ``source`` (or ``config.dataset``) into ``config.output.dir``; return the summary.

    Rerun into the same folder to resume. ``retry_errors`` asks again for the rows whose error is
    set and rewrites their shards; ``overwrite`` discards the folder's previous run.

    Raises ``ConfigError`` before anything is read or sent, ``RunStopped`` (``Interrupted`` for a
    stop request) when the run ends early with its state saved for a rerun.
    """
    started = time.time()  # the run's time includes opening the dataset
    config, data = _with_source(resolve_config(config), source)
    if config.run.backend == "ray":  # Ray is imported only here
        from .ray_backend import run_on_ray

        return run_on_ray(config, data, llm=llm, overwrite=overwrite, retry_errors=retry_errors,
                          show_progress=show_progress)
    captioner = Captioner(config, llm=llm)  # checks the key before anything is read
    store, fingerprint = check_store(config, data, overwrite)  # before any download
    if data is None or config.output.push_to_hub:
        hub.bound_hub_calls(config.output.hub_timeout_s)  # huggingface_hub's clients have no timeout
    src = open_source(config.dataset, data)
    resuming = open_store(store, config, fingerprint, overwrite)
    exporter = hub.HubExporter.from_config(store.dir, config.output, config.dataset.split) if config.output.push_to_hub else None
    runner = Runner(src, captioner, store, retry_errors=retry_errors,
                    on_chunk_written=exporter.chunk_written if exporter else None)
    nothing_to_do = store.nothing_to_do(runner.skip_chunks)
    meter = _meter_costs(config, store, runner)
    bar = ProgressBar(src.num_rows, runner.stats, enabled=show_progress and not nothing_to_do,
                      initial=store.rows_in(runner.skip_chunks), meter=meter)
    runner.progress = bar
    failure: RunStopped | None = None
    try:
        if not nothing_to_do:  # a finished run is not read again (a stream would be downloaded)
            _run_async(runner.run(), runner, handle_signals)
    except RunStopped as err:
        failure = err
    finally:
        bar.close()
        captioner.close()
        if exporter is not None:
            exporter.stop()
    summary = {
        **run_summary(config, store, runner.stats, runner.rows_from_log, started, failure),
        **_cost_fields(meter, config),
        **run_dates(store, started, resuming=resuming, rerun_of_finished=nothing_to_do),
    }
    write_summary(store, summary)
    write_card(store, config, summary)
    if exporter is not None and not isinstance(failure, Interrupted):
        failure = push_at_end(exporter, config, store, summary, failure)
    if failure is not None:
        failure.summary = summary
        raise failure
    return RunResult(summary, store)


def check_store(config: Config, data: Any, overwrite: bool) -> tuple[RunStore, dict[str, Any]]:
    """The output folder, checked against the config's fingerprint (ConfigError when it holds a run
    made with other settings); nothing is written yet."""
    store = RunStore(config.output.dir or tempfile.mkdtemp(prefix="capstream-"), config.dataset.split)
    fingerprint = config.fingerprint()
    if data is not None:
        fingerprint["dataset.fingerprint"] = getattr(data, "_fingerprint", None)
    store.check(fingerprint, config.run.chunk_size, overwrite=overwrite)
    return store, fingerprint


def open_store(store: RunStore, config: Config, fingerprint: dict[str, Any], overwrite: bool) -> bool:
    """Start or resume the run in the folder, with its config saved (without secrets); whether an
    earlier run into it is being resumed."""
    resuming = store.manifest_path.exists() and not overwrite
    store.open(fingerprint, config.run.chunk_size, overwrite=overwrite)
    atomic_write_json(store.state / "config.json", config.redacted())
    return resuming


def _meter_costs(config: Config, store: RunStore, runner: Runner) -> CostMeter:
    """The live cost of every run into the folder; with ``run.max_cost_usd``, checked before each request."""
    meter = CostMeter(Prices.of(config.model), runner.stats, before=store.paid_tokens())
    if config.run.max_cost_usd is not None:
        runner.before_send = BudgetGuard(meter, config.run.max_cost_usd, str(store.dir))
    return meter


def _cost_fields(meter: CostMeter, config: Config) -> dict[str, Any]:
    """What every run into this folder paid for (the results log), and what this one did."""
    return {
        "paid_input_tokens": meter.tokens()[0],
        "paid_output_tokens": meter.tokens()[1],
        "cost_usd": _rounded(meter.total_usd()),
        "cost_usd_this_run": _rounded(meter.this_run_usd()),
        "prices": meter.prices.as_dict(),
        "max_cost_usd": config.run.max_cost_usd,
    }


def run_dates(store: RunStore, started: float, *, resuming: bool, rerun_of_finished: bool) -> dict[str, str | None]:
    """A resumed run keeps the first run's start; a finished run run again keeps its dates (and so its card)."""
    finished = None
    if store.complete:
        finished = (_previous(store, "finished") if rerun_of_finished else None) or _iso(time.time())
    return {"started": (_previous(store, "started") if resuming else None) or _iso(started), "finished": finished}


def push_at_end(exporter: hub.HubExporter, config: Config, store: RunStore, summary: dict[str, Any],
                 failure: RunStopped | None) -> RunStopped | None:
    """The last push, after the summary so that the card pushed carries its dates and totals; a Hub
    failure becomes the run's failure and the summary says so. Returns the run's failure."""
    try:
        pushed = exporter.finish()
        summary["hub"] = {"repo": pushed.repo_id, "commit": pushed.commit, "shards": pushed.shards_on_hub}
    except hub.HubError as err:
        summary["hub"] = {"repo": config.output.push_to_hub, "error": str(err)}
        failure = failure or err
        summary["stopped"] = str(failure)
    write_summary(store, summary)
    return failure


def run_summary(config: Config, store: RunStore, stats: Stats, rows_from_log: int, started: float,
                failure: RunStopped | None) -> dict[str, Any]:
    """The summary's keys every backend reports: the folder's totals and this run's counts."""
    seconds = time.time() - started
    return {
        **store.totals(),
        "complete": store.complete,
        "rows_this_run": stats.rows,
        "rows_from_log": rows_from_log,
        "requests": stats.requests,
        "retries": stats.retries,
        "worker_requests": stats.worker_requests,
        "reused": dict(stats.reused),  # answers not bought this run: from the cache or an identical image
        "seconds": round(seconds, 3),
        "rows_per_s": round(stats.rows / max(1e-9, seconds), 2),
        "model": config.model.name,
        "endpoint": endpoint_label(config),
        "output_dir": str(store.dir),
        "stopped": str(failure) if failure else None,
    }


def _rounded(usd: float | None) -> float | None:
    return None if usd is None else round(usd, 6)


def _iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _previous(store: RunStore, key: str) -> str | None:
    """A date of the folder's previous summary: a resumed run keeps the first run's start date."""
    try:
        return json.loads((store.dir / "summary.json").read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None


def _run_async(coro, runner: Runner, handle_signals: bool):
    """Run on a fresh loop; in a thread when the caller is already inside one (notebooks)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(_with_signals(coro, runner) if handle_signals else coro)
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


async def _with_signals(coro, runner: Runner):
    """First Ctrl-C (or SIGTERM): stop taking rows and finish in-flight ones. Second: exit at once."""
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if runner.stop_requested.is_set():
            print("\ncapstream: stopping now; rerun the same command to resume", file=sys.stderr, flush=True)
            os._exit(130)
        print("\ncapstream: finishing the requests in flight and saving (Ctrl-C again to quit at once)",
              file=sys.stderr, flush=True)
        runner.request_stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    try:
        return await coro
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def caption_dataset(source: Any, config: Config | dict | str | None = None, *, llm: Any = None,
                    overwrite: bool = False, retry_errors: bool = False, show_progress: bool = True) -> datasets.Dataset:
    """Caption every image of ``source`` and return the dataset with caption and error columns.

    ``source``: a ``Dataset``, ``IterableDataset``, Hub id or local path (or None to use
    ``config.dataset.path``). ``config``: a YAML path, a dict with the YAML's structure, or a
    ``Config``. ``llm``: any LangChain chat model to use instead of ``config.model``. The output
    folder (``config.output.dir``, or a temporary one) is written as for the CLI, and a rerun into
    the same folder resumes.
    """
    result = run(config, source, llm=llm, overwrite=overwrite, retry_errors=retry_errors, show_progress=show_progress)
    return load_output(result.store)


def load_output(store: RunStore) -> datasets.Dataset:
    """The output folder's shards as one Dataset, in source order."""
    files = [str(p) for p in store.shard_paths()]
    if not files:
        raise RunStopped(f"{store.dir}: no output shards")
    return datasets.Dataset.from_parquet(files)


__all__ = ["caption_dataset", "run", "RunResult", "Interrupted", "load_output"]
