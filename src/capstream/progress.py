"""The progress bar on stderr and the end-of-run report."""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm

from .captioner import RowResult, Stats


class ProgressBar:
    """A tqdm bar over rows with ok / error / token counts; call it with each RowResult."""

    def __init__(self, total: int | None, stats: Stats, *, enabled: bool = True, initial: int = 0):
        self.stats = stats
        self.bar = tqdm(total=total, initial=initial, unit="row", file=sys.stderr, disable=not enabled,
                        dynamic_ncols=True, smoothing=0.1)

    def __call__(self, result: RowResult) -> None:
        self.bar.update(1)
        s = self.stats
        self.bar.set_postfix_str(
            f"ok={s.ok} err={sum(s.errors.values())} tok={s.input_tokens}+{s.output_tokens}", refresh=False
        )

    def close(self) -> None:
        self.bar.close()


def format_summary(summary: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    errors = summary.get("errors") or {}
    lines = [
        f"rows: {summary['rows']}  captioned: {summary['ok']}  errors: {sum(errors.values())}"
        + (f" ({', '.join(f'{k}: {v}' for k, v in sorted(errors.items()))})" if errors else ""),
        f"this run: {summary['rows_this_run']} rows in {summary['seconds']:.1f}s "
        f"({summary['rows_per_s']:.1f} rows/s), {summary['requests']} requests, {summary['retries']} retries, "
        f"tokens in/out {summary['input_tokens']}/{summary['output_tokens']} (all runs)",
    ]
    if summary.get("output_dir"):
        lines.append(f"output: {summary['output_dir']}")
    return "\n".join(lines)
