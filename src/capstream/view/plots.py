"""The report's figures, drawn by matplotlib into SVG files (the ``view`` extra).

Each method draws one figure from data ``report.py`` gathered and returns its ``Plot``; every
plotted series carries an SVG id starting with ``series-`` (the browser tests look for them). No
global state is touched: figures are ``matplotlib.figure.Figure`` objects (no pyplot), drawn inside
an ``rc_context`` that makes the SVG the same for the same data.

    >>> plotter = Plotter(view / "report", timeline)
    >>> plotter.rate("rate", finished_times, {})
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from .timeline import COLOURS, Plot, Timeline

if TYPE_CHECKING:
    from ..cost.meter import Prices
    from ..io.results_log import LogRecord
    from ..model.events import AttemptFailed, LimitChanged
    from .report import ErrorCounts

_PROMPT_COLOURS = (COLOURS[3], COLOURS[1], COLOURS[5], COLOURS[2])  # none of the totals' colours
MAX_POINTS = 2000  # a cumulative line is drawn through at most this many of its points (the SVG stays small)

_STYLE = {"svg.hashsalt": "capstream", "svg.fonttype": "none", "font.size": 9, "axes.spines.top": False,
          "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3}


class Plotter:
    """Draws the report's figures into ``folder`` along ``timeline``'s time axis."""

    def __init__(self, folder: Path, timeline: Timeline):
        self.folder = folder
        self.timeline = timeline
        span = timeline.span
        self.unit, self.scale = ("h", 3600.0) if span > 7200 else ("min", 60.0) if span > 120 else ("s", 1.0)

    # -- helpers -------------------------------------------------------------------------------------

    def _figure(self, height: float = 3.2) -> tuple[Figure, Any]:
        figure = Figure(figsize=(9, height), layout="constrained")
        return figure, figure.subplots()

    def _save(self, figure: Figure, name: str, title: str, caption: str) -> Plot:
        figure.savefig(self.folder / f"{name}.svg", format="svg", metadata={"Date": None})
        return Plot(name, title, caption)

    def _x(self, times: list[float]) -> np.ndarray:
        return np.array([self.timeline.at(t) for t in times]) / self.scale

    def _binned(self, times: list[float], weights: list[float] | None = None) -> tuple[np.ndarray, np.ndarray, float]:
        """(bin edges on the axis, totals per bin, bin seconds)."""
        width = self.timeline.bin_s()
        edges = np.arange(0.0, max(self.timeline.span, width) + 1.5 * width, width)
        at = np.array([self.timeline.at(t) for t in times]) if times else np.zeros(0)
        totals, _ = np.histogram(at, bins=edges, weights=weights)
        return edges / self.scale, totals, width

    def _time_axis(self, ax: Any) -> None:
        ax.set_xlabel(f"time into the run ({self.unit})")
        ax.set_xlim(0, max(self.timeline.span / self.scale, 1e-9))
        for i, at in enumerate(self.timeline.resumptions()):
            ax.axvline(at / self.scale, color="#888", linestyle=":", linewidth=1, label="pause cut" if i == 0 else None)

    # -- the figures ---------------------------------------------------------------------------------

    def rate(self, name: str, finished: list[float], per_prompt: dict[str, list[float]]) -> Plot:
        with matplotlib.rc_context(_STYLE):
            figure, ax = self._figure()
            edges, counts, width = self._binned(finished)
            ax.stairs(counts / width, edges, color=COLOURS[0], linewidth=1.5, label="rows done",
                      gid="series-rows")
            for i, (prompt, times) in enumerate(per_prompt.items()):
                edges, counts, width = self._binned(times)
                ax.stairs(counts / width, edges, color=COLOURS[(i + 1) % len(COLOURS)], linestyle="--",
                          linewidth=1, label=f"answers of {prompt}", gid=f"series-answers-{i}")
            ax.set_ylabel("per second")
            ax.set_ylim(bottom=0)
            self._time_axis(ax)
            ax.legend(loc="upper right")
            return self._save(figure, name, "Rows per second over time",
                              f"Rows done per second, in bins of {width:g} s" +
                              (" (dashed: each prompt's answers per second)" if per_prompt else "") + ".")

    def latency(self, name: str, by_prompt: dict[str, list[float]]) -> Plot:
        with matplotlib.rc_context(_STYLE):
            figure, ax = self._figure()
            every = np.concatenate([np.array(v) for v in by_prompt.values()])
            low, high = max(1.0, float(every.min())), max(2.0, float(every.max()))
            logarithmic = high / low > 30
            bins = np.geomspace(low, high * 1.001, 40) if logarithmic else np.linspace(0, high * 1.001, 40)
            for i, (prompt, values) in enumerate(by_prompt.items()):
                _, _, patches = ax.hist(values, bins=bins, histtype="step", linewidth=1.5,
                                        color=COLOURS[i % len(COLOURS)], label=prompt if len(by_prompt) > 1 else None)
                for j, patch in enumerate(patches):
                    patch.set_gid(f"series-latency-{i}-{j}")
            if logarithmic:
                ax.set_xscale("log")
            ax.set_xlabel("latency of the answering attempt (ms)")
            ax.set_ylabel("answers")
            if len(by_prompt) > 1:
                ax.legend()
            return self._save(figure, name, "Latency distribution",
                              "How long the answering attempt of each request took (the model's time plus the "
                              "network's).")

    def retries(self, name: str, attempts: list["AttemptFailed"]) -> Plot:
        with matplotlib.rc_context(_STYLE):
            figure, ax = self._figure()
            groups = [("retried after a 429", lambda a: a.retried and a.status == 429, COLOURS[4]),
                      ("retried after another failure", lambda a: a.retried and a.status != 429, COLOURS[1]),
                      ("failed, not retried", lambda a: not a.retried, COLOURS[5])]
            bottom = None
            width = self.timeline.bin_s()
            for i, (label, chosen, colour) in enumerate(groups):
                edges, counts, width = self._binned([a.at for a in attempts if chosen(a)])
                if not counts.any():
                    continue
                bars = ax.bar(edges[:-1], counts, width=width / self.scale, align="edge", bottom=bottom,
                              color=colour, label=label)
                for j, bar in enumerate(bars):
                    bar.set_gid(f"series-retries-{i}-{j}")
                bottom = counts if bottom is None else bottom + counts
            ax.set_ylabel(f"attempts per {width:g} s")
            self._time_axis(ax)
            ax.legend(loc="upper right")
            return self._save(figure, name, "Retries and 429s over time",
                              f"Failed attempts in bins of {width:g} s: retried after a 429, retried after another "
                              "transient failure, or not retried (the row's own error, or the last attempt).")

    def retries_of_answers(self, name: str, retries: list[tuple[float, int]]) -> Plot:
        with matplotlib.rc_context(_STYLE):
            figure, ax = self._figure()
            edges, counts, width = self._binned([t for t, _ in retries], [n for _, n in retries])
            bars = ax.bar(edges[:-1], counts, width=width / self.scale, align="edge", color=COLOURS[1],
                          label="retries")
            for j, bar in enumerate(bars):
                bar.set_gid(f"series-retries-{j}")
            ax.set_ylabel(f"retries per {width:g} s")
            self._time_axis(ax)
            return self._save(figure, name, "Retries over time",
                              "Attempts beyond the first that answered requests needed, at the time of the answer.")

    def limits(self, name: str, limits: list["LimitChanged"], answers: list[float]) -> Plot:
        with matplotlib.rc_context(_STYLE):
            figure, ax = self._figure()
            edges, counts, width = self._binned(answers)
            ax.stairs(counts * 60.0 / width, edges, color=COLOURS[5], linewidth=1, label="answers per minute",
                      gid="series-answers")
            end = max(self.timeline.span, 1e-9) / self.scale
            axes = {"requests": ax}
            if any(e.limit == "tokens" for e in limits):
                axes["tokens"] = ax.twinx()
                axes["tokens"].set_ylabel("tokens per minute")
                axes["tokens"].grid(False)
            for i, kind in enumerate(("requests", "tokens")):
                changes = [e for e in limits if e.limit == kind]
                if not changes:
                    continue
                xs = list(self._x([e.at for e in changes])) + [end]
                ys = [e.per_minute for e in changes] + [changes[-1].per_minute]
                line, = axes[kind].step(xs, ys, where="post", color=COLOURS[i * 3], linewidth=2,
                                        label=f"{kind} per minute in force")
                line.set_gid(f"series-limit-{kind}")
            ax.set_ylabel("requests per minute")
            ax.set_ylim(bottom=0)
            self._time_axis(ax)
            handles = [h for a in axes.values() for h in a.get_legend_handles_labels()[0]]
            ax.legend(handles=handles, loc="lower right")
            return self._save(figure, name, "The rate limit in force over time",
                              "The limit the run held itself to (configured, lowered to what the endpoint announced, "
                              "cut after 429s, grown back while requests succeed), and the answers per minute it got.")

    def tokens(self, name: str, timed: list[tuple[float, "LogRecord"]], prices: "Prices", prompts: list[str]) -> Plot:
        """Tokens paid so far, and below them what they cost (each prompt's share dashed when several)."""
        priced = prices.input_per_mtok is not None and prices.output_per_mtok is not None
        with matplotlib.rc_context(_STYLE):
            figure = Figure(figsize=(9, 5.2 if priced else 3.2), layout="constrained")
            axes = figure.subplots(2 if priced else 1, 1, sharex=True, squeeze=False)[:, 0]
            timed = sorted(timed, key=lambda item: item[0])
            series = [("", timed)] + [(prompt, [(t, r) for t, r in timed if r.prompt == prompt]) for prompt in prompts]
            for i, (prompt, records) in enumerate(series):
                keep = _thinned(len(records))
                x = self._x([t for t, _ in records])[keep]
                inputs = np.cumsum([r.input_tokens for _, r in records])[keep]
                outputs = np.cumsum([r.output_tokens for _, r in records])[keep]
                if not prompt:
                    for label, values, colour, gid in (("input tokens", inputs, COLOURS[0], "series-input"),
                                                       ("output tokens", outputs, COLOURS[2], "series-output")):
                        axes[0].plot(x, values, color=colour, label=label, gid=gid)
                else:
                    axes[0].plot(x, inputs + outputs, color=_PROMPT_COLOURS[(i - 1) % 4], linestyle="--",
                                 linewidth=1, label=f"{prompt}: all tokens", gid=f"series-tokens-{i}")
                if priced:
                    dollars = (inputs * prices.input_per_mtok + outputs * prices.output_per_mtok) / 1e6
                    axes[1].plot(x, dollars, color=COLOURS[4] if not prompt else _PROMPT_COLOURS[(i - 1) % 4],
                                 linewidth=2 if not prompt else 1, linestyle="-" if not prompt else "--",
                                 label="cost" if not prompt else f"{prompt}: cost",
                                 gid="series-cost" if not prompt else f"series-cost-{i}")
            axes[0].set_ylabel("tokens paid (cumulative)")
            if priced:
                axes[1].set_ylabel("USD (cumulative)")
            for ax in axes:
                ax.set_ylim(bottom=0)
                ax.legend(loc="upper left")
                self._time_axis(ax)
            if priced:
                axes[0].set_xlabel("")
            return self._save(figure, name, "Tokens and cost over time",
                              "Tokens paid so far (the servers' own counts, every answer bought, re-asked ones too)"
                              + (" and what they cost." if priced else "."))

    def errors(self, name: str, errors: "ErrorCounts", prompts: list[str]) -> Plot:
        with matplotlib.rc_context(_STYLE):
            kinds = [k for k, _ in errors.by_kind.most_common()]
            figure, ax = self._figure(height=max(1.6, 0.5 + 0.4 * len(kinds) * max(1, len(prompts))))
            y = np.arange(len(kinds))
            series = ([(p, errors.by_prompt.get(p, Counter())) for p in prompts] if prompts
                      else [("rows", errors.by_kind)])
            height = 0.8 / len(series)
            for i, (label, counts) in enumerate(series):
                bars = ax.barh(y + i * height, [counts.get(k, 0) for k in kinds], height=height,
                               color=COLOURS[i % len(COLOURS)], label=label)
                for j, bar in enumerate(bars):
                    bar.set_gid(f"series-errors-{i}-{j}")
            ax.set_yticks(y + height * (len(series) - 1) / 2, kinds)
            ax.invert_yaxis()
            ax.set_xlabel("rows" if not prompts else "answers")
            if prompts:
                ax.legend()
            return self._save(figure, name, "Errors by kind",
                              "Error rows by kind" + (", per prompt." if prompts else "."))


def _thinned(n: int) -> np.ndarray:
    """Indices of at most MAX_POINTS of ``n`` points, evenly spread, the first and the last kept."""
    return np.unique(np.linspace(0, n - 1, min(n, MAX_POINTS)).round().astype(int)) if n else np.zeros(0, int)


__all__ = ["Plotter"]
