"""Money spent by a run, live: the progress bar's figures, the summary's cost, ``run.max_cost_usd``.

Spending is counted from the servers' own usage figures (summed in ``model.sending.Usage``) at the
prices ``pricing.prices`` gives (config, else the table). What earlier runs into the same ``output.dir`` paid is read once from its results log
(``RunStore.paid_tokens``), so the figures and the budget cover every run into the folder since it
was created (or last ``--overwrite``): a rerun never gets a fresh budget by accident.

    >>> meter = CostMeter(Prices.of(config.model), usage, before=store.paid_tokens())
    >>> meter.total_usd(), meter.projected_usd(rows_done=120, total_rows=1000)
    >>> guard = BudgetGuard(meter, config.run.max_cost_usd, "out/x")
    >>> guard()   # before each request: raises BudgetReached once the budget is spent
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import BudgetReached
from .pricing import cost_usd, prices

if TYPE_CHECKING:
    from ..model.sending import Usage
    from ..model.settings import ModelConfig


@dataclass(frozen=True)
class Prices:
    """USD per million input / output tokens (None: unknown) and where they come from; ``batch``:
    the Batch API's prices (``run.backend: batch``)."""

    input_per_mtok: float | None
    output_per_mtok: float | None
    source: str  # "config", "table:<date>", "config+table:<date>", "mock", "unknown"
    batch: bool = False

    @classmethod
    def of(cls, model: "ModelConfig", *, batch: bool = False) -> "Prices":
        return cls(*prices(model, batch=batch), batch=batch)

    def usd(self, input_tokens: int, output_tokens: int) -> float | None:
        return cost_usd(input_tokens, output_tokens, self.input_per_mtok, self.output_per_mtok)

    def as_dict(self) -> dict[str, Any]:
        data = {"input_per_mtok": self.input_per_mtok, "output_per_mtok": self.output_per_mtok, "source": self.source}
        if self.batch:  # only where it says something: summaries of online runs keep their keys
            data["batch"] = True
        return data


class CostMeter:
    """USD spent: ``before`` (input, output tokens paid by earlier runs) plus this run's ``usage``."""

    def __init__(self, prices: Prices, usage: "Usage", before: tuple[int, int] = (0, 0)):
        self.prices = prices
        self.usage = usage
        self.before = before

    def tokens(self) -> tuple[int, int]:
        """Input and output tokens paid for, all runs."""
        return self.before[0] + self.usage.input_tokens, self.before[1] + self.usage.output_tokens

    def this_run_usd(self) -> float | None:
        return self.prices.usd(self.usage.input_tokens, self.usage.output_tokens)

    def total_usd(self) -> float | None:
        return self.prices.usd(*self.tokens())

    def projected_usd(self, rows_done: int, total_rows: int | None) -> float | None:
        """Spent / rows done x rows: the whole dataset's cost at the rate so far (None: not known yet)."""
        spent = self.total_usd()
        if spent is None or not total_rows or rows_done <= 0:
            return None
        return spent / rows_done * total_rows


class BudgetGuard:
    """Called before every request is sent (``Sender.before_send``): raises ``BudgetReached``
    once the money spent, all runs into the folder, reaches ``max_usd``.

    Checking before each send (not after each answer) means a run whose remaining rows all have
    logged answers still finishes, and a rerun with the same budget sends nothing. Requests already in
    flight when the budget is reached finish and are paid: at most ``limits.max_concurrency`` of them.
    """

    def __init__(self, meter: CostMeter, max_usd: float, where: str):
        if meter.prices.input_per_mtok is None or meter.prices.output_per_mtok is None:
            raise ValueError("a budget needs known prices")  # check_cost_settings refuses such configs
        self.meter = meter
        self.max_usd = max_usd
        self.where = where

    def __call__(self) -> None:
        spent = self.meter.total_usd() or 0.0
        if spent >= self.max_usd:
            raise BudgetReached(
                f"run.max_cost_usd reached: ${usd(spent)} spent into {self.where} (all runs; budget "
                f"${usd(self.max_usd)}); no new request was sent. Raise run.max_cost_usd "
                f"(e.g. --set run.max_cost_usd={self.max_usd * 2:g}) and rerun to resume: answers "
                "received are kept and not paid again")


def usd(amount: float) -> str:
    """``1,234.57`` above a dollar, ``0.0123`` below (small runs cost fractions of a cent)."""
    return f"{amount:,.2f}" if amount >= 1 else f"{amount:.4f}"
