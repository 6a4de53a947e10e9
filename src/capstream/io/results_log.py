"""The results log: every answer, appended the moment it arrives, read back on resume.

One JSON line per row and prompt (``LogRecord``: its one writer is ``to_line``, its one reader
``from_json``; the keys ``i k p v e ti to`` are the format of every folder ever written; ``w``, when
the line was logged, and the provenance keys are optional: older logs have none). A process
appends to its own log (``ResultsLog``); every 64 MB the log is sealed into a numbered segment and
a summary of the segment (its chunks and the tokens it paid for, counted as the answers were
appended) is written next to it, last. A rerun reads only the segments holding a chunk that is not
done (``read_answers``); a segment whose summary is missing (a kill between the two steps) is
read whole, as any log is.

    >>> log = ResultsLog(layout.results_log())
    >>> log.append(LogRecord.of(chunk=0, key=17, prompt="caption", answer=answer))
    >>> found = read_answers(layout.results_logs(), skip={0, 1}, ok_only=False)
    >>> found.answers[17]["caption"].value, found.paid
"""

from __future__ import annotations

import errno
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..errors import RunStopped
from ..row.results import PromptAnswer, Provenance
from .files import atomic_write_json

SEGMENT_SUFFIX = ".summary.json"  # next to a sealed segment: its chunks and paid tokens


# How an answer was bought (row.results.Provenance), under its keys in a log line. Logs written
# before capstream recorded it have none of them: their answers have no provenance. The tokens its
# purchase counted ("pi", "po") are written only when they differ from the tokens this line paid
# ("ti", "to": an answer re-used from the cache or an identical image paid nothing).
_PROVENANCE_KEYS = {"model": "m", "finish_reason": "f", "latency_ms": "ms", "attempts": "n", "answered_at": "t",
                    "input_tokens": "pi", "output_tokens": "po"}
_PAID_KEYS = {"input_tokens": "ti", "output_tokens": "to"}


@dataclass(frozen=True)
class LogRecord:
    """One prompt's answer for one row, as logged."""

    chunk: int
    key: Any  # the row's key (dataset.key_column) or its position
    prompt: str
    value: Any
    error: str | None
    input_tokens: int = 0
    output_tokens: int = 0
    provenance: Provenance | None = None
    logged_at: float | None = None  # unix seconds; every answer has it (error rows and re-used ones too)

    @classmethod
    def of(cls, chunk: int, key: Any, prompt: str, answer: PromptAnswer) -> "LogRecord":
        return cls(chunk, key, prompt, answer.value, answer.error, answer.input_tokens, answer.output_tokens,
                   answer.provenance, time.time())

    @property
    def answered_at(self) -> float | None:
        """When the answer came: from the model, else when it was logged (None: an old log)."""
        p = self.provenance
        return p.answered_at if p is not None and p.answered_at else self.logged_at

    def to_line(self) -> bytes:
        data = {"i": self.chunk, "k": self.key, "p": self.prompt, "v": self.value, "e": self.error,
                "ti": self.input_tokens, "to": self.output_tokens}
        if self.logged_at is not None:
            data["w"] = round(self.logged_at, 3)
        if self.provenance is not None:
            data.update({key: getattr(self.provenance, name) for name, key in _PROVENANCE_KEYS.items()
                         if getattr(self.provenance, name) is not None
                         and getattr(self.provenance, name) != data.get(_PAID_KEYS.get(name))})
        return (json.dumps(data, ensure_ascii=False) + "\n").encode()

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "LogRecord":
        provenance = None
        if any(key in data for key in _PROVENANCE_KEYS.values()):
            provenance = Provenance(**{name: data.get(key, data.get(_PAID_KEYS.get(name)))
                                       for name, key in _PROVENANCE_KEYS.items()})
        return cls(data["i"], data["k"], data["p"], data.get("v"), data.get("e"), data.get("ti") or 0,
                   data.get("to") or 0, provenance, data.get("w"))

    def answer(self) -> PromptAnswer:
        """The answer, as re-used by a later run."""
        return PromptAnswer(self.value, self.error, self.input_tokens, self.output_tokens, source="log",
                            provenance=self.provenance)


@dataclass
class Tally:
    """What a log (or segment) holds: its chunks and the tokens it paid for."""

    chunks: set[int] = field(default_factory=set)
    paid: list[int] = field(default_factory=lambda: [0, 0])

    def add(self, record: LogRecord) -> None:
        self.chunks.add(record.chunk)
        self.paid[0] += record.input_tokens
        self.paid[1] += record.output_tokens

    def to_json(self) -> dict[str, Any]:
        return {"chunks": sorted(self.chunks), "paid": list(self.paid)}

    @classmethod
    def of(cls, log: Path) -> "Tally":
        tally = cls()
        for record in records(log):
            tally.add(record)
        return tally


def records(log: Path) -> Iterator[LogRecord]:
    """Every complete record of one log (a line cut by a kill is skipped)."""
    try:
        with open(log, encoding="utf-8") as f:
            for line in f:
                try:
                    yield LogRecord.from_json(json.loads(line))
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue
    except OSError as err:
        raise RunStopped(f"cannot read {log}: {err.strerror or err}") from None


def _summary_path(log: Path) -> Path:
    return log.with_name(log.name + SEGMENT_SUFFIX)


def sealed_tally(log: Path) -> Tally | None:
    """A sealed segment's summary; None for a log still appended to, or one sealed by a run that
    was killed before it wrote the summary (read whole, then)."""
    try:
        data = json.loads(_summary_path(log).read_text())
        if isinstance(data.get("chunks"), list) and len(data.get("paid", ())) == 2:
            return Tally(set(data["chunks"]), list(data["paid"]))
    except (OSError, ValueError, AttributeError):
        pass
    return None


def remove_log(log: Path) -> None:
    log.unlink(missing_ok=True)
    _summary_path(log).unlink(missing_ok=True)


def repair_tail(log: Path) -> None:
    """A kill mid-write can leave half a line at the end: cut it so appends start on a clean line."""
    try:
        with open(log, "rb+") as f:
            end = f.seek(0, os.SEEK_END)
            pos = end
            while pos > 0:  # back, block by block, to the last newline
                start = max(0, pos - 65536)
                f.seek(start)
                block = f.read(pos - start)
                if pos == end and block.endswith(b"\n"):
                    return
                cut = block.rfind(b"\n")
                if cut >= 0:
                    f.truncate(start + cut + 1)
                    return
                pos = start
            f.truncate(0)  # no complete line at all
    except OSError as err:
        raise RunStopped(f"cannot use {log}: {err.strerror or err}") from None


@dataclass
class LoggedAnswers:
    """What the logs hold for the chunks a run still has to do: key -> prompt name -> answer;
    and the tokens every logged answer paid for (all runs into the folder)."""

    answers: dict[Any, dict[str, PromptAnswer]]
    paid: tuple[int, int]
    tallies: dict[Path, Tally]  # each log read whole, counted on the way (the open log's next appends add to it)


def read_answers(logs: Iterable[Path], skip: Iterable[int], *, ok_only: bool = False) -> LoggedAnswers:
    """Answers logged for rows of chunks not in ``skip``.

    A log is append-only, so an answer given twice (``--retry-errors``) has its newest one win.
    Across several logs (Ray actors) there is no order: an answer without error wins over one
    with, which is the same thing, since only answers with an error are ever asked again. With
    ``ok_only`` only the good ones are kept, so that error rows are asked again.
    """
    skip = set(skip)
    found: dict[Any, dict[str, LogRecord]] = {}
    paid_in = paid_out = 0
    tallies: dict[Path, Tally] = {}
    for log in logs:
        sealed = sealed_tally(log)
        if sealed is not None and sealed.chunks <= skip:  # nothing in it is needed
            paid_in, paid_out = paid_in + sealed.paid[0], paid_out + sealed.paid[1]
            continue
        in_log, tally = {}, Tally()
        for record in records(log):
            tally.add(record)
            if record.chunk not in skip:
                in_log[(hashable_key(record.key), record.prompt)] = record
        paid_in, paid_out = paid_in + tally.paid[0], paid_out + tally.paid[1]
        tallies[log] = tally
        merge_log(found, in_log)
    answers = {key: {prompt: r.answer() for prompt, r in by_prompt.items() if not ok_only or r.error is None}
               for key, by_prompt in found.items()}
    return LoggedAnswers({k: a for k, a in answers.items() if a}, (paid_in, paid_out), tallies)


def merge_log(found: dict[Any, dict[str, LogRecord]], in_log: dict[tuple[Any, str], LogRecord]) -> None:
    """Add one log's newest record per (key, prompt) to ``found`` (key -> prompt -> record), by the
    rule ``read_answers`` gives: across logs, an answer without error wins over one with."""
    for (key, prompt), record in in_log.items():
        by_prompt = found.setdefault(key, {})
        if prompt not in by_prompt or by_prompt[prompt].error is not None:
            by_prompt[prompt] = record


def paid_tokens(logs: Iterable[Path]) -> tuple[int, int]:
    """Input and output tokens of every answer in the logs (sealed segments by their summaries)."""
    paid_in = paid_out = 0
    for log in logs:
        tally = sealed_tally(log) or Tally.of(log)
        paid_in, paid_out = paid_in + tally.paid[0], paid_out + tally.paid[1]
    return paid_in, paid_out


def hashable_key(key: Any) -> Any:
    """A row key as a dict key (a list key, read back from JSON, as a tuple)."""
    return tuple(key) if isinstance(key, list) else key



class ResultsLog:
    """The log this process appends to; sealed into a segment every ``segment_bytes``.

    Unbuffered: each line goes to the OS in one write, so a kill loses nothing written and a failed
    write (disk full) leaves no buffered bytes to fail again later. A line cut short is removed
    (``repair_tail``) when the folder is next opened.
    """

    segment_bytes = 64 * 2**20

    def __init__(self, path: Path):
        self.path = path
        self._file = None
        self._bytes = 0
        self._tally: Tally | None = None  # what the log holds, once known

    def holds(self, tally: Tally) -> None:
        """What the log holds now, as a reader just counted it: the first append need not read it."""
        if self._file is None:
            self._tally = tally

    def append(self, record: LogRecord) -> None:
        """Append one answer; it is durable (in the OS) before it counts."""
        line = record.to_line()
        try:
            if self._file is None:
                self._file = open(self.path, "ab", buffering=0)
                self._bytes = self._file.seek(0, os.SEEK_END)
                # What the log already holds (an earlier run's answers), for the segment's summary.
                if self._tally is None:
                    self._tally = Tally.of(self.path) if self._bytes else Tally()
            if self._file.write(line) != len(line):
                raise OSError(errno.ENOSPC, "short write (disk full?)")
            self._bytes += len(line)
            self._tally.add(record)
            if self._bytes >= self.segment_bytes:
                self._seal()
        except OSError as err:
            raise RunStopped(f"cannot write {self.path}: {err.strerror or err}") from None

    def _seal(self) -> None:
        """Rename the log to the next segment and write the segment's summary, last: a kill in
        between leaves a segment without one, which a rerun reads whole, as before."""
        os.fsync(self._file.fileno())
        self._file.close()
        self._file, self._bytes = None, 0
        stem = self.path.name[: -len(".jsonl")]
        numbers = [int(p.name[len(stem) + 1: -len(".jsonl")]) for p in self.path.parent.glob(f"{stem}.*.jsonl")
                   if p.name[len(stem) + 1: -len(".jsonl")].isdigit()]
        segment = self.path.parent / f"{stem}.{max(numbers, default=0) + 1:06d}.jsonl"
        os.replace(self.path, segment)
        atomic_write_json(_summary_path(segment), self._tally.to_json())
        self._tally = Tally()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


__all__ = ["LogRecord", "Tally", "ResultsLog", "LoggedAnswers", "read_answers", "merge_log", "paid_tokens",
           "records", "hashable_key", "repair_tail", "remove_log", "SEGMENT_SUFFIX"]
