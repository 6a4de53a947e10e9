"""The report's time axis: unix times onto a run's working time, pauses cut; and what a figure is.

A run stopped and resumed a day later would leave its plots a thin line at each end of a long
empty axis: a gap longer than ``PAUSE_S`` in which nothing happened is cut to ``PAUSE_SHOWN_S``,
and marked on the plots.

    >>> timeline = Timeline([t0, t0 + 10, t0 + 3600, t0 + 3610])
    >>> timeline.at(t0 + 3600), timeline.span
    (12.0, 22.0)
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Iterable

PAUSE_S = 120.0  # a gap longer than this with nothing happening is a pause: cut from the time axis
PAUSE_SHOWN_S = 2.0  # what is left of a pause on the axis
TARGET_BINS = 80
NICE_BINS_S = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200,
               21600, 86400)
COLOURS = ("#1f6feb", "#d2691e", "#2e8b57", "#8e44ad", "#c0392b", "#7f8c8d")


class Timeline:
    """Unix times onto the run's working time (pauses cut), in seconds from its first event."""

    def __init__(self, times: Iterable[float]):
        times = sorted(times)
        self.start = times[0] if times else 0.0
        self.pauses: list[tuple[float, float]] = []  # (unix time the pause ended, seconds cut up to there)
        cut = 0.0
        for before, after in zip(times, times[1:]):
            if after - before > PAUSE_S:
                cut += after - before - PAUSE_SHOWN_S
                self.pauses.append((after, cut))
        self.ends = [end for end, _ in self.pauses]
        self.span = self.at(times[-1]) if times else 0.0

    def at(self, t: float) -> float:
        i = bisect.bisect_right(self.ends, t)
        return t - self.start - (self.pauses[i - 1][1] if i else 0.0)

    def resumptions(self) -> list[float]:
        """Where on the axis each pause was cut."""
        return [self.at(end) for end, _ in self.pauses]

    def bin_s(self) -> float:
        wanted = max(self.span, 0.1) / TARGET_BINS
        return float(next((b for b in NICE_BINS_S if b >= wanted), NICE_BINS_S[-1]))


@dataclass(frozen=True)
class Plot:
    """One figure of the report: a file under ``report/`` and what it shows."""

    name: str
    title: str
    caption: str


__all__ = ["Timeline", "Plot", "PAUSE_S", "COLOURS"]
