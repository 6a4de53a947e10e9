"""Request and token rate limits, held with aiolimiter leaky buckets.

An ``aiolimiter.AsyncLimiter(rate, 60)`` starts full, so it lets a whole minute's worth through at
once and the first minute sees about twice the limit. ``RateLimits`` shapes each bucket instead:
its capacity is one second's worth and it drains at the limit minus that capacity per minute, so
no 60 s window ever admits more than the limit (capacity + drained <= limit), while the long-run
rate stays within a second's worth of it (98% for 600/min).

    >>> limits = RateLimits(requests_per_minute=600, tokens_per_minute=200_000)
    >>> await limits.acquire(tokens=1_100)   # before every attempt of a request
"""

from __future__ import annotations

from aiolimiter import AsyncLimiter


def shaped_limiter(per_minute: float) -> AsyncLimiter:
    """An AsyncLimiter that never admits more than ``per_minute`` in any 60 s window."""
    capacity = max(1.0, per_minute / 60.0)
    drain_per_minute = per_minute - capacity
    if drain_per_minute <= 0:  # limits under 2/min: one at a time, one per 60 s
        return AsyncLimiter(1, 60.0)
    return AsyncLimiter(capacity, 60.0 * capacity / drain_per_minute)


class RateLimits:
    """Both buckets of an endpoint: requests per minute and tokens per minute (None = no limit)."""

    def __init__(self, requests_per_minute: float | None = None, tokens_per_minute: float | None = None):
        self.requests = shaped_limiter(requests_per_minute) if requests_per_minute else None
        self.tokens = shaped_limiter(tokens_per_minute) if tokens_per_minute else None

    async def acquire(self, tokens: int = 0) -> None:
        """Wait until one request of ``tokens`` tokens fits under both limits."""
        if self.requests is not None:
            await self.requests.acquire(1)
        if self.tokens is not None and tokens > 0:
            # A request larger than the bucket could never fit: let it take the whole bucket.
            await self.tokens.acquire(min(float(tokens), self.tokens.max_rate))
