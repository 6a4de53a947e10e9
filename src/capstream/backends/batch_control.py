"""What is done to a batch run's folder from outside the run: ``capstream status`` and ``capstream
cancel``, and the checks ``setup.py`` makes before another run goes into it.

    >>> layout = OutputLayout("out/job", "train")
    >>> for f in batch_status(layout, model):          # model: None for the ledger's last look only
    ...     print(f.name, f.requests, f.state, f.batch_id)
    >>> cancel_batches(layout, model)                   # the ids of the batches cancelled
    >>> batches_in_flight(layout)                       # 0: another backend may run into the folder
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import ConfigError
from ..io.batch_ledger import BatchLedger, BatchTry
from ..io.layout import OutputLayout
from ..model.batch_api import RUNNING, BatchAPI
from .local import run_on_own_loop

if TYPE_CHECKING:
    from ..model.settings import ModelConfig


@dataclass(frozen=True)
class FileStatus:
    """One request file as ``capstream status`` shows it."""

    name: str
    requests: int
    state: str
    batch_id: str | None
    completed: int
    failed: int
    counts: dict[str, int]


def batch_status(layout: OutputLayout, model: "ModelConfig | None") -> list[FileStatus]:
    """Every request file of the folder's batch run, with its batch as the provider shows it now
    (``model``: None to show the ledger's last look only). ConfigError for a folder with none."""
    ledger = _ledger_of(layout)
    return run_on_own_loop(_status(ledger, model))


async def _status(ledger: BatchLedger, model: "ModelConfig | None") -> list[FileStatus]:
    api = BatchAPI(model, max_attempts=3, max_wait_s=5) if model is not None else None
    try:
        out = []
        for record in ledger.files:
            batch = record.batch
            if api is not None and batch is not None and not record.collected:
                batch = BatchTry.of(await api.retrieve(batch.id))
            out.append(FileStatus(record.name, record.requests, "collected" if record.collected else
                                  (batch.status if batch is not None else record.state),
                                  batch.id if batch is not None else None, batch.completed if batch else 0,
                                  batch.failed if batch else 0, record.counts))
        return out
    finally:
        if api is not None:
            await api.aclose()


def cancel_batches(layout: OutputLayout, model: "ModelConfig") -> list[str]:
    """Cancel the folder's batches still running at the provider; their ids. What they answered is
    collected by the next run, which submits the rest again."""
    ledger = _ledger_of(layout)

    async def cancel() -> list[str]:
        api = BatchAPI(model, max_attempts=3, max_wait_s=5)
        try:
            cancelled = []
            for record in ledger.open_files:
                if record.batch is not None:
                    states = [await api.retrieve(record.batch.id)]  # the ledger's last look may be old
                elif record.creating_at is not None:  # made, perhaps, by a run killed before it recorded it
                    states = await api.find(ledger.identity(record), since=record.creating_at - 3600)
                else:
                    continue
                for state in states:
                    if state.status in RUNNING:
                        await api.cancel(state.id)
                        cancelled.append(state.id)
            return cancelled
        finally:
            await api.aclose()

    return run_on_own_loop(cancel())


def _ledger_of(layout: OutputLayout) -> BatchLedger:
    ledger = BatchLedger.read(layout)
    if ledger is None:
        raise ConfigError(f"{layout.dir}: no batch run here (no {layout.batch_ledger})")
    return ledger


def batches_in_flight(layout: OutputLayout) -> int:
    """How many of the folder's batches may still be running at the provider (0 without a ledger)."""
    ledger = BatchLedger.read(layout)
    if ledger is None:
        return 0
    return sum(f.batch is not None or f.creating_at is not None for f in ledger.open_files)


def end_batch_round(layout: OutputLayout) -> None:
    """A run of another backend into a folder of a batch run (none in flight: ``setup.py`` checks):
    the request files not submitted are dropped and the round ends, so that a later batch run plans
    again what is still to do, and buys nothing this run answered."""
    ledger = BatchLedger.read(layout)
    if ledger is None or ledger.settled:
        return
    for record in ledger.open_files:
        ledger.settle(record, {"dropped": record.requests}, [])
        ledger.remove_files_of(record)
    ledger.planned(ledger.chunks or 0)


def round_unfinished(layout: OutputLayout) -> bool:
    """A batch run's round is still going in the folder: planned only in part, or files not collected."""
    ledger = BatchLedger.read(layout)
    return ledger is not None and ledger.round > 0 and not ledger.settled


__all__ = ["FileStatus", "batch_status", "cancel_batches", "batches_in_flight", "end_batch_round", "round_unfinished"]
