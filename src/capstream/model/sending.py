"""Sending one request as a run sends it: a slot, the rate limits, the retry policy, one attempt.

``Sender.send(request, tokens)`` waits for one of ``max_concurrency`` slots and for the rate limits
(``limits.py``, or a cluster's ``BlockLimits``), checks ``before_send`` (the budget), makes one
attempt (``ModelCall`` or a ``ProcessPool``), teaches the limits from the response, and lets
tenacity (``retry.py``) try again on transient failures. What a failure means for the run is
decided here, once: a row's failure comes back as ``RequestFailed`` (an error row); a fatal one
(bad key, unknown model) or one still failing after every attempt raises ``RunStopped``. Every
attempt and every token paid is counted in ``usage``; with an ``observer`` (``events.py``), every
failed attempt is reported as an ``AttemptFailed`` (a successful one costs nothing more).

    >>> call = open_model_call(config.model, processes=1)
    >>> sender = Sender(call, RateLimits(600), usage=Usage(), max_concurrency=16, max_attempts=6,
    ...                 max_wait_s=60, stopping=asyncio.Event(), refusal=describe_refusal(config.model))
    >>> answer = await sender.send(ImageRequest(...), tokens=1_100)
    >>> await sender.aclose()
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from langchain_core.language_models import BaseChatModel

from ..errors import Failure, NotSent, RequestFailed, RunStopped
from .call import Answer, ImageRequest, ModelCall
from .chat_models import async_http_client, build_chat_model, shares_default_http_client, with_http_client
from .events import AttemptFailed, Observer
from .processes import ProcessPool
from .retry import request_retrying
from .settings import OPENAI_COMPATIBLE, ModelConfig, redact_url


log = logging.getLogger("capstream.requests")


@dataclass
class Usage:
    """What a session's (or a run's) answers cost and where they came from."""

    requests: int = 0  # attempts sent
    retries: int = 0
    input_tokens: int = 0  # paid: the servers' own usage figures
    output_tokens: int = 0
    sent_to_processes: int = 0  # attempts made by worker processes (run.workers > 1)
    reused: Counter = field(default_factory=Counter)  # answers not bought: by source (log, dedup, cache)

    def count_attempt(self, *, retry: bool) -> None:
        self.requests += 1
        self.retries += retry

    def count_reused(self, source: str) -> None:
        self.reused[source] += 1

    def add_paid(self, input_tokens: int, output_tokens: int) -> None:
        self.input_tokens += input_tokens
        self.output_tokens += output_tokens

    def add_requests(self, other: "Usage", *, from_processes: bool = False) -> None:
        """Count ``other``'s attempts as this one's (``from_processes``: all sent by other processes)."""
        self.requests += other.requests
        self.retries += other.retries
        self.sent_to_processes += other.requests if from_processes else other.sent_to_processes


class Limits(Protocol):
    """``RateLimits`` (one process) or ``BlockLimits`` (a share of a cluster's limits)."""

    async def acquire(self, tokens: int = 0) -> None: ...

    def observe(self, headers: dict[str, str], *, rate_limited: bool) -> None: ...


@dataclass(frozen=True)
class Refusal:
    """How a request that stops the run is described: the endpoint, its URL (credentials masked)
    and the model asked for, and the variable the key came from."""

    endpoint: str
    model: str
    secret: str | None = None  # scrubbed from every message: a server may echo part of the key
    url: str | None = None
    key_env: str | None = None  # model.api_key_env, when the key was read from it

    def scrub(self, text: str) -> str:
        return text.replace(self.secret, "***") if self.secret else text

    def unauthorized(self) -> str:
        """What to check when the endpoint answers 401."""
        if self.key_env:
            return f"the key sent came from the environment variable {self.key_env} (model.api_key_env)"
        return "no key was sent from capstream's config: set model.api_key_env to the variable holding one"


def open_model_call(model: ModelConfig, *, llm: BaseChatModel | None = None, processes: int = 1) -> ModelCall | ProcessPool:
    """The model call of one event loop. It gets its own HTTP client: the SDK's default one is cached
    process-wide and bound to the first loop that uses it, and so is a model given in code that
    would use it. ``processes`` > 1 adds that many - 1 worker processes (built from ``model``)."""
    http = None
    if shares_default_http_client(llm) if llm is not None else model.provider in OPENAI_COMPATIBLE:
        http = async_http_client(model.timeout_s)
    if llm is None:
        llm = build_chat_model(model, http)
    elif http is not None:
        llm = with_http_client(llm, http)
    call = ModelCall(llm, owns=http)
    return ProcessPool(model, processes=processes - 1, local=call) if processes > 1 else call


class Sender:
    """Sends requests for one event loop; see the module's docstring."""

    def __init__(self, call: ModelCall | ProcessPool, limits: Limits, *, usage: Usage, max_concurrency: int,
                 max_attempts: int, max_wait_s: float, stopping: asyncio.Event, refusal: Refusal,
                 before_send: Callable[[], None] | None = None, observer: Observer | None = None):
        self.call = call
        self.limits = limits
        self.usage = usage
        self.slots = asyncio.Semaphore(max_concurrency)
        self.max_attempts = max_attempts
        self.max_wait_s = max_wait_s
        self.stopping = stopping  # set: requests not yet sent are not sent (NotSent)
        self.refusal = refusal
        self.before_send = before_send or (lambda: None)  # may raise RunStopped (cost.meter.BudgetGuard)
        self.reached = False  # the endpoint has answered (anything, errors included) at least once
        self.observer = observer  # told of each failed attempt (the run's events log)

    async def send(self, request: ImageRequest, tokens: int) -> Answer:
        """The answer; ``RequestFailed`` when the row's request is refused; ``RunStopped`` when the
        failure would hit every row; ``NotSent`` when the sender is stopping."""
        try:
            return await self._send_with_retries(request, tokens)
        except RequestFailed as failed:
            if failed.failure is Failure.ROW:
                raise
            error = self.refusal.scrub(failed.as_row_error())
            if failed.failure is Failure.FATAL:
                hint = f"; {self.refusal.unauthorized()}" if failed.status == 401 else ""
                raise RunStopped(f"{self.refusal.endpoint} refused model {self.refusal.model!r}: {error}{hint}") from None
            raise RunStopped(f"{self.refusal.endpoint} still failing after {self.max_attempts} attempts: "
                             f"{error}") from None

    async def _send_with_retries(self, request: ImageRequest, tokens: int) -> Answer:
        """Each attempt waits for a slot and the rate limits, and teaches them."""
        async for attempt in request_retrying(max_attempts=self.max_attempts, max_wait_s=self.max_wait_s,
                                              before_sleep=self._log_retry):
            with attempt:
                async with self.slots:
                    await self.limits.acquire(tokens)
                    if self.stopping.is_set():
                        raise NotSent()
                    self.before_send()
                    number = attempt.retry_state.attempt_number
                    self.usage.count_attempt(retry=number > 1)
                    started = time.monotonic()
                    try:
                        answer = await self.call(request)
                    except RequestFailed as failed:
                        self.limits.observe(failed.headers, rate_limited=failed.status == 429)
                        if self.observer is not None:
                            tried_again = failed.failure is Failure.TRANSIENT or (
                                failed.failure is Failure.REFUSED and self.reached)
                            self.observer(AttemptFailed(failed.status, failed.failure.value, number,
                                                        retried=tried_again and number < self.max_attempts))
                        if failed.failure is Failure.REFUSED and not self.reached:
                            raise RunStopped(f"nothing is listening at {self.refusal.url or self.refusal.endpoint}: "
                                             "connection refused (is the server running, at that address?)") from None
                        self.reached = self.reached or failed.status is not None
                        raise
                    self.reached = True
                    self.limits.observe(answer.headers, rate_limited=False)
                    # Counted now, before the slot is free: the budget check of the next request sees it.
                    self.usage.add_paid(answer.input_tokens, answer.output_tokens)
                    return dataclasses.replace(answer, latency_ms=round((time.monotonic() - started) * 1000),
                                               attempts=number)
        raise AssertionError("unreachable: tenacity reraises the last error")

    def _log_retry(self, state: Any) -> None:
        """INFO (``--log-file``): each failed attempt that is tried again, and when."""
        log.info("attempt %d failed (%s); trying again in %.1f s", state.attempt_number,
                 self.refusal.scrub(str(state.outcome.exception())), state.next_action.sleep)

    async def aclose(self) -> None:
        """Close the model call (its HTTP client, its worker processes); call on the sender's loop."""
        if isinstance(self.call, ProcessPool):
            self.usage.add_requests(Usage(sent_to_processes=self.call.sent_to_processes))
        await self.call.aclose()


def describe_refusal(model: ModelConfig, llm: Any = None) -> Refusal:
    """The ``Refusal`` of a run whose model ``model`` describes (``llm``: a model given in code)."""
    if llm is not None:
        return Refusal(model.endpoint_label(), model.name, url=_llm_url(llm))
    key = model.api_key()
    return Refusal(model.endpoint_label(), model.name, key, model.endpoint_url(),
                   model.api_key_env if key is not None else None)


def _llm_url(llm: Any) -> str | None:
    """The URL a chat model given in code sends to, where LangChain's OpenAI models say it."""
    url = getattr(llm, "openai_api_base", None) or getattr(llm, "azure_endpoint", None)
    return redact_url(url) if isinstance(url, str) else None


__all__ = ["Usage", "Limits", "Refusal", "Sender", "open_model_call", "describe_refusal"]
