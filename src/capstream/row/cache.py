"""Answers already bought: the response cache across runs, and the in-memory one within a run.

An answer is stored under a content key: a hash of everything that decides it (model, endpoint,
prompt text after templating, system text, schema, generation parameters, image detail and the
prepared image's bytes). Only good answers are stored; error answers are asked again next time.

``ResponseCache`` is one SQLite file (``<cache_dir>/responses.sqlite3``) in WAL mode: readers never
block, and two runs writing at once take turns (SQLite's file lock, with a busy timeout), so the
cache is safe to share between concurrent runs. ``RecentAnswers`` is the stand-in when the cache is
off (``run.cache: false``): it still lets identical images within one run cost one request. Each
answer keeps how it was bought (its ``Provenance``: a table of its own, so a cache file written by
an earlier capstream is read, and written, by both).

    >>> cache = ResponseCache("/tmp/capstream-cache")
    >>> key = content_key({"model": "gpt-4o-mini", "text": "Caption this."}, image_sha256="ab12...")
    >>> cache.put(key, "a red square", input_tokens=120, output_tokens=4)
    >>> cache.get(key)
    'a red square'
    >>> cache.get_answer(key).provenance.input_tokens
    120
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_random_exponential

from .results import Provenance

log = logging.getLogger("capstream")


@dataclass(frozen=True)
class CachedAnswer:
    """An answer bought before, and how (None: an answer kept without its provenance)."""

    value: Any
    provenance: Provenance | None = None


def content_key(request: dict[str, Any], image_sha256: str) -> str:
    """A stable hash of what was asked (a JSON-able dict) and of the image bytes' hash."""
    blob = json.dumps({"request": request, "image": image_sha256}, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def default_cache_dir() -> Path:
    """``$CAPSTREAM_CACHE_DIR``, else ``$XDG_CACHE_HOME/capstream``, else ``~/.cache/capstream``."""
    if os.environ.get("CAPSTREAM_CACHE_DIR"):
        return Path(os.environ["CAPSTREAM_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "capstream"


class ResponseCache:
    """Good answers by content key, in one SQLite file shared by every run on this machine.

    The cache only saves money; it never stops a run. When it cannot be opened, read or written
    (disk full, read-only folder, a damaged file) it says so once in the log and acts empty from then on.
    """

    def __init__(self, directory: str | os.PathLike):
        self.path = Path(directory) / "responses.sqlite3"
        self._db: sqlite3.Connection | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # One connection per cache object, used from the event loop's thread only.
            self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            # Switching a new file to WAL takes its lock without waiting on the busy timeout: two
            # processes opening a new cache at once get SQLITE_BUSY here, so it is tried again (a
            # file already in WAL mode answers at once).
            for attempt in Retrying(retry=retry_if_exception_type(sqlite3.OperationalError), reraise=True,
                                    stop=stop_after_delay(30), wait=wait_random_exponential(0.01, max=0.5)):
                with attempt:
                    self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a crash may lose the last answers, never corrupts
            self._db.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, value TEXT NOT NULL, "
                             "input_tokens INTEGER, output_tokens INTEGER, created REAL)")
            # How each answer was bought, apart: the answers table keeps the shape earlier versions write.
            self._db.execute("CREATE TABLE IF NOT EXISTS provenance (key TEXT PRIMARY KEY, data TEXT NOT NULL)")
        except (OSError, sqlite3.Error) as err:
            self._give_up(err)

    def get(self, key: str) -> Any:
        """The stored answer (text, or a schema's fields as a dict), or None."""
        found = self.get_answer(key)
        return found.value if found is not None else None

    def get_answer(self, key: str) -> CachedAnswer | None:
        """The stored answer and how it was bought (an answer stored by an earlier version: its
        tokens and the time it was stored), or None."""
        if self._db is None:
            return None
        try:
            row = self._db.execute("SELECT a.value, a.input_tokens, a.output_tokens, a.created, p.data FROM answers a "
                                   "LEFT JOIN provenance p ON p.key = a.key WHERE a.key = ?", (key,)).fetchone()
        except sqlite3.Error as err:
            self._give_up(err)
            return None
        if row is None:
            return None
        value, input_tokens, output_tokens, created, data = row
        bought = Provenance(**json.loads(data)) if data else Provenance(answered_at=created, input_tokens=input_tokens,
                                                                         output_tokens=output_tokens)
        return CachedAnswer(json.loads(value), bought)

    def put(self, key: str, value: Any, *, input_tokens: int = 0, output_tokens: int = 0,
            provenance: Provenance | None = None) -> None:
        if self._db is None:
            return
        try:
            self._db.execute("INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?)",
                             (key, json.dumps(value, ensure_ascii=False), input_tokens, output_tokens, time.time()))
            if provenance is not None:
                self._db.execute("INSERT OR REPLACE INTO provenance VALUES (?, ?)", (key, json.dumps(asdict(provenance))))
        except sqlite3.Error as err:
            self._give_up(err)

    def _give_up(self, err: Exception) -> None:
        log.warning("response cache %s unusable (%s); going on without it", self.path, err)
        if self._db is not None:
            self._db.close()
        self._db = None

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0] if self._db is not None else 0

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


class RecentAnswers:
    """The last ``max_entries`` good answers of this run, in memory (the cache when it is off)."""

    def __init__(self, max_entries: int = 10_000):
        self.max_entries = max_entries
        self._answers: OrderedDict[str, CachedAnswer] = OrderedDict()

    def get(self, key: str) -> Any:
        found = self.get_answer(key)
        return found.value if found is not None else None

    def get_answer(self, key: str) -> CachedAnswer | None:
        found = self._answers.get(key)
        if found is None:
            return None
        self._answers.move_to_end(key)
        return found

    def put(self, key: str, value: Any, *, input_tokens: int = 0, output_tokens: int = 0,
            provenance: Provenance | None = None) -> None:
        self._answers[key] = CachedAnswer(value, provenance)
        self._answers.move_to_end(key)
        while len(self._answers) > self.max_entries:
            self._answers.popitem(last=False)

    def __len__(self) -> int:
        return len(self._answers)

    def close(self) -> None:
        self._answers.clear()
