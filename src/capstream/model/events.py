"""What the sending side reports as it happens: failed attempts and every move of a rate limit.

``Sender`` and ``RateLimits`` take an optional ``observer`` (a callable taking one event); without
one they report nothing and pay nothing. A run passes one that appends each event to its events
log (``io/events_log.py``), which the run report (``capstream view``) plots over time. Events
carry no secret: a status, a failure class, a number.

    >>> seen = []
    >>> limits = RateLimits(requests_per_minute=600, observer=seen.append)
    >>> seen[0]
    LimitChanged(limit='requests', per_minute=600.0, reason='configured', at=...)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Union


@dataclass(frozen=True)
class AttemptFailed:
    """One attempt of a request failed: its HTTP status (None: a timeout or a dropped connection),
    what the failure means (``transient`` | ``row`` | ``fatal``), which attempt it was, and whether
    it is tried again."""

    status: int | None
    failure: str
    attempt: int
    retried: bool
    at: float = field(default_factory=time.time)  # unix seconds


@dataclass(frozen=True)
class LimitChanged:
    """A limit in force changed: ``limit`` is ``requests`` or ``tokens`` (per minute); ``reason``
    is ``configured`` (the start), ``announced`` (the endpoint's headers), ``slowed`` (429s) or
    ``recovered`` (growing back while requests succeed)."""

    limit: str
    per_minute: float | None
    reason: str
    at: float = field(default_factory=time.time)


SendEvent = Union[AttemptFailed, LimitChanged]
Observer = Callable[[SendEvent], None]

__all__ = ["AttemptFailed", "LimitChanged", "SendEvent", "Observer"]
