"""Captioning one image, and the batched map function built on it.

``Captioner(config)`` is the public building block: a callable usable as

    >>> captioner = Captioner({"model": {"provider": "mock"}})
    >>> ds = ds.map(captioner, batched=True, input_columns=["image"])   # adds caption + error

Inside an event loop, ``captioner.session()`` gives a ``CaptionSession`` that owns everything bound
to that loop (the chat model's HTTP client, the rate-limit buckets, the concurrency semaphore);
``await session.caption(image)`` prepares the image off the loop, waits for a slot and for the
rate limits, sends with retries, and returns a ``RowResult``. Errors of the row become data; a
failure that would hit every row raises ``RunStopped``.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence
from urllib.parse import urlsplit

from langchain_core.language_models import BaseChatModel

from .config import Config, resolve_config
from .errors import ConfigError, Failure, RequestFailed, RowError, RunStopped
from .images import PreparedImage, prepare_image
from .limits import RateLimits
from .model_call import Answer, ImageRequest, ModelCall
from .models import OPENAI_COMPATIBLE, api_key, async_http_client, build_chat_model, check_model_config
from .prices import check_cost_settings, image_tokens, sent_size
from .retry import request_retrying
from .workers import WorkerPool


@dataclass
class RowResult:
    """What one row gets: a caption or an error (``"<Kind>: <message>"``), and the tokens it cost."""

    caption: str | None = None
    error: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class Stats:
    """Running totals of one session (or one run)."""

    rows: int = 0
    ok: int = 0
    errors: Counter = field(default_factory=Counter)
    requests: int = 0
    retries: int = 0
    worker_requests: int = 0  # attempts sent from worker processes (run.workers > 1)
    input_tokens: int = 0
    output_tokens: int = 0

    def add(self, result: RowResult) -> None:
        self.rows += 1
        self.input_tokens += result.input_tokens
        self.output_tokens += result.output_tokens
        if result.ok:
            self.ok += 1
        else:
            self.errors[result.error.split(":", 1)[0]] += 1

    def as_counts(self) -> dict:
        return {"rows": self.rows, "ok": self.ok, "errors": dict(self.errors),
                "input_tokens": self.input_tokens, "output_tokens": self.output_tokens}


def endpoint_label(config: Config) -> str:
    """Provider and host, without credentials or path, for messages and the dataset card."""
    if not config.model.base_url:
        return config.model.provider
    host = urlsplit(config.model.base_url).hostname or "?"
    port = urlsplit(config.model.base_url).port
    return f"{config.model.provider} at {host}{f':{port}' if port else ''}"


class NotSent(Exception):
    """The session is stopping: this row's request was not sent (it stays to do)."""


class CaptionSession:
    """Everything bound to one event loop; create with ``Captioner.session()`` inside that loop."""

    def __init__(self, captioner: "Captioner", base_dir: str | None = None):
        cfg = captioner.config
        self.base_dir = base_dir
        self.config = cfg
        # Our own HTTP client per session (so per loop): the SDK's default one is cached process-wide
        # and bound to the first loop that uses it.
        self._http = None
        if captioner.llm is None and cfg.model.provider in OPENAI_COMPATIBLE:
            self._http = async_http_client(cfg.model.timeout_s)
        llm = captioner.llm if captioner.llm is not None else build_chat_model(cfg.model, self._http)
        self.call: ModelCall | WorkerPool = ModelCall(llm)
        if cfg.run.workers > 1:  # more processes send requests; limits and retries stay here
            self.call = WorkerPool(cfg.model, processes=cfg.run.workers - 1, local=self.call)
        self.limits = RateLimits(cfg.limits.requests_per_minute, cfg.limits.tokens_per_minute)
        self.slots = asyncio.Semaphore(cfg.limits.max_concurrency)
        self.prep_pool = captioner.prep_pool
        self.stats = Stats()
        self.stopping = asyncio.Event()  # set: requests not yet sent are not sent
        self.before_send: Callable[[], None] = lambda: None  # may raise RunStopped (cost.BudgetGuard)
        self._text_tokens = (len(cfg.prompt.text) + len(cfg.prompt.system or "")) // 4 + 10
        self._output_budget = cfg.model.max_tokens or 300
        self._secret = api_key(cfg.model) if captioner.llm is None else None
        self._sent_size = sent_size(cfg.image, cfg.model.name)  # image.max_side and max_tokens_per_image

    async def prepare(self, value: Any) -> PreparedImage:
        img = self.config.image
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self.prep_pool, lambda: prepare_image(value, max_side=img.max_side, quality=img.quality,
                                                  base_dir=self.base_dir, target_size=self._sent_size)
        )

    def estimated_tokens(self, image: PreparedImage) -> int:
        """Tokens one request counts against a tokens-per-minute limit (input + max output); the image
        counted by the model's rule, as ``capstream estimate`` and the token budget count it."""
        image_part = image_tokens(self.config.model.name, image.width, image.height, self.config.image.detail)
        return image_part + self._text_tokens + self._output_budget

    async def caption(self, value: Any) -> RowResult:
        """Caption one image value; row failures come back as data, run-stopping ones raise."""
        try:
            image = await self.prepare(value)
        except RowError as err:
            return self._count(RowResult(error=err.as_text()))
        prompt = self.config.prompt
        request = ImageRequest(prompt.text, prompt.system, image.data_url(), self.config.image.detail)
        try:
            answer = await self._send(request, self.estimated_tokens(image))
        except RequestFailed as failed:
            # A server may echo part of the key in its message: never let it reach a file or a log.
            error = self._scrub(failed.as_row_error())
            if failed.failure is Failure.FATAL:
                raise RunStopped(f"{endpoint_label(self.config)} refused model {self.config.model.name!r}: {error}") from None
            if failed.failure is Failure.TRANSIENT:
                raise RunStopped(f"{endpoint_label(self.config)} still failing after "
                                 f"{self.config.retry.max_attempts} attempts: {error}") from None
            return self._count(RowResult(error=error))
        return self._count(RowResult(answer.text, None, answer.input_tokens, answer.output_tokens))

    async def _send(self, request: ImageRequest, tokens: int) -> Answer:
        """Send with retries; each attempt waits for a slot and the rate limits, and teaches them."""
        retrying = request_retrying(max_attempts=self.config.retry.max_attempts, max_wait_s=self.config.retry.max_wait_s)
        async for attempt in retrying:
            with attempt:
                if attempt.retry_state.attempt_number > 1:
                    self.stats.retries += 1
                async with self.slots:
                    await self.limits.acquire(tokens)
                    if self.stopping.is_set():
                        raise NotSent()
                    self.before_send()
                    self.stats.requests += 1
                    try:
                        answer = await self.call(request)
                    except RequestFailed as failed:
                        self.limits.observe(failed.headers, rate_limited=failed.status == 429)
                        raise
                    self.limits.observe(answer.headers, rate_limited=False)
                    return answer
        raise AssertionError("unreachable: tenacity reraises the last error")

    async def aclose(self) -> None:
        """Close the worker processes and the HTTP client this session opened (call on its loop)."""
        if isinstance(self.call, WorkerPool):
            self.stats.worker_requests = self.call.sent_to_workers
            await self.call.aclose()
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    def _scrub(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text

    def _count(self, result: RowResult) -> RowResult:
        self.stats.add(result)
        return result


class Captioner:
    """The batched map function: ``ds.map(Captioner(cfg), batched=True, input_columns=[image_col])``.

    ``llm`` takes any LangChain chat model instead of the one ``config.model`` describes (the SDK's
    own retries should be off on it; this class retries). Each call runs the batch on a private event
    loop in a background thread, so it works from plain scripts and from notebooks alike.
    """

    def __init__(self, config: Config | dict | str | None = None, *, llm: BaseChatModel | None = None):
        self.config = resolve_config(config)
        check_cost_settings(self.config)  # a Config built in code skipped config_from_dict's check
        self.llm = llm
        if llm is None:
            check_model_config(self.config.model)
        elif self.config.run.workers > 1:
            raise ConfigError("run.workers: worker processes build the model from config.model; "
                              "with llm= given in code, use run.workers: 1")
        self.prep_pool = ThreadPoolExecutor(self.config.run.prep_threads, thread_name_prefix="capstream-prep")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._session: CaptionSession | None = None
        self._lock = threading.Lock()

    def session(self, base_dir: str | None = None) -> CaptionSession:
        """A new session bound to the running event loop (``base_dir``: where relative image paths point)."""
        return CaptionSession(self, base_dir)

    async def acaption(self, images: Sequence[Any], session: CaptionSession | None = None) -> list[RowResult]:
        """Caption a batch concurrently on the running loop, results in input order."""
        if session is not None:
            return list(await asyncio.gather(*(session.caption(v) for v in images)))
        session = self.session()
        try:
            return list(await asyncio.gather(*(session.caption(v) for v in images)))
        finally:
            await session.aclose()

    def __call__(self, images: Sequence[Any]) -> dict[str, list]:
        results = self._run(self.acaption(list(images), self._loop_session()))
        out = self.config.output
        return {out.caption_column: [r.caption for r in results], out.error_column: [r.error for r in results]}

    # The background loop lives as long as the Captioner, so the HTTP client and buckets are reused
    # across map batches (and the rate limits hold across them).
    def _loop_session(self) -> CaptionSession:
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                threading.Thread(target=self._loop.run_forever, name="capstream-loop", daemon=True).start()
                self._session = self._run(self._make_session())
        return self._session

    async def _make_session(self) -> CaptionSession:
        return self.session()

    def _run(self, coro) -> Any:
        if self._loop is None:
            return asyncio.run(coro)
        future: Future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result()

    def __getstate__(self) -> dict:
        # datasets pickles the map function for fingerprinting and for num_proc workers.
        return {"config": self.config.model_dump(), "llm": self.llm}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["config"], llm=state["llm"])

    def close(self) -> None:
        """Release the background loop (and its HTTP client) and the image threads."""
        if self._loop is not None:
            if self._session is not None:
                self._run(self._session.aclose())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop = self._session = None
        self.prep_pool.shutdown(wait=False)
