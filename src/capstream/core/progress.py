"""The progress bar on stderr and the end-of-run report.

The bar shows rows, ok / error counts, tokens, and with a known price the USD spent (all runs into
the folder) and the projected total (spent / rows done x rows):

    train:  12%|█▏        | 120/1000 [00:09<01:10, 12.5row/s, ok=118 err=2 tok=91800+5400 $0.0170 of ~$0.1417]
"""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

from ..cost.meter import CostMeter, usd
from ..io.summary import RunSummary
from ..row.results import RowCounts, RowResult


class ProgressBar:
    """A tqdm bar over rows; call it with each RowResult. ``rows``: this run's row counts (ok,
    errors); ``meter``: the tokens and money paid (shown when the price is known)."""

    def __init__(self, total: int | None, rows: RowCounts, meter: CostMeter, *, enabled: bool = True, initial: int = 0):
        self.rows = rows
        self.meter = meter
        self.bar = tqdm(total=total, initial=initial, unit="row", file=sys.stderr, disable=not enabled,
                        dynamic_ncols=True, smoothing=0.1)

    def __call__(self, result: RowResult) -> None:
        self.bar.update(1)
        paid = self.meter.usage
        self.bar.set_postfix_str(f"ok={self.rows.ok} err={sum(self.rows.errors.values())} "
                                 f"tok={paid.input_tokens}+{paid.output_tokens}{self.money()}", refresh=False)

    def money(self) -> str:
        """`` $spent of ~$projected`` (all runs into the folder), or nothing when the price is unknown."""
        spent = self.meter.total_usd()
        if spent is None:
            return ""
        projected = self.meter.projected_usd(self.bar.n, self.bar.total)
        return f" ${usd(spent)}" + (f" of ~${usd(projected)}" if projected is not None else "")

    def close(self) -> None:
        self.bar.close()


def format_summary(summary: RunSummary) -> str:
    """A few lines for the terminal."""
    errors = summary.errors
    lines = [
        f"rows: {summary.rows}  captioned: {summary.ok}  errors: {sum(errors.values())}"
        + (f" ({', '.join(f'{k}: {v}' for k, v in sorted(errors.items()))})" if errors else ""),
        f"this run: {summary.rows_this_run} rows in {summary.seconds:.1f}s "
        f"({summary.rows_per_s:.1f} rows/s), {summary.requests} requests, {summary.retries} retries, "
        f"tokens in/out {summary.input_tokens}/{summary.output_tokens} (all runs)",
    ]
    if summary.cost_usd is not None:
        lines.append(f"cost: ${usd(summary.cost_usd)} for {summary.paid_input_tokens}/"
                     f"{summary.paid_output_tokens} tokens paid (all runs; this run ${usd(summary.cost_usd_this_run or 0)}) "
                     f"at {_prices_text(summary.prices)}")
    if summary.output_dir:
        lines.append(f"output: {summary.output_dir}")
    return "\n".join(lines)


def _prices_text(prices: dict) -> str:
    return (f"${prices.get('input_per_mtok'):g} in / ${prices.get('output_per_mtok'):g} out per million tokens "
            f"({prices.get('source')}{', Batch API' if prices.get('batch') else ''})")
