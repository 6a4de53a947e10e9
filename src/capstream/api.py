"""The Python entry point: ``caption_dataset(source, config=..., llm=...)``.

    >>> from capstream import caption_dataset
    >>> ds = caption_dataset("user/my-images", config={"model": {"provider": "mock"}, "output": {"dir": "out"}})
    >>> ds[0]["caption"], ds[0]["error"]

``run()`` is the same work returning the run's summary instead of the dataset; the CLI uses it.
``batch_status()`` and ``cancel_batches()`` look at and cancel a batch run's batches (``run.backend: batch``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import datasets

from .backends.batch_control import FileStatus
from .backends.batch_control import batch_status as _batch_status
from .backends.batch_control import cancel_batches as _cancel_batches
from .config import Config, config_from_dict, resolve_config
from .core.run import RunResult
from .errors import ConfigError, Interrupted, RunStopped
from .io.files import read_state
from .io.layout import OutputLayout
from .io.store import Manifest, RunStore
from .model.settings import ModelConfig
from .setup import plan_run


def _with_source(config: Config, source: Any) -> tuple[Config, Any]:
    """A Hub id or path given as ``source`` fills ``dataset.path``; a dataset object is used as is."""
    if isinstance(source, (str, os.PathLike)):
        dataset = config.dataset.model_copy(update={"path": str(source)})
        return config.model_copy(update={"dataset": dataset}), None
    return config, source


def run(config: Config | dict | str | None = None, source: Any = None, *, llm: Any = None, overwrite: bool = False,
        retry_errors: bool = False, show_progress: bool = True, handle_signals: bool = False) -> RunResult:
    """Caption ``source`` (or ``config.dataset``) into ``config.output.dir``; return the summary.

    Rerun into the same folder to resume. ``retry_errors`` asks again for the rows whose error is
    set and rewrites their shards; ``overwrite`` discards the folder's previous run.

    Raises ``ConfigError`` before anything is read or sent, ``RunStopped`` (``Interrupted`` for a
    stop request) when the run ends early with its state saved for a rerun; its ``summary`` says
    what was done.
    """
    started = time.time()  # the run's time includes opening the dataset
    config, data = _with_source(resolve_config(config), source)
    plan = plan_run(config, data, llm=llm, overwrite=overwrite, retry_errors=retry_errors,
                    show_progress=show_progress, handle_signals=handle_signals, started=started)
    return plan.core.run(plan.backend)


def caption_dataset(source: Any, config: Config | dict | str | None = None, *, llm: Any = None,
                    overwrite: bool = False, retry_errors: bool = False, show_progress: bool = True) -> datasets.Dataset:
    """Caption every image of ``source`` and return the dataset with caption and error columns.

    ``source``: a ``Dataset``, ``IterableDataset``, Hub id or local path (or None to use
    ``config.dataset.path``). ``config``: a YAML path, a dict with the YAML's structure, or a
    ``Config``. ``llm``: any LangChain chat model to use instead of ``config.model``. The output
    folder (``config.output.dir``; without one, a folder named after the settings under the cache
    folder, said in the log) is written as for the CLI, and a rerun into the same folder resumes.
    """
    result = run(config, source, llm=llm, overwrite=overwrite, retry_errors=retry_errors, show_progress=show_progress)
    return load_output(result.store)


def batch_status(out_dir: str | os.PathLike, *, live: bool = True) -> list[FileStatus]:
    """``capstream status OUT_DIR``: each request file of a batch run, and its batch as the provider
    shows it now (``live=False``, or without the API key: as the folder last saw it)."""
    layout, model = _batch_folder(out_dir)
    if live:
        try:
            model.api_key()
        except ConfigError:
            live = False
    return _batch_status(layout, model if live else None)


def cancel_batches(out_dir: str | os.PathLike) -> list[str]:
    """``capstream cancel OUT_DIR``: cancel the run's batches still running at the provider; their
    ids. The next ``capstream run`` collects what they answered and submits the rest again."""
    layout, model = _batch_folder(out_dir)
    model.api_key()  # ConfigError naming the variable when it is unset
    return _cancel_batches(layout, model)


def _batch_folder(out_dir: str | os.PathLike) -> tuple[OutputLayout, ModelConfig]:
    """The folder's layout and the model its run used (from its saved config, secrets never saved)."""
    layout = OutputLayout(out_dir, "train")  # the split names shards only: not read here
    saved = read_state(layout.saved_config)
    if saved is None:
        raise ConfigError(f"{out_dir}: not a capstream output folder (no {layout.saved_config})")
    return layout, config_from_dict(saved, source=str(layout.saved_config)).model


def load_output(output: RunStore | str | os.PathLike) -> datasets.Dataset:
    """The output folder's shards as one Dataset, in source order, as they are now (``output``: the
    folder, or a run's ``RunResult.store``). ``datasets.load_dataset(folder)`` does the same for the
    splits ``train``, ``validation`` and ``test`` (see docs/output.md)."""
    store = output if isinstance(output, RunStore) else RunStore(OutputLayout(output, _split_of(Path(output))))
    files = [str(p) for p in store.layout.shard_paths()]
    if not files:
        raise RunStopped(f"{store.dir}: no output shards")
    return datasets.Dataset.from_parquet(files)


def _split_of(folder: Path) -> str:
    """The split a run's folder holds, from its manifest; ConfigError when it is no run's folder."""
    manifest = Manifest.read(OutputLayout(folder, ""))
    if manifest is None or not manifest.split:
        raise ConfigError(f"{folder}: not a capstream output folder (no {OutputLayout(folder, '').manifest})")
    return manifest.split


__all__ = ["caption_dataset", "run", "RunResult", "Interrupted", "load_output", "batch_status", "cancel_batches"]
