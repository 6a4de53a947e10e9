"""The durable state of a batch run: its request files, their batches, and what each line answers.

``.capstream/batches.json`` (``BatchLedger``) is rewritten atomically at every step, so a kill at any
moment leaves a state a rerun continues from without submitting a request twice:

* a request file is recorded (with the chunks its lines answer, its expected tokens and how far the
  round's planning got) once it is complete on disk and before it is uploaded; a file on disk that
  the ledger does not name is left over from a kill and removed;
* its upload's file id once the upload is done; ``creating_at`` before a batch is asked for, and the
  batch's id the moment the provider gives it (a kill in between is healed by finding the batch by
  its metadata);
* ``collect_started`` before a batch's answers are logged, and ``collected`` (with the files of the
  lines to submit again) once they all are; a collected file's request, index and downloaded files
  are removed.

Each request file ``requests-000001.jsonl`` (the OpenAI batch format) has an index beside it,
``requests-000001.index.jsonl``: for each line its row (chunk, offset, prompt, key), its content key
(for the response cache), how many batches it went into before and what they paid, and the rows
asking the very same thing that its answer also answers. ``RequestWriter`` writes both, cut at
``batch.max_requests`` lines and ``batch.max_bytes`` bytes.

    >>> ledger = BatchLedger.open(layout)
    >>> writer = RequestWriter(ledger, max_requests=50_000, max_bytes=190_000_000)
    >>> writer.add(entry, body_json, tokens=(900, 300), position=(0, 17, 0))   # may finish a file: recorded
    >>> writer.finish()
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from ..errors import RunStopped
from .files import atomic_write_json, read_state
from .layout import OutputLayout

if TYPE_CHECKING:
    from ..model.batch_api import BatchState

_CUSTOM_ID = re.compile(r"r(\d+)-c(\d+)-o(\d+)-p(\d+)-a(\d+)")
_REQUEST_FILE = re.compile(r"requests-(\d{6})\.")


@dataclass(frozen=True)
class Follower:
    """A row asking exactly what a line asks (the same image, text and options): the line's answer is its."""

    chunk: int
    offset: int
    prompt: int
    row_key: Any = None


@dataclass
class IndexEntry:
    """One request line of a request file, as its index keeps it."""

    round: int
    chunk: int
    offset: int
    prompt: int  # the prompt's index in the run's prompts
    content_key: str
    row_key: Any = None  # dataset.key_column's value (None: the row's position is its key)
    attempts: int = 0  # batches the request went into before this file
    invalid: int = 0  # answers so far that did not match the prompt's schema
    paid: tuple[int, int] = (0, 0)  # tokens those earlier batches paid for it
    followers: list[Follower] = field(default_factory=list)

    @property
    def custom_id(self) -> str:
        """``r<round>-c<chunk>-o<offset>-p<prompt>-a<attempts>``: unique in a round, and short."""
        return f"r{self.round}-c{self.chunk}-o{self.offset}-p{self.prompt}-a{self.attempts}"

    def again(self, *, invalid: bool, paid: tuple[int, int]) -> "IndexEntry":
        """The entry of this request in a later batch (``paid``: what this batch's line paid)."""
        return IndexEntry(self.round, self.chunk, self.offset, self.prompt, self.content_key, self.row_key,
                          self.attempts + 1, self.invalid + invalid,
                          (self.paid[0] + paid[0], self.paid[1] + paid[1]), list(self.followers))

    def to_line(self) -> bytes:
        data: dict[str, Any] = {"id": self.custom_id, "ck": self.content_key}
        if self.row_key is not None:
            data["k"] = self.row_key
        if self.invalid:
            data["bad"] = self.invalid
        if self.paid != (0, 0):
            data["paid"] = list(self.paid)
        if self.followers:
            data["f"] = [[f.chunk, f.offset, f.prompt, f.row_key] for f in self.followers]
        return (json.dumps(data, ensure_ascii=False) + "\n").encode()

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "IndexEntry":
        match = _CUSTOM_ID.fullmatch(data["id"])
        if match is None:
            raise ValueError(f"not a capstream custom_id: {data['id']!r}")
        round_, chunk, offset, prompt, attempts = (int(g) for g in match.groups())
        return cls(round_, chunk, offset, prompt, data["ck"], data.get("k"), attempts, int(data.get("bad") or 0),
                   tuple(data.get("paid") or (0, 0)), [Follower(*f) for f in data.get("f") or []])

    def rows(self) -> Iterator[tuple[int, int, int, Any]]:
        """(chunk, offset, prompt, row key) of every row-prompt this line answers, its own first."""
        yield self.chunk, self.offset, self.prompt, self.row_key
        for f in self.followers:
            yield f.chunk, f.offset, f.prompt, f.row_key


@dataclass
class BatchTry:
    """One batch made of a request file, as last seen."""

    id: str
    created_at: float
    status: str = "validating"
    refusal: str | None = None  # the error code of a batch the provider refused as a whole
    total: int = 0
    completed: int = 0
    failed: int = 0
    output_file_id: str | None = None
    error_file_id: str | None = None

    @classmethod
    def of(cls, state: "BatchState") -> "BatchTry":
        """The batch as the provider showed it (``model/batch_api.BatchState``)."""
        return cls(state.id, state.created_at, state.status, None, state.total, state.completed, state.failed,
                   state.output_file_id, state.error_file_id)


@dataclass
class RequestFile:
    """One request file and what became of it."""

    name: str
    round: int
    requests: int
    bytes: int
    chunks: dict[int, int]  # chunk -> row-prompts answered by its lines (followers included)
    tokens: tuple[int, int]  # expected input and output tokens (output at its cap)
    file_id: str | None = None
    uploaded_at: float | None = None
    tries: list[BatchTry] = field(default_factory=list)
    creating_at: float | None = None  # a batch was asked for: it may exist with its id not recorded
    wait_until: float | None = None  # refused for the enqueued-token limit: not again before
    collect_started: float | None = None
    collected: bool = False
    counts: dict[str, int] = field(default_factory=dict)  # once collected: answered, errors, again

    @property
    def batch(self) -> BatchTry | None:
        """The batch of this file the provider works on (or worked on), if any."""
        last = self.tries[-1] if self.tries else None
        return last if last is not None and last.refusal is None else None

    @property
    def state(self) -> str:
        if self.collected:
            return "collected"
        if self.batch is not None:
            return self.batch.status
        if self.wait_until is not None:
            return "waiting (enqueued-token limit)"
        return "uploaded" if self.file_id else "planned"

    # -- what happens to it (the ledger is saved after each) --------------------------------------

    def uploaded(self, file_id: str, at: float) -> None:
        self.file_id, self.uploaded_at = file_id, at

    def creating(self, at: float) -> None:
        """A batch is about to be asked for: until its id is recorded, it may exist unrecorded."""
        self.creating_at = at

    def created(self, batch: BatchTry) -> None:
        self.tries.append(batch)
        self.creating_at = self.wait_until = None

    def refused(self, code: str, *, at: float, wait_until: float | None) -> None:
        """The provider refused a batch of this file (``wait_until``: try again then, for the
        enqueued-token limit); the batch, if it was made, stays in ``tries``."""
        last = self.tries[-1] if self.tries else None
        if last is not None and last.refusal is None and last.status == "failed":
            self.tries[-1] = dataclasses.replace(last, refusal=code)
        else:
            self.tries.append(BatchTry("", at, "failed", refusal=code))
        self.creating_at, self.wait_until = None, wait_until

    def seen(self, batch: BatchTry) -> bool:
        """The batch as the provider shows it now; True when it changed."""
        if self.tries and self.tries[-1].id == batch.id and self.tries[-1] != batch:
            self.tries[-1] = batch
            return True
        return False

    def collecting(self, at: float) -> None:
        """Its answers are about to be logged. A collection begun before (by a run that was killed)
        keeps its start: every answer logged since then is that file's."""
        if self.collect_started is None:
            self.collect_started = at

    def collected_with(self, counts: dict[str, int]) -> None:
        self.collected, self.counts = True, dict(counts)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["chunks"] = {str(c): n for c, n in sorted(self.chunks.items())}
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "RequestFile":
        values = dict(data)
        values["chunks"] = {int(c): n for c, n in (data.get("chunks") or {}).items()}
        values["tokens"] = tuple(data.get("tokens") or (0, 0))
        values["tries"] = [BatchTry(**t) for t in data.get("tries") or []]
        return cls(**values)


class BatchLedger:
    """``.capstream/batches.json``: see the module's docstring. One process writes it (the run)."""

    def __init__(self, layout: OutputLayout, run_id: str, *, round: int = 0,
                 planned_through: tuple[int, int, int] | None = None, planned_all: bool = False,
                 chunks: int | None = None, files: list[RequestFile] | None = None):
        self.layout = layout
        self.run_id = run_id  # in every batch's metadata: this folder's batches, and no other's
        self.round = round
        self.planned_through = planned_through  # (chunk, offset, prompt) of the round's last line recorded
        self.planned_all = planned_all  # the round's planning reached the end of the input
        self.chunks = chunks  # how many chunks the input has, once planning reached its end
        self.files = files or []
        self._numbers = max((_file_number(f.name) for f in self.files), default=0)

    @classmethod
    def read(cls, layout: OutputLayout) -> "BatchLedger | None":
        """The folder's ledger, or None when it has none (it was never run with ``backend: batch``)."""
        data = read_state(layout.batch_ledger)
        if data is None:
            return None
        through = data.get("planned_through")
        return cls(layout, data["run_id"], round=int(data.get("round") or 0),
                   planned_through=tuple(through) if through else None, planned_all=bool(data.get("planned_all")),
                   chunks=data.get("chunks"), files=[RequestFile.from_json(f) for f in data.get("files") or []])

    @classmethod
    def open(cls, layout: OutputLayout) -> "BatchLedger":
        """The ledger (a new one, with a new run id, in a folder without one), with the files a kill left
        behind removed: request files it does not name, and those of files already collected."""
        ledger = cls.read(layout) or cls(layout, f"cs-{secrets.token_hex(8)}")
        layout.batch_dir.mkdir(parents=True, exist_ok=True)
        layout.batch_results.mkdir(exist_ok=True)
        keep = {f.name.split(".")[0] for f in ledger.files if not f.collected}
        for path in layout.batch_dir.iterdir():
            if path.is_file() and _REQUEST_FILE.match(path.name) and path.name.split(".")[0] not in keep:
                path.unlink()
        ledger.save()
        return ledger

    def save(self) -> None:
        data = {"run_id": self.run_id, "round": self.round,
                "planned_through": list(self.planned_through) if self.planned_through else None,
                "planned_all": self.planned_all, "chunks": self.chunks, "files": [f.to_json() for f in self.files]}
        try:
            atomic_write_json(self.layout.batch_ledger, data)
        except OSError as err:
            raise RunStopped(f"cannot write {self.layout.batch_ledger}: {err.strerror or err}") from None

    # -- rounds and files --------------------------------------------------------------------------

    @property
    def open_files(self) -> list[RequestFile]:
        return [f for f in self.files if not f.collected]

    @property
    def settled(self) -> bool:
        """The round is over: planned to the end, and every file collected."""
        return self.planned_all and not self.open_files

    def start_round(self) -> None:
        """A new round of planning (a rerun after a round is over: ``--retry-errors``, or what is left)."""
        self.round += 1
        self.planned_through, self.planned_all, self.chunks = None, False, None
        self.save()

    def planned(self, chunks: int) -> None:
        """The round's planning reached the end of the input, which has ``chunks`` chunks."""
        self.planned_all, self.chunks = True, chunks
        self.save()

    def new_path(self) -> Path:
        """A request file's path no file recorded or being written has."""
        self._numbers += 1
        return self.layout.request_file(self._numbers)

    def add(self, record: RequestFile, planned_through: tuple[int, int, int] | None) -> None:
        """Record a request file complete on disk (and, for one of the round's own lines, how far
        planning got)."""
        self.files.append(record)
        if planned_through is not None:
            self.planned_through = planned_through
        self.save()

    def settle(self, record: RequestFile, counts: dict[str, int], again: list[RequestFile]) -> None:
        """A collected file, and the files of its lines to submit again, recorded in one write (a
        kill before it collects the file again; one after it never makes those files twice)."""
        record.collected_with(counts)
        self.files.extend(again)
        self.save()

    def touched_chunks(self) -> set[int]:
        """Chunks with a row-prompt in a file not collected yet."""
        return {c for f in self.open_files for c in f.chunks}

    def identity(self, record: RequestFile) -> dict[str, str]:
        """The metadata naming a batch of the file's current try: how a batch whose creation was
        not recorded (a kill, a lost reply) is found at the provider."""
        return {"capstream_run": self.run_id, "capstream_file": record.name, "capstream_try": str(len(record.tries))}

    def path_of(self, record: RequestFile) -> Path:
        return self.layout.batch_dir / record.name

    def index_path(self, record: RequestFile) -> Path:
        return index_path(self.path_of(record))

    def download_path(self, record: RequestFile, batch_id: str, kind: str) -> Path:
        """Where a batch's ``output`` or ``errors`` file is downloaded to."""
        return self.layout.batch_dir / f"{record.name[:-len('.jsonl')]}.{batch_id}.{kind}.jsonl"

    def remove_files_of(self, record: RequestFile) -> None:
        """A collected file's request, index and downloads: their answers are in the results log."""
        stem = record.name.split(".")[0]
        for path in self.layout.batch_dir.glob(f"{stem}.*"):
            path.unlink(missing_ok=True)


def _file_number(name: str) -> int:
    match = _REQUEST_FILE.match(name)
    return int(match.group(1)) if match else 0


def index_path(request_path: Path) -> Path:
    return request_path.with_name(request_path.name[:-len(".jsonl")] + ".index.jsonl")


def read_index(path: Path) -> dict[str, IndexEntry]:
    """A request file's index, by custom_id."""
    try:
        with open(path, encoding="utf-8") as f:
            entries = [IndexEntry.from_json(json.loads(line)) for line in f if line.strip()]
    except (OSError, ValueError, KeyError) as err:
        raise RunStopped(f"cannot read {path}: {err}") from None
    return {e.custom_id: e for e in entries}


def request_lines(path: Path, wanted: set[str]) -> Iterator[tuple[str, bytes]]:
    """(custom_id, line) of the lines of a request file whose custom_id is in ``wanted``."""
    try:
        with open(path, "rb") as f:
            for line in f:
                custom_id = json.loads(line[:200].split(b",", 1)[0] + b"}")["custom_id"]  # it comes first
                if custom_id in wanted:
                    yield custom_id, line
    except (OSError, ValueError, KeyError) as err:
        raise RunStopped(f"cannot read {path}: {err}") from None


class RequestWriter:
    """Writes request lines and their index into numbered files within the limits; each file is
    renamed into place, then recorded in the ledger, before anyone may upload it.

    ``add`` appends a line (finishing the file first when the line would not fit); ``follow`` lets a
    row share the answer of a line of the file being written; ``finish`` records the last file.
    ``on_file(record)`` is called for each file recorded. With ``defer``, files are not recorded but
    kept in ``finished``, for the caller to record with something else (``BatchLedger.settle``).
    """

    def __init__(self, ledger: BatchLedger, *, max_requests: int, max_bytes: int, on_file=None,
                 defer: bool = False):
        self.ledger = ledger
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        self.on_file = on_file
        self.defer = defer
        self.finished: list[RequestFile] = []
        self._file = self._index = None
        self._path: Path | None = None
        self._entries: dict[str, IndexEntry] = {}  # custom_id -> entry, of the file being written
        self._by_content: dict[str, str] = {}  # content key -> custom_id, of the file being written
        self._bytes = 0
        self._tokens = [0, 0]
        self._position: tuple[int, int, int] | None = None

    @property
    def open_chunks(self) -> set[int]:
        """Chunks with a row-prompt in the file being written."""
        return {row[0] for e in self._entries.values() for row in e.rows()}

    def follow(self, content_key: str, follower: Follower, position: tuple[int, int, int] | None) -> bool:
        """Let ``follower`` be answered by the line of the file being written that asks the same;
        False when there is none."""
        custom_id = self._by_content.get(content_key)
        if custom_id is None:
            return False
        self._entries[custom_id].followers.append(follower)
        self._position = position or self._position
        return True

    def add(self, entry: IndexEntry, line: bytes, tokens: tuple[int, int],
            position: tuple[int, int, int] | None = None) -> None:
        """Append one request line (``line``: the whole line, see ``batch_api.request_line``).
        ``position``: where the round's planning is once this line is written (None for a line
        submitted again)."""
        if len(line) > self.max_bytes:
            raise RunStopped(f"one request is {len(line):,} bytes, more than batch.max_bytes ({self.max_bytes:,}); "
                             "lower image.max_side or raise batch.max_bytes")
        if self._file is not None and (len(self._entries) >= self.max_requests
                                       or self._bytes + len(line) > self.max_bytes):
            self.finish()
        if self._file is None:
            self._open()
        try:
            self._file.write(line)
        except OSError as err:
            raise RunStopped(f"cannot write {self._path}: {err.strerror or err}") from None
        self._bytes += len(line)
        self._tokens[0] += tokens[0]
        self._tokens[1] += tokens[1]
        self._entries[entry.custom_id] = entry
        self._by_content.setdefault(entry.content_key, entry.custom_id)
        self._position = position or self._position

    def finish(self) -> RequestFile | None:
        """Close the file being written, rename it into place and record it; None when none is open."""
        if self._file is None:
            return None
        path, part = self._path, self._file.name
        try:
            for entry in self._entries.values():
                self._index.write(entry.to_line())
            for f in (self._file, self._index):
                f.flush()
                os.fsync(f.fileno())
                f.close()
            os.replace(part, path)
            os.replace(self._index.name, index_path(path))
        except OSError as err:
            raise RunStopped(f"cannot write {path}: {err.strerror or err}") from None
        chunks: dict[int, int] = {}
        for entry in self._entries.values():
            for chunk, *_ in entry.rows():
                chunks[chunk] = chunks.get(chunk, 0) + 1
        round_ = next(iter(self._entries.values())).round
        record = RequestFile(path.name, round_, len(self._entries), self._bytes, chunks, tuple(self._tokens))
        if self.defer:
            self.finished.append(record)
        else:
            self.ledger.add(record, self._position)
        self._file = self._index = self._path = None
        self._entries, self._by_content, self._bytes, self._tokens, self._position = {}, {}, 0, [0, 0], None
        if self.on_file is not None and not self.defer:
            self.on_file(record)
        return record

    def _open(self) -> None:
        self._path = self.ledger.new_path()
        try:
            self._file = open(self._path.with_name(self._path.name + ".part"), "wb")
            self._index = open(index_path(self._path).with_name(index_path(self._path).name + ".part"), "wb")
        except OSError as err:
            raise RunStopped(f"cannot write {self._path}: {err.strerror or err}") from None

    def abandon(self) -> None:
        """Drop the file being written (a stopping run: a rerun plans its lines again)."""
        for f in (self._file, self._index):
            if f is not None:
                f.close()
                Path(f.name).unlink(missing_ok=True)
        self._file = self._index = self._path = None
        self._entries, self._by_content, self._bytes, self._tokens, self._position = {}, {}, 0, [0, 0], None


__all__ = ["BatchLedger", "RequestFile", "BatchTry", "IndexEntry", "Follower", "RequestWriter", "read_index",
           "request_lines", "index_path"]
