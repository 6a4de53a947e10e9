"""Writing files so that a reader (or a rerun after a kill) never sees half of one."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from ..errors import ConfigError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same folder and rename, so readers never see half a file."""
    if path.parent.exists() and not path.parent.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"{path.parent} is not a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def read_json(path: Path) -> Any:
    """The JSON in ``path``, or None when there is no such file (an unreadable one raises OSError/ValueError)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def read_state(path: Path) -> Any:
    """``read_json`` for a file of a run's state: ConfigError naming the file when it cannot be read."""
    try:
        return read_json(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: cannot read: {err}") from None
