"""Answers already bought: the response cache across runs, and the in-memory one within a run.

An answer is stored under a content key: a hash of everything that decides it (model, endpoint,
prompt text after templating, system text, schema, generation parameters, image detail and the
prepared image's bytes). Only good answers are stored; error answers are asked again next time.

``ResponseCache`` is one SQLite file (``<cache_dir>/responses.sqlite3``) in WAL mode: readers never
block, and two runs writing at once take turns (SQLite's file lock, with a busy timeout), so the
cache is safe to share between concurrent runs. ``RecentAnswers`` is the stand-in when the cache is
off (``run.cache: false``): it still lets identical images within one run cost one request.

    >>> cache = ResponseCache("/tmp/capstream-cache")
    >>> key = content_key({"model": "gpt-4o-mini", "text": "Caption this."}, image_sha256="ab12...")
    >>> cache.put(key, "a red square", input_tokens=120, output_tokens=4)
    >>> cache.get(key)
    'a red square'
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_random_exponential

_MISSING = object()
log = logging.getLogger("capstream")


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
        except (OSError, sqlite3.Error) as err:
            self._give_up(err)

    def get(self, key: str) -> Any:
        """The stored answer (text, or a schema's fields as a dict), or None."""
        if self._db is None:
            return None
        try:
            row = self._db.execute("SELECT value FROM answers WHERE key = ?", (key,)).fetchone()
        except sqlite3.Error as err:
            self._give_up(err)
            return None
        return json.loads(row[0]) if row else None

    def put(self, key: str, value: Any, *, input_tokens: int = 0, output_tokens: int = 0) -> None:
        if self._db is None:
            return
        try:
            self._db.execute("INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?)",
                             (key, json.dumps(value, ensure_ascii=False), input_tokens, output_tokens, time.time()))
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
        self._answers: OrderedDict[str, Any] = OrderedDict()

    def get(self, key: str) -> Any:
        value = self._answers.get(key, _MISSING)
        if value is _MISSING:
            return None
        self._answers.move_to_end(key)
        return value

    def put(self, key: str, value: Any, *, input_tokens: int = 0, output_tokens: int = 0) -> None:
        self._answers[key] = value
        self._answers.move_to_end(key)
        while len(self._answers) > self.max_entries:
            self._answers.popitem(last=False)

    def __len__(self) -> int:
        return len(self._answers)

    def close(self) -> None:
        self._answers.clear()
