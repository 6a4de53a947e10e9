"""The cluster-wide limiter (global_limits.py) without Ray: one LimitBroker, several BlockLimits
workers, on a virtual clock (no test here sleeps)."""

from __future__ import annotations

import asyncio

import pytest
from test_limits_and_retry import _max_in_window, run_virtual

from capstream.backends.broker import GRANT_HEADROOM, BlockLimits, LimitBroker
from capstream.config import config_from_dict
from capstream.errors import ConfigError


def test_one_limit_shared_by_a_fast_and_a_slow_worker():
    """Workers at different speeds draw from one bucket: together never over the limit, near it in
    total, and the fast one is not held to half."""

    async def main(loop):
        broker = LimitBroker(requests_per_minute=600, clock=loop.time)
        sent = {"fast": [], "slow": []}

        async def worker(name: str, concurrency: int, work_s: float):
            limits = BlockLimits(broker.grant, broker.observe_many)

            async def one_slot():
                while loop.time() < 300:
                    await limits.acquire(tokens=500)
                    sent[name].append(loop.time())
                    await asyncio.sleep(work_s)  # virtual: the request's latency

            await asyncio.gather(*(one_slot() for _ in range(concurrency)))

        await asyncio.gather(worker("fast", 32, 0.2), worker("slow", 2, 2.0))
        return sent

    sent, _ = run_virtual(main)
    times = sorted(sent["fast"] + sent["slow"])
    assert _max_in_window(times) <= 600  # no 60 s window over the limit, the first included
    assert sum(1 for t in times if t < 300) / 5 >= 0.95 * 600
    slow_per_minute = 60 * len(sent["slow"]) / 300
    assert 50 <= slow_per_minute <= 61  # the slow worker sends at its own pace (2 slots / 2 s)...
    assert len(sent["fast"]) > 8 * len(sent["slow"])  # ...and the fast one takes the rest


def test_tokens_limit_is_global_and_a_request_bigger_than_the_bucket_still_goes():
    async def main(loop):
        broker = LimitBroker(tokens_per_minute=60_000, clock=loop.time)  # bucket of 1000 tokens
        a, b = (BlockLimits(broker.grant, broker.observe_many) for _ in range(2))
        spent = []

        async def slot(limits, tokens):
            while loop.time() < 240:
                await limits.acquire(tokens=tokens)
                spent.append((loop.time(), tokens))

        await asyncio.gather(*(slot(a, 300) for _ in range(8)), *(slot(b, 700) for _ in range(8)))
        await a.acquire(tokens=5_000)  # more than the bucket holds: takes the whole bucket
        return spent

    spent, elapsed = run_virtual(main)
    for start in range(0, 180, 5):
        assert sum(n for t, n in spent if start <= t < start + 60) <= 60_000
    assert sum(n for t, n in spent if t < 240) / 4 >= 0.95 * 60_000
    assert elapsed < 300


def test_a_429_seen_by_one_worker_slows_every_worker():
    async def main(loop):
        broker = LimitBroker(clock=loop.time)  # nothing configured: adaptive only
        a, b = (BlockLimits(broker.grant, broker.observe_many) for _ in range(2))
        for _ in range(20):
            await a.acquire()
            await b.acquire()
        assert broker.rates()["requests_per_minute"] is None
        b.observe({"x-ratelimit-limit-requests": "300"}, rate_limited=False)
        await b.acquire()  # observations travel with the next ask
        assert broker.rates()["requests_per_minute"] == 0.98 * 300  # announced, less the grants' headroom
        await asyncio.sleep(6)  # virtual; one change per 5 s at most
        a.observe({"x-ratelimit-remaining-requests": "0"}, rate_limited=True)  # sent at once
        assert broker.rates()["requests_per_minute"] == pytest.approx(0.7 * 0.98 * 300)
        start, n = loop.time(), 0
        while loop.time() - start < 120:  # b, which saw no 429, is held to the lowered limit too
            await b.acquire()
            n += 1
        return n

    n, _ = run_virtual(main)
    assert n <= 2 * 0.7 * 300 * 1.05  # two minutes at the cut rate (it may grow back 5% per 10 s)


def test_backend_config_keys():
    cfg = config_from_dict({"run": {"backend": "ray", "ray_address": "auto", "workers": 4}})
    assert cfg.run.backend == "ray" and cfg.run.ray_address == "auto"
    with pytest.raises(ConfigError, match="run.backend"):
        config_from_dict({"run": {"backend": "spark"}})
    assert config_from_dict({}).run.backend == "local"


def test_the_broker_keeps_headroom_for_grant_delays():
    """Grants reach workers with varying delays, so the cluster stays 2% under every limit, the
    configured one and one the endpoint announces alike. The worst case for a sliding 60 s window:
    grants a second late for a minute, then on time (609 arrivals in one window without headroom)."""

    def late_grants(headroom: float):
        async def main(loop):
            broker = LimitBroker(requests_per_minute=600, clock=loop.time, headroom=headroom)
            limits = BlockLimits(broker.grant, broker.observe_many)
            arrivals = []

            async def one_slot(i):
                while loop.time() < 300:
                    await limits.acquire()
                    delay = 1.0 if loop.time() % 120 < 60 else 0.0  # on the way to the endpoint
                    loop.call_later(delay, lambda: arrivals.append(loop.time()))
                    await asyncio.sleep(0.5)

            await asyncio.gather(*(one_slot(i) for i in range(16)))
            broker.observe_many([({"x-ratelimit-limit-requests": "600"}, False)])
            return arrivals, broker.rates()

        (arrivals, rates), _ = run_virtual(main)
        return sorted(arrivals), rates

    arrivals, rates = late_grants(GRANT_HEADROOM)
    assert rates["requests_per_minute"] == pytest.approx(588)
    assert _max_in_window(arrivals) <= 600
    assert sum(1 for t in arrivals if t < 300) / 5 >= 0.95 * 600
    assert _max_in_window(late_grants(0.0)[0]) > 600  # what the headroom is for
