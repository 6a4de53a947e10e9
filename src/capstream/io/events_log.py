"""The events log: what happened while a run went, appended as it happened, for the run report.

The results log records every answer; this records what the answers do not say: each failed attempt
(its status, whether it was retried), each move of a rate limit in force (configured, announced by
the endpoint, cut after 429s, grown back), and each start and stop of a run into the folder. One
JSON line per event (its one writer is ``to_line``, its one reader ``event_of``)::

    {"e": "run", "t": 1764600000.1, "what": "started", "backend": "local", "resumed": false}
    {"e": "attempt", "t": 1764600001.2, "s": 429, "f": "transient", "n": 1, "r": true}
    {"e": "limit", "t": 1764600001.2, "l": "requests", "v": 420.0, "why": "slowed"}
    {"e": "run", "t": 1764600060.0, "what": "stopped", "detail": null}

A process appends to its own log (``events.jsonl``; a Ray actor ``events-ray-<n>.jsonl``, the
cluster's limit broker ``events-ray-broker.jsonl``). An ``EventsLog`` is the ``observer`` the
sending side takes (``model/events.py``). It never raises: a report must not stop a run, so a
write that fails is logged once and the log goes quiet.

    >>> events = EventsLog(layout.events_log())
    >>> events(RunMark("started", backend="local"))
    >>> found = read_events(layout.events_logs())
    >>> len(found.attempts), found.limits[-1].per_minute
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Union

from ..errors import RunStopped
from ..model.events import AttemptFailed, LimitChanged
from .results_log import repair_tail

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunMark:
    """A run into the folder started or stopped. ``detail``: why it stopped early (None: it
    finished, or was started)."""

    what: str  # started | stopped
    backend: str | None = None
    resumed: bool = False
    detail: str | None = None
    at: float = field(default_factory=time.time)


Event = Union[AttemptFailed, LimitChanged, RunMark]


def to_line(event: Event) -> bytes:
    if isinstance(event, AttemptFailed):
        data: dict[str, Any] = {"e": "attempt", "t": event.at, "s": event.status, "f": event.failure,
                                "n": event.attempt, "r": event.retried}
    elif isinstance(event, LimitChanged):
        data = {"e": "limit", "t": event.at, "l": event.limit, "v": event.per_minute, "why": event.reason}
    else:
        data = {"e": "run", "t": event.at, "what": event.what, "backend": event.backend, "resumed": event.resumed,
                "detail": event.detail}
    return (json.dumps(data, ensure_ascii=False) + "\n").encode()


def event_of(data: dict[str, Any]) -> Event | None:
    """The event a line holds; None for a kind this capstream does not know."""
    kind = data["e"]
    if kind == "attempt":
        return AttemptFailed(data.get("s"), data["f"], int(data["n"]), bool(data.get("r")), at=float(data["t"]))
    if kind == "limit":
        return LimitChanged(data["l"], data.get("v"), data.get("why") or "", at=float(data["t"]))
    if kind == "run":
        return RunMark(data["what"], data.get("backend"), bool(data.get("resumed")), data.get("detail"),
                       at=float(data["t"]))
    return None


class EventsLog:
    """The events log this process appends to; callable, so it is an ``observer`` itself.

    Unbuffered, one write per event (events are rare: failures and limit moves, never one per
    answer). Picklable before its first write (a Ray actor gets its own copy and opens the file in
    its own process).
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = None
        self._broken = False

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"])

    def __call__(self, event: Event) -> None:
        if self._broken:
            return
        try:
            if self._file is None:
                if self.path.exists():
                    repair_tail(self.path)  # a kill mid-line: appends start on a clean line
                self._file = open(self.path, "ab", buffering=0)
            self._file.write(to_line(event))
        except (OSError, RunStopped) as err:
            self._broken = True
            log.warning("cannot write %s (the run report will miss what follows): %s", self.path, err)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


@dataclass
class RunEvents:
    """Every event of the folder's events logs, by kind, each list in time order; ``logs``: how
    many logs there were (0: the folder was written by a capstream that kept none)."""

    attempts: list[AttemptFailed] = field(default_factory=list)
    limits: list[LimitChanged] = field(default_factory=list)
    marks: list[RunMark] = field(default_factory=list)
    logs: int = 0


def read_events(paths: Iterable[Path]) -> RunEvents:
    """The events of ``paths`` (a line cut by a kill, or of an unknown kind, is skipped)."""
    paths = list(paths)
    by_kind: dict[type, list] = {AttemptFailed: [], LimitChanged: [], RunMark: []}
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        event = event_of(json.loads(line))
                    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                        continue
                    if event is not None:
                        by_kind[type(event)].append(event)
        except OSError as err:
            raise RunStopped(f"cannot read {path}: {err.strerror or err}") from None
    for events in by_kind.values():
        events.sort(key=lambda e: e.at)
    return RunEvents(by_kind[AttemptFailed], by_kind[LimitChanged], by_kind[RunMark], len(paths))


__all__ = ["EventsLog", "RunMark", "RunEvents", "Event", "read_events", "to_line", "event_of"]
