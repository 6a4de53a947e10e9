"""One rate limit and one budget for many workers: a broker holds them, workers take capacity in blocks.

``LimitBroker`` owns one ``RateLimits`` (the same shaped, adaptive buckets a local run uses) and,
with ``run.max_cost_usd``, the run's ``BudgetGuard``. On Ray it runs as a single actor
(``backends/ray.py`` wraps it with ``ray.remote``); nothing here imports Ray. ``BlockLimits`` is what
a caption actor's ``Sender`` uses in place of its own ``RateLimits``: same ``acquire(tokens)`` /
``observe(headers, rate_limited=)`` interface.

A worker asks the broker for as many requests as it has waiting (with their token sizes). The
broker waits for the first to fit, then adds every following one that fits *now*, and answers how
many it granted. So a block is whatever capacity is free when asked: a fast worker asks more often
and gets more, a slow one takes only what it uses, and no worker holds a fixed share. Capacity is
admitted by the broker's buckets, so the cluster together stays under the limit (a granted request
is sent at once; the only slack is the time a grant takes to travel back).

Adaptive mode works cluster-wide: each worker's responses (their ``x-ratelimit-*`` headers, and
whether they were 429s) travel to the broker with its next ask, or at once for a 429, and adjust
the one limit every worker draws from. So do the tokens each worker's answers paid for: once the
budget is spent, the broker refuses every ask, and each worker's waiting requests raise
``BudgetReached`` (the requests in flight finish: a local run overshoots the same way).

    >>> broker = LimitBroker(requests_per_minute=600, budget=BudgetGuard(meter, 20.0, "out/x"))
    >>> limits = BlockLimits(broker.grant, broker.observe_many, usage=session_usage)
    >>> await limits.acquire(tokens=1_100)
    >>> limits.observe(response_headers, rate_limited=False)
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from ..cost.meter import BudgetGuard
from ..errors import BudgetReached
from ..model.events import Observer
from ..model.limits import AdaptiveLimit, RateLimits
from ..model.sending import Usage

Observation = tuple[dict[str, str], bool]  # (x-ratelimit-* headers, was a 429)
Paid = tuple[int, int]  # input and output tokens a worker's answers paid for since its last ask


@dataclass(frozen=True)
class Grant:
    """The broker's answer to an ask: how many requests it admitted, or why it refuses them all."""

    count: int
    refused: str | None = None  # the budget is spent: BudgetReached's message


# A grant reaches its worker after an actor call whose delay varies (up to about a second on a busy
# node), so requests reach the endpoint less evenly than the buckets admit them: a sliding 60 s
# window at the endpoint could see a few more than the limit, and one 429 costs a 30% cut. The
# cluster therefore keeps 2% (1.2 s at any rate) of every limit unused.
GRANT_HEADROOM = 0.02


class LimitBroker:
    """The cluster's one set of buckets. Call its methods from one event loop (an async Ray actor)."""

    def __init__(self, requests_per_minute: float | None = None, tokens_per_minute: float | None = None,
                 clock: Callable[[], float] = time.monotonic, headroom: float = GRANT_HEADROOM,
                 budget: BudgetGuard | None = None, observer: Observer | None = None):
        """``budget``: a copy of the run's guard (its meter counting the tokens workers report);
        ``observer``: told of every move of the cluster's limits (the broker's events log)."""
        self.limits = RateLimits(requests_per_minute, tokens_per_minute, clock, headroom, observer=observer)
        self.budget = budget
        self.granted = 0

    async def grant(self, token_sizes: list[float], observations: list[Observation] = (), paid: Paid = (0, 0)) -> Grant:
        """Admit the first of ``token_sizes`` (waiting if needed) and every following one that fits
        now. ``observations`` and ``paid`` are applied first; once the budget is spent, nothing is
        admitted."""
        self.observe_many(observations)
        if self.budget is not None:
            self.budget.meter.usage.add_paid(*paid)
            try:
                self.budget()
            except BudgetReached as spent:
                return Grant(0, str(spent))
        await self.limits.acquire(token_sizes[0])
        granted = 1
        for tokens in token_sizes[1:]:
            if not (_fits_now(self.limits.requests, 1) and _fits_now(self.limits.tokens, tokens)):
                break
            await self.limits.acquire(tokens)  # fits: returns at once
            granted += 1
        self.granted += granted
        return Grant(granted)

    def observe_many(self, observations: list[Observation]) -> None:
        for headers, rate_limited in observations:
            self.limits.observe(headers, rate_limited=rate_limited)

    def rates(self) -> dict[str, Any]:
        """The limits in force now (per minute; None = none) and how many requests were granted."""
        return {"requests_per_minute": self.limits.requests.rate, "tokens_per_minute": self.limits.tokens.rate,
                "granted": self.granted}


def _fits_now(limit: AdaptiveLimit, amount: float) -> bool:
    if limit.limiter is None or amount <= 0:
        return True
    return limit.limiter.has_capacity(min(amount, limit.limiter.max_rate))


class BlockLimits:
    """A worker's view of the broker, with ``RateLimits``' interface.

    ``grant(token_sizes, observations, paid)`` and ``observe_many(observations)`` reach the broker
    (Ray actor method calls, or a ``LimitBroker``'s own methods in one process). One ask is in flight
    at a time; requests waiting meanwhile join the next ask, so asks grow with the worker's demand.
    ``usage``: the worker's own, whose tokens paid since the last ask go with each ask (for the budget).
    """

    def __init__(self, grant: Callable[[list[float], list[Observation], Paid], Awaitable[Grant]],
                 observe_many: Callable[[list[Observation]], Any], usage: Usage | None = None):
        self._grant = grant
        self._observe_many = observe_many
        self._usage = usage
        self._reported: Paid = (0, 0)
        self._waiting: deque[tuple[float, asyncio.Future]] = deque()
        self._observations: list[Observation] = []
        self._asking: asyncio.Task | None = None

    async def acquire(self, tokens: int = 0) -> None:
        """Wait until the broker admits one request of ``tokens`` tokens."""
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((float(tokens), future))
        if self._asking is None or self._asking.done():
            self._asking = asyncio.create_task(self._ask())
        await future  # a request admitted but then cancelled loses its capacity: never over the limit

    async def _ask(self) -> None:
        while True:
            while self._waiting and self._waiting[0][1].cancelled():
                self._waiting.popleft()
            if not self._waiting:
                return
            sizes = [tokens for tokens, _ in self._waiting]
            observations, self._observations = self._observations, []
            try:
                grant = await self._grant(sizes, observations, self._paid_since_last_ask())
            except Exception as err:  # the broker is gone: every waiter gets the error
                self._fail_waiting(err)
                return
            if grant.refused is not None:
                self._fail_waiting(BudgetReached(grant.refused))
                return
            for _ in range(grant.count):
                _, future = self._waiting.popleft()
                if not future.done():
                    future.set_result(None)

    def _paid_since_last_ask(self) -> Paid:
        if self._usage is None:
            return (0, 0)
        now = (self._usage.input_tokens, self._usage.output_tokens)
        paid, self._reported = (now[0] - self._reported[0], now[1] - self._reported[1]), now
        return paid

    def _fail_waiting(self, err: BaseException) -> None:
        while self._waiting:
            _, future = self._waiting.popleft()
            if not future.done():
                future.set_exception(err)

    def observe(self, headers: dict[str, str], *, rate_limited: bool) -> None:
        """Pass one response on to the broker: with the next ask, or at once for a 429."""
        self._observations.append((dict(headers or {}), rate_limited))  # only x-ratelimit-* (model/call.py)
        if rate_limited:
            self.flush()

    def flush(self) -> None:
        """Send the observations not yet sent (fire and forget)."""
        if self._observations:
            observations, self._observations = self._observations, []
            self._observe_many(observations)


__all__ = ["LimitBroker", "BlockLimits", "Grant", "Observation"]
