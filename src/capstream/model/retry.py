"""Which request failures are worth retrying, and the one tenacity policy that retries them.

Failures are classified by exception *type* and HTTP status, never by message text:

* ``TRANSIENT``: 408/409/429/5xx, timeouts, dropped connections. Retried with jittered exponential
  backoff, honouring ``retry-after-ms`` / ``Retry-After`` when the server sends them.
* ``FATAL``: would fail every row (bad key, no permission, unknown model or endpoint). Stops the run.
* ``ROW``: belongs to this row only (400 bad image, content policy, 413, 422). Recorded, run goes on.
* ``REFUSED``: the connection was refused (a ``ConnectionRefusedError`` under the SDK's error):
  nothing listens there. Retried as transient once the endpoint has answered (``sending.Sender``
  stops the run at once before that).

The OpenAI SDK's own retries are turned off (``max_retries=0``) so this is the only retry loop and
every attempt goes through the rate limiter.

    >>> async for attempt in request_retrying(max_attempts=6, max_wait_s=60):
    ...     with attempt:
    ...         answer = await call(request)   # raises RequestFailed
"""

from __future__ import annotations

import asyncio
import email.utils
import time
from typing import Any

import httpx
import openai
from tenacity import AsyncRetrying, retry_if_exception, retry_if_exception_type, stop_after_attempt
from tenacity.wait import wait_base, wait_random_exponential

from ..errors import CapstreamError, Failure, InvalidAnswer, RequestFailed

_FATAL_STATUSES = {401, 402, 403, 404, 405}
_TRANSIENT_STATUSES = {408, 409, 425, 429}


def transient_status(status: int) -> bool:
    """Whether an HTTP status says "try again": 408, 409, 425, 429 and every 5xx (the Hub's too)."""
    return status in _TRANSIENT_STATUSES or status >= 500


def status_of(exc: BaseException) -> int | None:
    """HTTP status of a failed request, from the SDK's error or any error carrying a response."""
    status = getattr(exc, "status_code", None)
    if isinstance(status, int):
        return status
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def connection_refused(exc: BaseException) -> bool:
    """Whether ``exc`` was raised from a refused connection (a ``ConnectionRefusedError`` anywhere
    in the errors it was raised from or while handling: httpcore raises its own "from None"). The
    SDK's aiohttp transport reports one as ``APITimeoutError("Request timed out.")``. capstream's
    own errors are translations made on purpose: not read through."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen and not isinstance(exc, CapstreamError):
        if isinstance(exc, ConnectionRefusedError):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def classify(exc: BaseException) -> Failure:
    """Decide what a failed request means for the run."""
    if isinstance(exc, RequestFailed):
        return exc.failure
    if connection_refused(exc):
        return Failure.REFUSED
    if isinstance(exc, (openai.APIConnectionError, httpx.TransportError, asyncio.TimeoutError, ConnectionError)):
        return Failure.TRANSIENT  # includes openai.APITimeoutError (a subclass of APIConnectionError)
    status = status_of(exc)
    return status_failure(status) if status is not None else Failure.ROW


def status_failure(status: int) -> Failure:
    """What an HTTP error status means for the run (a reply's, or a Batch API line's)."""
    if transient_status(status):
        return Failure.TRANSIENT
    if status in _FATAL_STATUSES:
        return Failure.FATAL
    return Failure.ROW


def retry_after_s(exc: BaseException) -> float | None:
    """Seconds the server asked us to wait (``retry-after-ms``, then ``Retry-After``), if any."""
    if isinstance(exc, RequestFailed):
        return exc.retry_after_s
    return retry_after_from_headers(getattr(getattr(exc, "response", None), "headers", None))


def retry_after_from_headers(headers: Any) -> float | None:
    """Seconds a response's headers ask to wait (``retry-after-ms``, then ``Retry-After``: seconds
    or an HTTP date), if any; ``headers``: any case-insensitive mapping (httpx's, aiohttp's)."""
    if not headers:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)  # an HTTP date
    except (TypeError, ValueError):  # neither seconds nor a date: as if the server had not said
        return None
    return max(0.0, when.timestamp() - time.time())


class wait_retry_after(wait_base):
    """Wait what the server asked for when it said (capped at ``max_wait_s``), else ``fallback``."""

    def __init__(self, fallback: wait_base, max_wait_s: float):
        self.fallback = fallback
        self.max_wait_s = max_wait_s

    def __call__(self, retry_state: Any) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        asked = retry_after_s(exc) if exc is not None else None
        if asked is not None:
            return min(asked, self.max_wait_s)
        return self.fallback(retry_state)


def is_transient(exc: BaseException) -> bool:
    return classify(exc) in (Failure.TRANSIENT, Failure.REFUSED)


def request_retrying(*, max_attempts: int, max_wait_s: float, initial_wait_s: float = 0.5, sleep=None,
                     before_sleep=None) -> AsyncRetrying:
    """The tenacity policy for model requests: only transient failures, jittered exponential backoff
    (``before_sleep(retry_state)``: told of each attempt tried again)."""
    kwargs = {"sleep": sleep} if sleep is not None else {}
    if before_sleep is not None:
        kwargs["before_sleep"] = before_sleep
    return AsyncRetrying(
        stop=stop_after_attempt(max_attempts),
        wait=wait_retry_after(wait_random_exponential(multiplier=initial_wait_s, max=max_wait_s), max_wait_s),
        retry=retry_if_exception(is_transient),
        reraise=True,
        **kwargs,
    )


def invalid_answer_retrying(*, max_attempts: int) -> AsyncRetrying:
    """Asking again when an answer does not match the prompt's schema: at once, up to ``max_attempts``."""
    return AsyncRetrying(stop=stop_after_attempt(max_attempts), retry=retry_if_exception_type(InvalidAnswer), reraise=True)
