"""The progress bar: drawn on a terminal; a plain line every few seconds anywhere else."""

from __future__ import annotations

import io

from capstream.core.progress import LINE_EVERY_S, ProgressBar
from capstream.cost.meter import CostMeter, Prices
from capstream.model.sending import Usage
from capstream.row.results import PromptAnswer, RowCounts, RowResult


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _run(stream, updates=152, seconds=32.0) -> RowCounts:
    clock = Clock()
    rows = RowCounts()
    bar = ProgressBar(1000, rows, CostMeter(Prices(0.15, 0.6, "config"), Usage()), initial=100, stream=stream,
                      clock=clock)
    for _ in range(updates):  # 152 rows over 32 s, as a real run of the issue
        clock.now += seconds / updates
        result = RowResult({"caption": PromptAnswer("x")})
        rows.add(result)
        bar(result)
    bar.close()
    return rows


def test_without_a_terminal_a_line_every_few_seconds():
    stream = io.StringIO()
    _run(stream)
    text = stream.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == int(32.0 // LINE_EVERY_S) + 1  # every LINE_EVERY_S, and the last figures at the end
    assert lines[-1].startswith("252/1000 rows (25%) [00:3") and "4.75row/s" in lines[-1] and "ok=152 err=0" in lines[-1]


def test_on_a_terminal_the_bar_is_drawn():
    stream = Terminal()
    _run(stream)
    assert "\r" in stream.getvalue() and "252/1000" in stream.getvalue()


def test_disabled_writes_nothing():
    stream = io.StringIO()
    clock = Clock()
    bar = ProgressBar(10, RowCounts(), CostMeter(Prices(None, None, "unknown"), Usage()), enabled=False, stream=stream,
                      clock=clock)
    clock.now += 60
    bar(RowResult({}))
    bar.close()
    assert stream.getvalue() == ""
