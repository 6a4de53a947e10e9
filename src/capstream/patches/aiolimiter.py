"""aiolimiter: change a limiter's rate in place, while tasks wait on it.

``AsyncLimiter``'s public API has no way to change its rate. In place, the drained level is
accounted at the old rate first (``_leak``), then ``max_rate``, ``time_period`` and the rate per
second derived from them (``_rate_per_sec``) are set, and the first waiter is re-timed
(``_wake_next``, which exists from aiolimiter 1.2 on). The limiter then admits exactly what a new
``AsyncLimiter(max_rate, time_period)`` holding the same level would.

    >>> limiter = AsyncLimiter(10, 1)
    >>> retune(limiter, 20, 1)   # False outside the tested versions: make a new limiter instead
    True
"""

from __future__ import annotations

from typing import Any

from . import tested

TESTED = ("aiolimiter", "1.2", "2.0")


def retune(limiter: Any, max_rate: float, time_period: float) -> bool:
    """Set ``limiter``'s rate to ``max_rate`` per ``time_period`` seconds; False when this
    aiolimiter is not one it was tested with (the limiter is then left as it was)."""
    if not (tested(*TESTED) and all(hasattr(limiter, name) for name in ("_leak", "_wake_next", "_rate_per_sec"))):
        return False
    limiter._leak()
    limiter.max_rate, limiter.time_period = max_rate, time_period
    limiter._rate_per_sec = max_rate / time_period
    limiter._wake_next()
    return True
