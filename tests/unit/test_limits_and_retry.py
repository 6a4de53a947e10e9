"""Rate-limit shaping and the retry policy, on a virtual clock: no test here sleeps."""

from __future__ import annotations

import asyncio
import importlib
import selectors

import httpx
import openai
import pytest

from capstream.errors import Failure
from capstream.model.limits import RateLimits, ShapedLimiter
from capstream.model.retry import classify, request_retrying, retry_after_s


class _InstantSelector(selectors.DefaultSelector):
    """Instead of blocking for ``timeout`` seconds, move the loop's virtual clock forward."""

    def __init__(self, clock: list[float]):
        super().__init__()
        self.clock = clock

    def select(self, timeout=None):
        # Every loop iteration moves the clock by at least a microsecond, as a real clock would:
        # aiolimiter's two capacity checks can disagree in the last bit of a float, and without
        # time passing that wake-up/re-check cycle would spin forever.
        self.clock[0] += max(timeout or 0.0, 1e-6)
        return super().select(0)


class VirtualClockLoop(asyncio.SelectorEventLoop):
    def __init__(self):
        self.clock = [0.0]
        super().__init__(_InstantSelector(self.clock))

    def time(self) -> float:
        return self.clock[0]


def run_virtual(coro_fn):
    loop = VirtualClockLoop()
    try:
        return loop.run_until_complete(coro_fn(loop)), loop.time()
    finally:
        loop.close()


def _max_in_window(times: list[float], window: float = 60.0) -> int:
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - window:
            j += 1
        best = max(best, i - j + 1)
    return best


@pytest.mark.parametrize("per_minute", [600, 90, 5000])
def test_requests_per_minute_never_exceeded_and_held_near_the_line(per_minute):
    async def main(loop):
        limits = RateLimits(requests_per_minute=per_minute)
        times = []

        async def worker():
            while loop.time() < 300:
                await limits.acquire()
                times.append(loop.time())

        await asyncio.gather(*(worker() for _ in range(32)))
        return sorted(times)

    times, _ = run_virtual(main)
    assert _max_in_window(times) <= per_minute  # no 60 s window over the limit, the first included
    first_minute = sum(1 for t in times if t < 60)
    assert first_minute <= per_minute
    rate = sum(1 for t in times if t < 300) / 5
    assert rate >= 0.95 * per_minute


def test_tokens_per_minute_held():
    async def main(loop):
        limits = RateLimits(tokens_per_minute=100_000)
        spent = []

        async def worker():
            while loop.time() < 240:
                await limits.acquire(tokens=1_105)
                spent.append((loop.time(), 1_105))

        await asyncio.gather(*(worker() for _ in range(16)))
        return spent

    spent, _ = run_virtual(main)
    for start in range(0, 180, 5):
        assert sum(n for t, n in spent if start <= t < start + 60) <= 100_000
    assert sum(n for t, n in spent if t < 240) / 4 >= 0.95 * 100_000


def test_request_bigger_than_the_bucket_still_goes():
    async def main(loop):
        limits = RateLimits(tokens_per_minute=600)  # bucket of 10 tokens
        await limits.acquire(tokens=5_000)
        await limits.acquire(tokens=5_000)
        return True

    ok, elapsed = run_virtual(main)
    assert ok and elapsed < 120


def test_shaped_limiter_small_limits():
    limiter = ShapedLimiter(1)
    assert limiter.max_rate == 1 and limiter.time_period == 60.0


def _status_error(status: int, headers: dict | None = None) -> openai.APIStatusError:
    request = openai.DefaultAsyncHttpxClient().build_request("POST", "http://x/v1/chat/completions")
    # openai 1.x builds on httpx, 3.x on httpx2: make the response with the SDK's own module.
    http = importlib.import_module(type(request).__module__.split(".")[0])
    response = http.Response(status, headers=headers or {}, request=request)
    return openai.APIStatusError("boom", response=response, body=None)


@pytest.mark.parametrize("status, kind", [
    (429, Failure.TRANSIENT), (500, Failure.TRANSIENT), (503, Failure.TRANSIENT), (408, Failure.TRANSIENT),
    (401, Failure.FATAL), (403, Failure.FATAL), (404, Failure.FATAL),
    (400, Failure.ROW), (413, Failure.ROW), (422, Failure.ROW),
])
def test_classify_by_status(status, kind):
    assert classify(_status_error(status)) is kind


def test_classify_transport_errors():
    request = openai.DefaultAsyncHttpxClient().build_request("POST", "http://x/")
    assert classify(openai.APITimeoutError(request=request)) is Failure.TRANSIENT
    assert classify(openai.APIConnectionError(request=request)) is Failure.TRANSIENT
    assert classify(httpx.ConnectError("refused")) is Failure.TRANSIENT
    assert classify(ValueError("parse")) is Failure.ROW


def test_retry_after_headers():
    assert retry_after_s(_status_error(429, {"retry-after-ms": "1500"})) == 1.5
    assert retry_after_s(_status_error(429, {"retry-after": "3"})) == 3.0
    assert retry_after_s(_status_error(429, {})) is None
    assert retry_after_s(ValueError()) is None


def test_policy_retries_only_transient_and_waits_as_asked():
    waits = []

    async def fake_sleep(seconds):
        waits.append(seconds)

    async def main(errors):
        calls = 0
        async for attempt in request_retrying(max_attempts=5, max_wait_s=10, sleep=fake_sleep):
            with attempt:
                calls += 1
                if errors:
                    raise errors.pop(0)
        return calls

    calls = asyncio.run(main([_status_error(429, {"retry-after": "2"}), _status_error(500)]))
    assert calls == 3 and waits[0] == 2.0 and 0 <= waits[1] <= 10
    with pytest.raises(openai.APIStatusError):
        asyncio.run(main([_status_error(400)]))
    waits.clear()
    with pytest.raises(openai.APIStatusError):
        asyncio.run(main([_status_error(503)] * 6))
    assert len(waits) == 4  # 5 attempts, 4 waits


def test_announced_limit_caps_the_configured_one():
    async def main(loop):
        limits = RateLimits(requests_per_minute=1200, clock=loop.time)
        limits.observe({"x-ratelimit-limit-requests": "600"}, rate_limited=False)
        times = []

        async def worker():
            while loop.time() < 180:
                await limits.acquire()
                times.append(loop.time())

        await asyncio.gather(*(worker() for _ in range(16)))
        return sorted(times)

    times, _ = run_virtual(main)
    assert _max_in_window(times) <= 600
    assert sum(1 for t in times if t < 180) / 3 >= 0.95 * 600


def test_429s_teach_a_limit_and_success_grows_it_back():
    """No limit configured or announced: an endpoint refilling 300 requests/min (a token bucket, as
    OpenAI's) answers 429 when empty; the limiter settles near its rate without hammering it."""

    async def main(loop):
        limits = RateLimits(clock=loop.time)
        bucket, last = 300.0, 0.0
        admitted, rejected = [], 0

        async def worker():
            nonlocal rejected, bucket, last
            while loop.time() < 900:
                await limits.acquire()
                now = loop.time()
                bucket, last = min(300.0, bucket + (now - last) * 5.0), now
                if bucket < 1:
                    rejected += 1
                    limits.observe({}, rate_limited=True)
                    await asyncio.sleep(1.0)  # Retry-After
                else:
                    bucket -= 1
                    admitted.append(now)
                    limits.observe({}, rate_limited=False)
                await asyncio.sleep(0.1)  # the request's own latency

        await asyncio.gather(*(worker() for _ in range(8)))
        return admitted, rejected, limits.requests.rate

    (admitted, rejected, rate), _ = run_virtual(main)
    late = [t for t in admitted if 300 <= t < 900]
    assert len(late) / 10 >= 0.8 * 300  # settles near the real limit
    assert rejected <= 0.1 * (len(admitted) + rejected)
    assert rate is not None and rate <= 1.2 * 300


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
def test_a_refused_connection_is_told_apart_whatever_the_sdk_calls_it(transport):
    """The SDK's aiohttp transport says "Request timed out." for a refused connection, httpx says
    "Connection error."; both are REFUSED (by the ConnectionRefusedError they were raised from)."""
    import socket

    from capstream.model.call import translate

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # released: nothing listens there

    async def attempt() -> BaseException:
        http = openai.DefaultAioHttpClient(timeout=5) if transport == "aiohttp" else openai.DefaultAsyncHttpxClient(timeout=5)
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0, http_client=http)
        try:
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        except Exception as err:
            return err
        finally:
            await http.aclose()
        raise AssertionError("a request to a closed port answered")

    err = asyncio.run(attempt())
    assert classify(err) is Failure.REFUSED
    failed = translate(err)
    assert failed.failure is Failure.REFUSED and failed.as_row_error() == "ConnectionError: connection refused"
    # capstream's own error raised while handling one (a translation made on purpose) is not read through.
    from capstream.errors import RunStopped

    try:
        try:
            raise err
        except Exception:
            raise RunStopped("nothing is listening") from None
    except RunStopped as outer:
        assert classify(outer) is Failure.ROW
