"""Request and token rate limits: aiolimiter leaky buckets, shaped, and adapting to the endpoint.

Shaping: an ``aiolimiter.AsyncLimiter(rate, 60)`` starts full, so it lets a whole minute's worth
through at once and the first minute sees about twice the limit. Here each bucket holds one
second's worth and drains at the limit minus that, so no 60 s window ever admits more than the
limit (capacity + drained <= limit), while the long-run rate stays within a second's worth of it.

Adapting: the limit in force is the configured one, lowered to what the endpoint says it allows
(``x-ratelimit-limit-requests`` / ``-tokens`` headers). A 429 that says we send too fast (its
``x-ratelimit-remaining-*`` is 0, or, without such headers, 429s are at least 10% of the answers of
the last 10 s) cuts it by 30% (with no limit yet, it starts from the rate sent over the last
minute), at most once per 5 s since a burst of 429s is one signal; while requests succeed it grows back by 5% every 10 s, never above a configured or
announced limit. The run settles just under the endpoint's real limit instead of hammering it.

    >>> limits = RateLimits(requests_per_minute=600, tokens_per_minute=200_000)
    >>> await limits.acquire(tokens=1_100)        # before every attempt
    >>> limits.observe(headers, rate_limited=False) # after it, with the response's headers

With an ``observer`` (``events.py``), every move of a limit is reported as a ``LimitChanged``.
"""

from __future__ import annotations

import time
from collections import deque

from aiolimiter import AsyncLimiter

from ..patches.aiolimiter import retune
from .events import LimitChanged, Observer

SLOW_DOWN = 0.70  # on a 429, the new limit as a share of the old one
SPEED_UP = 1.05  # growth per step while requests succeed
STEP_S = 5.0  # at most one cut per this many seconds (a burst of 429s is one signal)
GROW_EVERY_S = 10.0  # growth steps at most this often, and not this soon after a cut
SIGNAL_SHARE = 0.10  # 429s count as "over the limit" when at least this share of recent answers
SIGNAL_WINDOW_S = 10.0
WINDOW_S = 60.0


def _shape(per_minute: float) -> tuple[float, float]:
    """(capacity, period) of a bucket that never admits more than ``per_minute`` in any 60 s."""
    capacity = max(1.0, per_minute / 60.0)
    drain_per_minute = per_minute - capacity
    if drain_per_minute <= 0:  # limits under 2/min: one at a time, one per 60 s
        return 1.0, 60.0
    return capacity, 60.0 * capacity / drain_per_minute


class ShapedLimiter:
    """An AsyncLimiter that never admits more than ``per_minute`` in any 60 s window, and whose
    rate can be changed while tasks wait on it."""

    def __init__(self, per_minute: float):
        self.per_minute = per_minute
        self._bucket = AsyncLimiter(*_shape(per_minute))

    @property
    def max_rate(self) -> float:
        """The bucket's capacity: the most one acquire can take."""
        return self._bucket.max_rate

    @property
    def time_period(self) -> float:
        """Seconds the bucket takes to drain ``max_rate``."""
        return self._bucket.time_period

    def has_capacity(self, amount: float = 1) -> bool:
        return self._bucket.has_capacity(amount)

    async def acquire(self, amount: float = 1) -> None:
        await self._bucket.acquire(amount)

    def set_rate(self, per_minute: float) -> None:
        """Change the rate in place; call from the loop that uses the limiter. With an aiolimiter
        the patch was not tested with, a new bucket takes over (tasks already waiting on the old
        one are admitted at the old rate)."""
        self.per_minute = per_minute
        if not retune(self._bucket, *_shape(per_minute)):
            self._bucket = AsyncLimiter(*_shape(per_minute))


def per_minute(events: deque, now: float) -> float:
    """Total amount in ``events`` ((time, amount), trimmed to the last minute) as a per-minute rate."""
    while events and events[0][0] < now - WINDOW_S:
        events.popleft()
    if not events:
        return 0.0
    span = min(WINDOW_S, max(1.0, now - events[0][0]))
    return sum(amount for _, amount in events) * WINDOW_S / span


def _header_float(headers: dict[str, str], name: str) -> float | None:
    try:
        return float(headers[name])
    except (KeyError, TypeError, ValueError):
        return None


class AdaptiveLimit:
    """One limit (requests or tokens per minute): configured, announced by the endpoint, or learned."""

    def __init__(self, configured: float | None, clock=time.monotonic, headroom: float = 0.0, *,
                 kind: str = "requests", observer: Observer | None = None):
        """``kind``: ``requests`` or ``tokens``, as reported to ``observer`` (which is told of every
        change of the limit in force, the configured one first)."""
        self.configured = configured
        self.announced: float | None = None
        self.clock = clock
        self.share = 1.0 - headroom  # of a configured or announced limit, the part used
        self.limiter = ShapedLimiter(configured * self.share) if configured else None
        self._sent: deque[tuple[float, float]] = deque()  # (time, amount) over the last minute
        self._last_change = -STEP_S
        self.kind = kind
        self.observer = observer
        if observer is not None and self.limiter is not None:
            observer(LimitChanged(kind, self.limiter.per_minute, "configured"))

    @property
    def ceiling(self) -> float | None:
        known = [x for x in (self.configured, self.announced) if x]
        return min(known) * self.share if known else None

    @property
    def rate(self) -> float | None:
        """The limit in force now, per minute (None: no limit)."""
        return self.limiter.per_minute if self.limiter else None

    async def acquire(self, amount: float) -> None:
        if self.limiter is not None:
            # A request larger than the bucket could never fit: let it take the whole bucket.
            await self.limiter.acquire(min(amount, self.limiter.max_rate))
        now = self.clock()
        self._sent.append((now, amount))
        while self._sent[0][0] < now - WINDOW_S:
            self._sent.popleft()

    def _set(self, per_minute: float, reason: str) -> None:
        per_minute = max(1.0, per_minute)
        if self.ceiling:
            per_minute = min(per_minute, self.ceiling)
        changed = self.limiter is None or abs(per_minute - self.limiter.per_minute) > 1e-9
        if self.limiter is None:
            self.limiter = ShapedLimiter(per_minute)
        elif changed:
            self.limiter.set_rate(per_minute)
        self._last_change = self.clock()
        if changed and self.observer is not None:
            self.observer(LimitChanged(self.kind, per_minute, reason))

    def announce(self, limit: float) -> None:
        """The endpoint says its limit (a header): never go above it."""
        if limit > 0 and limit != self.announced:
            self.announced = limit
            if self.rate is None or self.rate > self.ceiling:
                self._set(self.ceiling, "announced")

    def slow_down(self) -> None:
        """A 429: cut the limit (or, with none yet, the rate sent over the last minute) by 30%."""
        now = self.clock()
        if now - self._last_change < STEP_S:
            return
        current = self.rate if self.rate is not None else per_minute(self._sent, now)
        if current:
            self._set(SLOW_DOWN * current, "slowed")

    def speed_up(self) -> None:
        """A success: grow back towards the ceiling, one step at a time."""
        if self.rate is None or (self.ceiling and self.rate >= self.ceiling):
            return
        if self.clock() - self._last_change >= GROW_EVERY_S:
            self._set(self.rate * SPEED_UP, "recovered")


class RateLimits:
    """Both limits of an endpoint: requests and tokens per minute (None = none configured)."""

    def __init__(self, requests_per_minute: float | None = None, tokens_per_minute: float | None = None,
                 clock=time.monotonic, headroom: float = 0.0, observer: Observer | None = None):
        """``headroom``: the share of every configured or announced limit left unused (for senders
        whose requests reach the endpoint with delays the buckets do not see). ``observer``: told of
        every change of either limit (``events.LimitChanged``)."""
        self.requests = AdaptiveLimit(requests_per_minute, clock, headroom, kind="requests", observer=observer)
        self.tokens = AdaptiveLimit(tokens_per_minute, clock, headroom, kind="tokens", observer=observer)
        self.clock = clock
        self._answers: deque[tuple[float, bool]] = deque()  # (time, was a 429) over SIGNAL_WINDOW_S

    async def acquire(self, tokens: int = 0) -> None:
        """Wait until one request of ``tokens`` tokens fits under both limits."""
        await self.requests.acquire(1)
        if tokens > 0:
            await self.tokens.acquire(float(tokens))

    def observe(self, headers: dict[str, str], *, rate_limited: bool) -> None:
        """Learn from one response: its ``x-ratelimit-*`` headers, and whether it was a 429."""
        for limit, kind in ((self.requests, "requests"), (self.tokens, "tokens")):
            announced = _header_float(headers, f"x-ratelimit-limit-{kind}")
            if announced:
                limit.announce(announced)
        now = self.clock()
        self._answers.append((now, rate_limited))
        while self._answers[0][0] < now - SIGNAL_WINDOW_S:
            self._answers.popleft()
        if rate_limited and self._over_the_limit(headers):
            # The tokens limit is the one hit only when the endpoint says so; otherwise requests.
            out_of_tokens = _header_float(headers, "x-ratelimit-remaining-tokens") == 0
            (self.tokens if out_of_tokens else self.requests).slow_down()
        elif not rate_limited:
            self.requests.speed_up()
            self.tokens.speed_up()

    def _over_the_limit(self, headers: dict[str, str]) -> bool:
        """Whether a 429 says we send too fast. An endpoint's headers say so directly (nothing
        remaining); without them, only a run of 429s does: a few stray ones (an overloaded replica,
        a proxy) must not shrink the rate, or 5% random 429s would drive it to nothing."""
        remaining = [_header_float(headers, f"x-ratelimit-remaining-{k}") for k in ("requests", "tokens")]
        if any(r is not None for r in remaining):
            return any(r is not None and r < 1 for r in remaining)
        refused = sum(1 for _, was_429 in self._answers if was_429)
        return refused >= 3 and refused >= SIGNAL_SHARE * len(self._answers)


__all__ = ["RateLimits", "AdaptiveLimit", "ShapedLimiter"]
