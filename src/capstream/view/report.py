"""The run report (``view/report.html``): how the run went over time, drawn offline as SVG.

Built from what the folder records: the results log (every answer with the time it was logged, and
for answers bought from the model its latency, attempts and when it arrived; the tokens it paid), the
events log (``io/events_log.py``: failed attempts, the limits in force, starts and stops) and the
saved config (the prices). Plots are drawn by matplotlib (the ``view`` extra) into SVG files next to
the page; nothing is fetched when the page is opened. What a folder does not record (logs written
by an earlier capstream: no latency, no events) is said on the page instead of being drawn.

Time runs along the x axis as time into the run: a pause longer than ``PAUSE_S`` (a run stopped and
resumed later) is cut out and marked, so that the run's working time fills the plot.

    >>> report = write_report(view_dir, folder, logged, read_events(layout.events_logs()), errors)
"""

from __future__ import annotations

import html
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..cost.meter import usd
from ..io.events_log import RunEvents
from ..io.results_log import LogRecord
from ..row.results import error_kind
from .timeline import PAUSE_S, Plot, Timeline

if TYPE_CHECKING:
    from .folder import LoggedRecords, RowView, RunFolder



@dataclass
class ErrorCounts:
    """Error rows, rows by error kind (a row counts once per kind) and each prompt's errors by kind."""

    prompts: list[str]
    rows: int = 0
    by_kind: Counter = field(default_factory=Counter)
    by_prompt: dict[str, Counter] = field(default_factory=dict)

    def add(self, row: "RowView") -> None:
        kinds = set()
        for name, answer in row.answers.items():
            if answer.error:
                kind = error_kind(answer.error)
                kinds.add(kind)
                self.by_prompt.setdefault(name, Counter())[kind] += 1
        if row.error:
            self.rows += 1
            for kind in kinds or {error_kind(row.error)}:
                self.by_kind[kind] += 1


@dataclass
class Section:
    """One part of the page: a heading, a figure, a table of figures and notes."""

    id: str
    title: str
    plot: Plot | None = None
    notes: list[str] = field(default_factory=list)
    table: list[tuple[str, str]] = field(default_factory=list)

    def draw(self, plot: Plot | None) -> None:
        """Show ``plot`` (None: matplotlib is missing; the table and notes stand alone)."""
        self.plot = plot


def bought(records: list[LogRecord]) -> list[LogRecord]:
    """The answers bought from the model: those with a provenance, each request once (a row that
    re-used another row's identical request in flight shares its provenance)."""
    seen, found = set(), []
    for r in records:
        p = r.provenance
        if p is not None and (r.prompt, p.answered_at, p.latency_ms) not in seen:
            seen.add((r.prompt, p.answered_at, p.latency_ms))
            found.append(r)
    return found


def record_time(record: LogRecord) -> float | None:
    """When an answer came (``LogRecord.answered_at``), as a function to map over records."""
    return record.answered_at


def write_report(view: Path, folder: "RunFolder", logged: "LoggedRecords", events: RunEvents,
                 errors: ErrorCounts) -> Path:
    """Write ``view/report.html`` and its plots (``view/report/*.svg``); return the page's path."""
    plots_dir = view / "report"
    plots_dir.mkdir(exist_ok=True)
    for old in plots_dir.glob("*.svg"):
        old.unlink()
    times = [t for t in map(record_time, logged.records) if t is not None]
    times += [e.at for e in (*events.attempts, *events.limits, *events.marks)]
    timeline = Timeline(times)
    try:
        from .plots import Plotter  # matplotlib: the view extra (without it, the page has the figures, no plots)
    except ImportError:
        plotter = None
    else:
        plotter = Plotter(plots_dir, timeline)
    builder = _Report(folder, logged, events, errors, timeline, plotter)
    sections = builder.sections()
    page = view / "report.html"
    page.write_text(_html(folder, sections, plotter is not None), encoding="utf-8")
    return page


class _Report:
    def __init__(self, folder: "RunFolder", logged: "LoggedRecords", events: RunEvents, errors: ErrorCounts,
                 timeline: Timeline, plotter: Any):
        self.folder = folder
        self.logged = logged
        self.events = events
        self.errors = errors
        self.timeline = timeline
        self.plotter = plotter
        self.prompts = [p.name for p in folder.prompts]
        self.several = len(self.prompts) > 1
        self.untimed = sum(1 for r in logged.records if record_time(r) is None)
        self.bought = bought(logged.records)

    def sections(self) -> list[Section]:
        return [self._summary(), self._rate(), self._latency(), self._retries(), self._limits(), self._tokens(),
                self._errors()]

    def _draw(self, name: str, draw: str, *args: Any) -> Plot | None:
        if self.plotter is None:
            return None
        return getattr(self.plotter, draw)(name, *args)

    def _time_note(self, what: str) -> list[str]:
        if not self.untimed:
            return []
        return [(f"{self.untimed} of the {len(self.logged.records)} logged answers have no time (logged by a "
                 f"capstream that did not record it): they are not in the {what}.")]

    # -- the sections -------------------------------------------------------------------------------

    def _summary(self) -> Section:
        folder, summary, manifest = self.folder, self.folder.summary, self.folder.manifest
        rows = sum(1 for _ in self.logged.final) if self.logged.final else manifest.totals().rows
        paid_in = sum(r.input_tokens for r in self.logged.records)
        paid_out = sum(r.output_tokens for r in self.logged.records)
        cost = folder.prices.usd(paid_in, paid_out)
        status = "complete" if manifest.complete else "not complete"
        last = self.events.marks[-1] if self.events.marks else None
        if not manifest.complete and last is not None:
            status += (" (running, or killed)" if last.what == "started"
                       else f" (stopped: {last.detail})" if last.detail else " (stopped)")
        elif not manifest.complete and summary is not None and summary.stopped:
            status += f" (stopped: {summary.stopped})"
        table = [("status", status), ("model", f"{folder.config.model.name} ({folder.config.model.endpoint_label()})"),
                 ("rows with answers", f"{rows:,}"), ("error rows", f"{self.errors.rows:,}"),
                 ("shards written", f"{len(manifest.done)}" + (f" of {manifest.chunks}" if manifest.chunks else "")),
                 ("tokens paid (in / out)", f"{paid_in:,} / {paid_out:,}"),
                 ("cost", f"${usd(cost)}" if cost is not None else
                  "unknown: no price for this model (model.price_input_per_mtok, model.price_output_per_mtok)")]
        if summary is not None:
            table += [("last run", f"{summary.rows_this_run:,} rows in {summary.seconds:.1f} s "
                                   f"({summary.rows_per_s:.1f} rows/s), {summary.requests:,} requests, "
                                   f"{summary.retries:,} retries, backend {summary.backend}"),
                      ("started / finished", f"{summary.started or '?'} / {summary.finished or '-'}")]
        notes = []
        if self.timeline.pauses:
            notes.append(f"The run paused {len(self.timeline.pauses)} time(s) (stopped and resumed, or waiting "
                         f"longer than {PAUSE_S:.0f} s): the pauses are cut from the time axis and marked.")
        return Section("summary", "Summary", table=table, notes=notes)

    def _rate(self) -> Section:
        finished: list[float] = []
        for by_prompt in self.logged.final.values():
            times = [record_time(r) for r in by_prompt.values()]
            if times and None not in times:
                finished.append(max(times))
        per_prompt = {}
        if self.several:
            for name in self.prompts:
                per_prompt[name] = [t for t in (record_time(r) for r in self.logged.records if r.prompt == name)
                                    if t is not None]
        section = Section("rate", "Rows per second")
        section.notes.extend(self._time_note("rate"))
        if finished:
            section.draw(self._draw("rate", "rate", finished, per_prompt))
            span = max(self.timeline.span, 1e-9)
            section.table.append(("mean over the run's working time", f"{len(finished) / span:.2f} rows/s"))
        else:
            section.notes.append("No row with a recorded time yet.")
        return section

    def _latency(self) -> Section:
        by_prompt: dict[str, list[float]] = {}
        for r in self.bought:
            if r.provenance.latency_ms is not None:
                by_prompt.setdefault(r.prompt, []).append(float(r.provenance.latency_ms))
        by_prompt = {name: by_prompt[name] for name in self.prompts if name in by_prompt}  # in the config's order
        section = Section("latency", "Latency of answered requests")
        if not by_prompt:
            section.notes.append("Not recorded: no answer in the results log carries its latency (answers logged "
                                 "by an earlier capstream, or none bought from the model yet).")
            return section
        for name, values in by_prompt.items():
            values.sort()
            label = f"{name}: " if self.several else ""
            section.table.append((f"{label}p50 / p90 / p99 / max",
                                  " / ".join(f"{_quantile(values, q):,.0f} ms" for q in (0.5, 0.9, 0.99, 1.0))
                                  + f" ({len(values):,} answers)"))
        known = sum(len(v) for v in by_prompt.values())
        if known < len(self.logged.records):
            section.notes.append(f"{len(self.logged.records) - known:,} logged answers have no latency of their "
                                 "own: error rows without an answer, answers re-used from the cache or from an "
                                 "identical request, or logged by an earlier capstream.")
        section.draw(self._draw("latency", "latency", by_prompt))
        return section

    def _retries(self) -> Section:
        section = Section("retries", "Retries and 429s over time")
        if self.several:  # the events do not name the prompt; each answer says how many attempts it took
            needed = Counter()
            for r in self.bought:
                needed[r.prompt] += max(0, (r.provenance.attempts or 1) - 1)
            section.table.extend((f"prompt {name}: retries its answers needed", f"{needed[name]:,}")
                                 for name in self.prompts)
        attempts = self.events.attempts
        if self.events.logs:
            retried = [a for a in attempts if a.retried]
            section.table.extend([("attempts retried", f"{len(retried):,}"),
                              ("of them 429 (rate limited)", f"{sum(1 for a in retried if a.status == 429):,}"),
                              ("attempts failed and not retried", f"{len(attempts) - len(retried):,}")])
            statuses = Counter("timeout or connection" if a.status is None else f"HTTP {a.status}" for a in attempts)
            if statuses:
                by_status = ", ".join(f"{k}: {v:,}" for k, v in statuses.most_common())
                section.table.append(("failed attempts by status", by_status))
            if attempts:
                section.draw(self._draw("retries", "retries", attempts))
            else:
                section.notes.append("No attempt failed: no retries, no 429s.")
            return section
        with_attempts = [(record_time(r), r.provenance.attempts) for r in self.bought if r.provenance.attempts]
        if with_attempts:
            section.notes.append("This folder has no events log (written by an earlier capstream): the retries "
                                 "shown are those the answers needed, at the time each answer came; 429s and "
                                 "failures that were never answered are not known.")
            retries = [(t, n - 1) for t, n in with_attempts if t is not None]
            section.draw(self._draw("retries", "retries_of_answers", retries))
        else:
            section.notes.append("Not recorded: this folder has no events log and its answers carry no attempt "
                                 "counts (written by an earlier capstream).")
        return section

    def _limits(self) -> Section:
        section = Section("limits", "The rate limit in force over time")
        if not self.events.logs:
            section.notes.append("Not recorded: this folder has no events log (written by an earlier capstream).")
            return section
        answers = [t for t in map(record_time, self.bought) if t is not None]
        limits = self.events.limits
        if not limits:
            section.notes.append("No limit was in force: none configured (limits.requests_per_minute, "
                                 "limits.tokens_per_minute) and none announced by the endpoint's headers.")
        else:
            moves = Counter(e.reason for e in limits if e.reason != "configured")
            changes = ", ".join(f"{reason}: {n}" for reason, n in moves.most_common())
            section.table.append(("changes", changes or "none"))
            for kind in ("requests", "tokens"):
                last = [e for e in limits if e.limit == kind]
                if last:
                    section.table.append((f"{kind} per minute, at the end", f"{last[-1].per_minute:,.0f}"))
        if answers or limits:
            section.draw(self._draw("limits", "limits", limits, answers))
        return section

    def _tokens(self) -> Section:
        section = Section("tokens", "Tokens and cost over time")
        section.notes.extend(self._time_note("plot"))
        prices = self.folder.prices
        timed = [(t, r) for r in self.logged.records if (t := record_time(r)) is not None]
        if not timed:
            section.notes.append("No answer with a recorded time yet.")
            return section
        if prices.input_per_mtok is None or prices.output_per_mtok is None:
            section.notes.append("The cost is not drawn: this model's price is unknown (set model.price_input_per_mtok "
                                 "and model.price_output_per_mtok).")
        else:
            section.table.append(("prices", f"${prices.input_per_mtok:g} in / ${prices.output_per_mtok:g} out per "
                                            f"million tokens ({prices.source})"))
        section.draw(self._draw("tokens", "tokens", timed, prices, self.prompts if self.several else []))
        return section

    def _errors(self) -> Section:
        section = Section("errors", "Errors by kind")
        if not self.errors.rows:
            section.notes.append("No error rows.")
            return section
        for kind, n in self.errors.by_kind.most_common():
            section.table.append((kind, f"{n:,} rows"))
        if self.several:
            for name in self.prompts:
                counts = self.errors.by_prompt.get(name, Counter())
                kinds = ", ".join(f"{k}: {v:,}" for k, v in counts.most_common())
                section.table.append((f"prompt {name}", kinds or "none"))
        section.draw(self._draw("errors", "errors", self.errors, self.prompts if self.several else []))
        return section


def _quantile(values: list[float], q: float) -> float:
    """``q`` quantile of sorted ``values`` (nearest rank)."""
    return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]


def _html(folder: "RunFolder", sections: list[Section], plotted: bool) -> str:
    title = html.escape(folder.layout.dir.resolve().name)
    parts = [f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}: run report</title><link rel="stylesheet" href="assets/style.css"></head>
<body class="report"><header><h1>{title}: run report</h1><nav><a href="index.html">gallery</a></nav></header><main>"""]
    if not plotted:
        parts.append('<p class="note">The plots need matplotlib: <code>pip install "capstream[view]"</code>, then '
                     'run <code>capstream view</code> again. The figures below are from the logs.</p>')
    for section in sections:
        parts.append(f'<section id="{section.id}"><h2>{html.escape(section.title)}</h2>')
        if section.plot is not None:
            parts.append(f'<figure><img class="plot" src="report/{section.plot.name}.svg" '
                         f'alt="{html.escape(section.plot.title)}"><figcaption>{html.escape(section.plot.caption)}'
                         f'</figcaption></figure>')
        if section.table:
            rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in section.table)
            parts.append(f"<table>{rows}</table>")
        for note in section.notes:
            parts.append(f'<p class="note">{html.escape(note)}</p>')
        parts.append("</section>")
    parts.append("</main></body></html>\n")
    return "\n".join(parts)


__all__ = ["write_report", "ErrorCounts", "record_time"]
