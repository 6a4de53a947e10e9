"""The progress bar on stderr and the end-of-run report.

The bar shows rows, ok / error counts, tokens, and with a known price the USD spent (all runs into
the folder) and the projected total (spent / rows done x rows):

    train:  12%|█▏        | 120/1000 [00:09<01:10, 12.5row/s, ok=118 err=2 tok=91800+5400 $0.0170 of ~$0.1417]

When stderr is not a terminal (a log file, CI, ``nohup``; a notebook keeps tqdm's widget) the same
figures are written as a plain line every ``LINE_EVERY_S`` seconds, and once at the end, instead of
a bar redrawn many times a second.
"""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm
from tqdm.autonotebook import tqdm as _tqdm_here
from tqdm.std import tqdm as _tqdm_std

from ..cost.meter import CostMeter, usd
from ..io.summary import RunSummary
from ..row.results import RowCounts, RowResult


LINE_EVERY_S = 10.0  # without a terminal: one line this often


class ProgressBar:
    """A tqdm bar over rows; call it with each RowResult. ``rows``: this run's row counts (ok,
    errors); ``meter``: the tokens and money paid (shown when the price is known). ``stream``:
    where it writes (stderr); a stream that is no terminal gets a line every ``LINE_EVERY_S`` of
    ``clock``."""

    def __init__(self, total: int | None, rows: RowCounts, meter: CostMeter, *, enabled: bool = True, initial: int = 0,
                 stream=None, clock=time.monotonic):
        self.rows = rows
        self.meter = meter
        self.stream = stream if stream is not None else sys.stderr
        self.total, self.n, self.initial = total, initial, initial
        # A notebook draws its own widget (tqdm.auto); a terminal, the bar; anywhere else: lines.
        self.lines = enabled and _tqdm_here is _tqdm_std and not _is_terminal(self.stream)
        self.bar = tqdm(total=total, initial=initial, unit="row", file=self.stream, disable=not enabled or self.lines,
                        dynamic_ncols=True, smoothing=0.1)
        self.clock = clock
        self.started = self._last_line = clock()

    def __call__(self, result: RowResult) -> None:
        self.n += 1
        postfix = self._postfix()
        self.bar.update(1)  # tqdm draws (or, disabled, ignores) these
        self.bar.set_postfix_str(postfix, refresh=False)
        if self.lines and self.clock() - self._last_line >= LINE_EVERY_S:
            self._line(postfix)

    def _postfix(self) -> str:
        paid = self.meter.usage
        return (f"ok={self.rows.ok} err={sum(self.rows.errors.values())} "
                f"tok={paid.input_tokens}+{paid.output_tokens}{self.money()}")

    def _line(self, postfix: str) -> None:
        """One plain line of the bar's figures: ``120/1000 rows (12%) [00:09<01:10, 12.5 row/s, ok=... ]``."""
        self._last_line = now = self.clock()
        elapsed = now - self.started
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else None
        shape = ("{n_fmt}/{total_fmt} rows ({percentage:.0f}%) [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
                 if self.total else "{n_fmt} rows [{elapsed}, {rate_fmt}{postfix}]")
        self.stream.write(tqdm.format_meter(self.n, self.total, elapsed, unit="row", rate=rate, postfix=postfix,
                                            bar_format=shape, initial=self.initial) + "\n")
        self.stream.flush()

    def money(self) -> str:
        """`` $spent of ~$projected`` (all runs into the folder), or nothing when the price is unknown."""
        spent = self.meter.total_usd()
        if spent is None:
            return ""
        projected = self.meter.projected_usd(self.n, self.total)
        return f" ${usd(spent)}" + (f" of ~${usd(projected)}" if projected is not None else "")

    def close(self) -> None:
        if self.lines and self.n > self.initial:  # the last figures
            self._line(self._postfix())
        self.bar.close()


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def format_summary(summary: RunSummary, command: str | None = None) -> str:
    """A few lines for the terminal: what the folder holds, what this run did and re-used, what it
    cost, where the output is and how to load it, and what to do next (``command``: the command
    that ran, for the next one to type)."""
    errors = summary.errors
    written = (f"rows: {summary.rows} written ({summary.ok} captioned, {sum(errors.values())} with errors"
               + (f": {', '.join(f'{k}: {v}' for k, v in sorted(errors.items()))}" if errors else "") + ")")
    if summary.rows_pending:
        written += (f"; {summary.rows_pending} more answered, in chunks not written yet "
                    "(kept in the results log: the rerun writes them without asking again)")
    lines = [
        written,
        f"this run: {summary.rows_this_run} rows answered in {summary.seconds:.1f}s "
        f"({summary.rows_per_s:.1f} rows/s), {summary.requests} requests, {summary.retries} retries, "
        f"tokens in/out {summary.input_tokens}/{summary.output_tokens} (all rows written)",
    ]
    reused = _reused_text(summary)
    if reused:
        lines.append(reused)
    if summary.cost_usd is not None:
        lines.append(f"cost: ${usd(summary.cost_usd)} for {summary.paid_input_tokens}/"
                     f"{summary.paid_output_tokens} tokens paid (all runs; this run ${usd(summary.cost_usd_this_run or 0)}) "
                     f"at {_prices_text(summary.prices)}")
    if summary.output_dir:
        lines.append(f"output: {summary.output_dir}" + (f"; load it with {summary.load_with}" if summary.load_with else ""))
    if errors and summary.complete and command:
        hint = ", with a larger --set model.max_tokens=..." if "TruncatedAnswer" in errors else ""
        lines.append(f"next: `{command} --retry-errors`{hint} asks again only for the {sum(errors.values())} "
                     "rows with errors")
    return "\n".join(lines)


def _reused_text(summary: RunSummary) -> str | None:
    """What this run did not pay for: answers from the cache, from identical images, from the log."""
    parts = []
    if summary.reused.get("cache"):
        parts.append(f"{summary.reused['cache']} answers from the response cache")
    if summary.reused.get("dedup"):
        parts.append(f"{summary.reused['dedup']} from identical images")
    if summary.rows_from_log:
        parts.append(f"{summary.rows_from_log} rows answered by an earlier run into this folder")
    return f"re-used, not paid again: {', '.join(parts)}" if parts else None


def _prices_text(prices: dict) -> str:
    return (f"${prices.get('input_per_mtok'):g} in / ${prices.get('output_per_mtok'):g} out per million tokens "
            f"({prices.get('source')}{', Batch API' if prices.get('batch') else ''})")
