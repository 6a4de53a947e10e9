"""The one way down: a checked config turned into a run's parts, in one place.

    Config (checked when it was made: config.py)
      └─ plan_run ─▶ RunStore (the output folder, checked against the config's fingerprint)
                     input (io.source.Source, or backends.ray.RayInput)
                     RowShape (prompts, the columns they read, the output's features)
                     SessionSpec (what every caption session is made of)
                     HubExporter (output.push_to_hub)
                     RunCore + a backend (local, ray, batch)

Everything that can be checked is checked before anything is written: the key, the folder's
fingerprint, the input's columns, the prompts' placeholders. Only then is the folder opened.
No lower layer reads the config: each part gets its own sections or values here.

    >>> plan = plan_run(load_config("configs/demo.yaml"))
    >>> result = plan.core.run(plan.backend)
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .backends.batch import BatchBackend
from .backends.batch_control import batches_in_flight, end_batch_round, round_unfinished
from .backends.local import LocalBackend
from .backends.ray import RayBackend, RayInput  # Ray itself is imported only when that backend runs
from .config import Config, ResumeChanges
from .core.run import Backend, RowShape, RunCore
from .errors import ConfigError
from .io.hub import HubExporter
from .io.layout import OutputLayout
from .io.source import Source, open_source
from .io.store import RunStore
from .patches.hf_hub_clients import bound_hub_calls
from .row.cache import default_cache_dir
from .row.prompts import compile_prompts
from .row.session import SessionSpec

if TYPE_CHECKING:
    from langchain_core.language_models import BaseChatModel

log = logging.getLogger("capstream")


def session_spec(config: Config, llm: "BaseChatModel | None" = None) -> SessionSpec:
    """What every caption session of ``config`` is made of. ConfigError when the API key is unset,
    or when worker processes are asked for with a model given in code."""
    if llm is None:
        config.model.api_key()  # checks the key's variable before anything is read
    elif config.run.workers > 1 and config.run.backend == "local":
        raise ConfigError("run.workers: worker processes build the model from config.model; "
                          "with llm= given in code, use run.workers: 1")
    cache_dir = str(config.run.cache_dir or default_cache_dir()) if config.run.cache else None
    return SessionSpec(tuple(compile_prompts(config.prompt_specs(), config.output.error_column)), config.model,
                       config.image, config.limits, config.retry, processes=config.run.workers, cache_dir=cache_dir)


def default_output_dir(config: Config, fingerprint: dict[str, Any]) -> Path:
    """Where a run without ``output.dir`` writes (the Python API's default), said in the log:
    ``<run.cache_dir>/outputs/<dataset>-<hash of the fingerprint>``, so that the same call again
    resumes there instead of leaving one more folder behind. A dataset given in code without a
    fingerprint of its own (a stream) gets a folder of its own each time."""
    d = config.dataset
    named = Path(str(d.path if d.path and (d.data_files is None and d.data_dir is None) else
                     (d.data_files if isinstance(d.data_files, str) else d.data_dir or d.path or "dataset"))).stem
    named = re.sub(r"[^\w.-]+", "-", named).strip("-") or "dataset"
    if "dataset.fingerprint" in fingerprint and fingerprint["dataset.fingerprint"] is None:
        tag = uuid.uuid4().hex[:12]
    else:
        blob = json.dumps({**fingerprint, "run.chunk_size": config.run.chunk_size}, sort_keys=True, default=str)
        tag = hashlib.sha256(blob.encode()).hexdigest()[:12]
    folder = Path(config.run.cache_dir or default_cache_dir()) / "outputs" / f"{named[:40]}-{tag}"
    log.warning("output.dir is not set: the output goes to %s (the same call again resumes there)", folder)
    return folder


@dataclass
class RunPlan:
    """A run ready to go: ``plan.core.run(plan.backend)``."""

    core: RunCore
    backend: Backend


def plan_run(config: Config, data: Any = None, *, llm: "BaseChatModel | None" = None, overwrite: bool = False,
             retry_errors: bool = False, show_progress: bool = True, handle_signals: bool = False,
             started: float | None = None) -> RunPlan:
    """The run ``config`` describes, over ``data`` (a Dataset / IterableDataset given in code) or
    ``config.dataset``. ConfigError before anything is written; RunStopped when the input cannot be
    reached."""
    started = time.time() if started is None else started
    if config.run.backend in ("ray", "batch") and llm is not None:
        raise ConfigError(f"run.backend: {config.run.backend} builds the model from config.model; llm= in code "
                          "is for the local backend")
    spec = session_spec(config, llm)
    fingerprint = config.fingerprint()
    if data is not None:
        fingerprint["dataset.fingerprint"] = getattr(data, "_fingerprint", None)
    store = RunStore(OutputLayout(config.output.dir or default_output_dir(config, fingerprint), config.dataset.split))
    changes = ResumeChanges(retry_errors=retry_errors)
    store.check(fingerprint, config.run.chunk_size, overwrite=overwrite, changes=changes)  # before any download
    _check_batches_in_flight(store.layout, config.run.backend, overwrite, retry_errors)
    if data is None or config.output.push_to_hub:
        bound_hub_calls(config.output.hub_timeout_s)  # huggingface_hub's clients have no timeout
    source: Source | RayInput = (RayInput.open(config.dataset, data) if config.run.backend == "ray"
                                 else open_source(config.dataset, data, hub_timeout_s=config.output.hub_timeout_s))
    shape = RowShape.of(spec.prompts, source.features, image_column=config.dataset.image_column,
                        key_column=config.dataset.key_column, error_column=config.output.error_column,
                        base_dir=source.base_dir, metadata=config.output.metadata,
                        embedded_column=config.output.embedded_image_column if config.output.embed_images else None)
    # Everything is checked: the folder may be written now.
    resuming = store.open(fingerprint, config.run.chunk_size, overwrite=overwrite, changes=changes,
                          retry_errors=retry_errors)
    store.save_config(config.redacted())
    if config.run.backend != "batch":
        end_batch_round(store.layout)
    exporter = (HubExporter.from_config(store.dir, config.output, config.dataset.split)
                if config.output.push_to_hub else None)
    core = RunCore(config, store, shape, retry_errors=retry_errors, exporter=exporter, total_rows=source.num_rows,
                   show_progress=show_progress, started=started, resuming=resuming)
    run = config.run
    if run.backend == "batch":
        backend: Backend = BatchBackend(source, spec, config.batch, chunk_size=run.chunk_size,
                                        prep_threads=run.prep_threads, handle_signals=handle_signals)
    elif run.backend == "ray":
        backend = RayBackend(source, spec, chunk_size=run.chunk_size, window_chunks=run.window_chunks,
                                      workers=run.workers, prep_threads=run.prep_threads, ray_address=run.ray_address)
    else:
        backend = LocalBackend(source, spec, llm=llm, chunk_size=run.chunk_size, window_chunks=run.window_chunks,
                               prep_threads=run.prep_threads, handle_signals=handle_signals)
    return RunPlan(core, backend)


def _check_batches_in_flight(layout: OutputLayout, backend: str, overwrite: bool, retry_errors: bool) -> None:
    """ConfigError when batches of the folder may still be running at the provider and the run would
    not collect them (another backend would buy their rows again; --overwrite would drop them), or
    when --retry-errors comes before a batch round is over (the round's rows are not all answered)."""
    if backend == "batch" and retry_errors and not overwrite and round_unfinished(layout):
        raise ConfigError(f"output.dir {str(layout.dir)!r}: the batch run is not finished (capstream status "
                          f"{layout.dir}): run it again without --retry-errors to collect its batches first")
    if backend == "batch" and not overwrite:
        return
    running = batches_in_flight(layout)
    if running:
        raise ConfigError(
            f"output.dir {str(layout.dir)!r} has {running} batch(es) at the provider not collected yet "
            f"(capstream status {layout.dir}): run with run.backend: batch to collect them, or cancel them first "
            f"(capstream cancel {layout.dir})")


__all__ = ["plan_run", "session_spec", "default_output_dir", "RunPlan"]
