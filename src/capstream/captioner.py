"""Captioning one image, and the batched map function built on it.

``Captioner(config)`` is the public building block: a callable usable as

    >>> captioner = Captioner({"model": {"provider": "mock"}})
    >>> ds = ds.map(captioner, batched=True, input_columns=["image"])   # adds caption + error

Inside an event loop, ``captioner.session()`` gives a ``CaptionSession`` that owns everything bound
to that loop (the chat model's HTTP client, the rate-limit buckets, the concurrency semaphore);
``await session.caption(image, row)`` prepares the image off the loop once, then asks each prompt:
an identical request in flight or an answer bought before (the response cache) is re-used, else it
waits for a slot and for the rate limits, sends with retries and checks the answer against the
prompt's schema. It returns a ``RowResult`` (results.py). Errors of the row become data; a failure
that would hit every row raises ``RunStopped``.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence
from urllib.parse import urlsplit

from langchain_core.language_models import BaseChatModel

from .answers import RecentAnswers, ResponseCache, content_key, default_cache_dir
from .config import Config, redact_url, resolve_config
from .errors import ConfigError, Failure, RequestFailed, RowError, RunStopped
from .images import PreparedImage, load_image_bytes, prepare_image
from .limits import RateLimits
from .model_call import Answer, ImageRequest, ModelCall
from .models import (OPENAI_COMPATIBLE, api_key, async_http_client, build_chat_model, check_model_config,
                     shares_default_http_client, with_http_client)
from .prices import check_cost_settings, image_rule, sent_size
from .prompts import InvalidAnswer, Prompt, compile_prompts
from .results import PromptAnswer, RowResult, Stats, output_columns, row_result
from .retry import invalid_answer_retrying, request_retrying
from .workers import WorkerPool


def endpoint_label(config: Config) -> str:
    """Provider and host, without credentials or path, for messages and the dataset card."""
    if not config.model.base_url:
        return config.model.provider
    host = urlsplit(config.model.base_url).hostname or "?"
    port = urlsplit(config.model.base_url).port
    return f"{config.model.provider} at {host}{f':{port}' if port else ''}"


class NotSent(Exception):
    """The session is stopping: this row's request was not sent (it stays to do)."""


@dataclass(frozen=True)
class _PromptAsk:
    identity: dict[str, Any]  # the content key's fixed part
    options: dict[str, Any]  # per-request model parameters (response_format, temperature, max_tokens)
    max_tokens: int | None


def _llm_identity(llm: Any) -> str:
    """What identifies a chat model given in code, the same in every run: the string LangChain's own
    response cache keys it by (class and parameters, secrets as placeholders). ``repr`` is only the
    fallback: it names client objects by memory address, so it differs between runs."""
    try:
        return llm._get_llm_string()
    except Exception:  # not a LangChain chat model, or one whose parameters do not serialise
        return repr(llm)


class CaptionSession:
    """Everything bound to one event loop; create with ``Captioner.session()`` inside that loop."""

    def __init__(self, captioner: "Captioner", base_dir: str | None = None):
        cfg = captioner.config
        self.base_dir = base_dir
        self.config = cfg
        self.prompts = captioner.prompts
        # Our own HTTP client per session (so per loop): the SDK's default one is cached process-wide
        # and bound to the first loop that uses it. So does a model given in code that would use it.
        llm, self._http = captioner.llm, None
        if shares_default_http_client(llm) if llm is not None else cfg.model.provider in OPENAI_COMPATIBLE:
            self._http = async_http_client(cfg.model.timeout_s)
        if llm is None:
            llm = build_chat_model(cfg.model, self._http)
        elif self._http is not None:
            llm = with_http_client(llm, self._http)
        self.call: ModelCall | WorkerPool = ModelCall(llm)
        if cfg.run.workers > 1:  # more processes send requests; limits and retries stay here
            self.call = WorkerPool(cfg.model, processes=cfg.run.workers - 1, local=self.call)
        self.limits = RateLimits(cfg.limits.requests_per_minute, cfg.limits.tokens_per_minute)
        self.slots = asyncio.Semaphore(cfg.limits.max_concurrency)
        self.prep_pool = captioner.prep_pool
        self.stats = Stats()
        self.stopping = asyncio.Event()  # set: requests not yet sent are not sent
        self.before_send: Callable[[], None] = lambda: None  # may raise RunStopped (cost.BudgetGuard)
        self._output_budget = cfg.model.max_tokens or 300
        self._secret = api_key(cfg.model) if captioner.llm is None else None
        self._sent_size = sent_size(cfg.image, cfg.model.name)  # image.max_side and max_tokens_per_image
        self._image_rule = image_rule(cfg.model.name)  # looked up once, not per request
        # Answers bought earlier (the cache) or earlier in this run, and requests in flight, by
        # content key: identical requests are paid once. The mock provider is free: nothing to keep.
        keep = cfg.run.cache and cfg.model.provider != "mock"
        self.bought = ResponseCache(cfg.run.cache_dir or default_cache_dir()) if keep else RecentAnswers()
        self._in_flight: dict[str, asyncio.Future] = {}
        # Set to a dict by a caller that writes the rows out (the engine): image files the rows name
        # by path only (a Hub repo's images), as read to prepare them, for the shard writer to embed
        # (and drop) instead of downloading them again.
        self.files_read: dict[str, bytes] | None = None
        asked_of = self._model_identity() if captioner.llm is None else {"llm": _llm_identity(captioner.llm)}
        # What decides each prompt's answers apart from its rendered text and the image, computed
        # once here rather than per request: the cache key's fixed part, the request's options.
        self._asks = {p.name: _PromptAsk({**asked_of, **p.identity(), "detail": cfg.image.detail},
                                         p.request_options(), dict(p.options).get("max_tokens"))
                      for p in self.prompts}

    def _model_identity(self) -> dict[str, Any]:
        m = self.config.model
        return {"provider": m.provider, "model": m.name, "endpoint": redact_url(m.base_url) if m.base_url else None,
                "api_version": m.api_version, "temperature": m.temperature, "max_tokens": m.max_tokens}

    async def prepare(self, value: Any) -> tuple[PreparedImage, str]:
        """The image as sent, and the SHA-256 of its bytes (prepared off the event loop)."""
        img = self.config.image

        def prepare_and_hash() -> tuple[PreparedImage, str]:
            source = value
            by_path = isinstance(value, Mapping) and not value.get("bytes") and value.get("path")
            if by_path and self.files_read is not None:
                source = load_image_bytes(value, base_dir=self.base_dir)
                self.files_read[value["path"]] = source
            image = prepare_image(source, max_side=img.max_side, quality=img.quality, base_dir=self.base_dir,
                                  target_size=self._sent_size)
            return image, hashlib.sha256(image.data).hexdigest()

        return await asyncio.get_running_loop().run_in_executor(self.prep_pool, prepare_and_hash)

    def estimated_tokens(self, image: PreparedImage, text: str, system: str | None, max_tokens: int | None = None) -> int:
        """Tokens one request counts against a tokens-per-minute limit (input + max output); the image
        counted by the model's rule, as ``capstream estimate`` and the token budget count it."""
        image_part = self._image_rule.tokens(image.width, image.height, self.config.image.detail)
        return image_part + (len(text) + len(system or "")) // 4 + 10 + (max_tokens or self._output_budget)

    async def caption(self, value: Any, row: dict[str, Any] | None = None, *,
                      known: dict[str, PromptAnswer] | None = None,
                      record: Callable[[str, PromptAnswer], None] | None = None) -> RowResult:
        """Ask every prompt about one image; row failures come back as data, run-stopping ones raise.

        ``row``: the row's other columns, for ``{column}`` placeholders. ``known``: answers already
        received (by prompt name), not asked again. ``record(prompt_name, answer)`` is called with
        each new answer the moment it is there (the engine logs it).
        """
        answers = dict(known or {})
        todo = [p for p in self.prompts if p.name not in answers]
        if todo:
            try:
                image, digest = await self.prepare(value)
            except RowError as err:
                image = None
                for prompt in todo:
                    answers[prompt.name] = PromptAnswer(error=err.as_text())
                    if record is not None:
                        record(prompt.name, answers[prompt.name])
            if image is not None and len(todo) == 1:  # the common case, without a task per prompt
                answers[todo[0].name] = await self._answer(todo[0], image, digest, row or {}, record)
            elif image is not None:
                outcomes = await asyncio.gather(*(self._answer(p, image, digest, row or {}, record) for p in todo),
                                                return_exceptions=True)
                stopped = [o for o in outcomes if isinstance(o, BaseException)]
                if stopped:  # a run-stopping failure outranks a request left unsent
                    raise next((o for o in stopped if not isinstance(o, NotSent)), stopped[0])
                answers.update({p.name: o for p, o in zip(todo, outcomes)})
        result = row_result(self.prompts, answers)
        self.stats.add(result, tokens=False)
        return result

    async def _answer(self, prompt: Prompt, image: PreparedImage, digest: str, row: dict[str, Any],
                      record: Callable[[str, PromptAnswer], None] | None) -> PromptAnswer:
        """One prompt's answer: from a request in flight, from the answers bought, or asked now."""
        text, system = prompt.render(row)
        ask = self._asks[prompt.name]
        key = content_key({**ask.identity, "text": text, "system": system}, digest)
        if key in self._in_flight:
            answer = await asyncio.shield(self._in_flight[key])
            answer = PromptAnswer(answer.value, answer.error, source="dedup")
        elif (value := self.bought.get(key)) is not None:
            answer = PromptAnswer(value, source="cache")
        else:
            shared = self._in_flight[key] = asyncio.get_running_loop().create_future()
            try:
                request = ImageRequest(text, system, image.data_url(), self.config.image.detail, ask.options)
                answer = await self._ask(prompt, request, self.estimated_tokens(image, text, system, ask.max_tokens))
                shared.set_result(answer)
            except asyncio.CancelledError:
                shared.cancel()
                raise
            except BaseException as err:  # rows waiting on this request raise the same (NotSent, RunStopped)
                shared.set_exception(err)
                shared.exception()  # marked retrieved: no "never retrieved" warning when nobody waited
                raise
            finally:
                del self._in_flight[key]
            if answer.ok:
                self.bought.put(key, answer.value, input_tokens=answer.input_tokens, output_tokens=answer.output_tokens)
        if answer.source != "request":
            self.stats.reused[answer.source] += 1
        if record is not None:
            record(prompt.name, answer)
        return answer

    async def _ask(self, prompt: Prompt, request: ImageRequest, tokens: int) -> PromptAnswer:
        """Send (with retries), and ask again while the answer does not match the prompt's schema."""
        paid = [0, 0]

        async def send_and_parse() -> Any:
            answer = await self._send(request, tokens)
            paid[0] += answer.input_tokens
            paid[1] += answer.output_tokens
            return prompt.parse(answer.text)

        try:
            if prompt.schema is None:  # free text is never rejected: no second (tenacity) loop per request
                value = await send_and_parse()
            else:
                async for attempt in invalid_answer_retrying(max_attempts=self.config.retry.invalid_answer_attempts):
                    with attempt:
                        value = await send_and_parse()
        except InvalidAnswer as bad:
            raw = bad.raw if len(bad.raw) <= 2000 else bad.raw[:2000] + "..."
            return PromptAnswer(error=self._scrub(f"InvalidAnswer: {bad.reason}; raw answer: {raw}"),
                                input_tokens=paid[0], output_tokens=paid[1])
        except RequestFailed as failed:
            # A server may echo part of the key in its message: never let it reach a file or a log.
            error = self._scrub(failed.as_row_error())
            if failed.failure is Failure.FATAL:
                raise RunStopped(f"{endpoint_label(self.config)} refused model {self.config.model.name!r}: {error}") from None
            if failed.failure is Failure.TRANSIENT:
                raise RunStopped(f"{endpoint_label(self.config)} still failing after "
                                 f"{self.config.retry.max_attempts} attempts: {error}") from None
            return PromptAnswer(error=error, input_tokens=paid[0], output_tokens=paid[1])
        return PromptAnswer(value, None, paid[0], paid[1])

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
                    # Counted now, before the slot is free: the budget check of the next request sees it.
                    self.stats.input_tokens += answer.input_tokens
                    self.stats.output_tokens += answer.output_tokens
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
        self.bought.close()

    def _scrub(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text


class Captioner:
    """The batched map function: ``ds.map(Captioner(cfg), batched=True)`` adds the prompts' columns
    and the error column (with ``input_columns=[image_col]`` it gets the images only, which is
    enough unless a prompt has ``{column}`` placeholders).

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
        self.prompts = compile_prompts(self.config)
        self.prep_pool = ThreadPoolExecutor(self.config.run.prep_threads, thread_name_prefix="capstream-prep")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._session: CaptionSession | None = None
        self._lock = threading.Lock()

    def session(self, base_dir: str | None = None) -> CaptionSession:
        """A new session bound to the running event loop (``base_dir``: where relative image paths point)."""
        return CaptionSession(self, base_dir)

    async def acaption(self, images: Sequence[Any], session: CaptionSession | None = None,
                       rows: Sequence[dict[str, Any]] | None = None) -> list[RowResult]:
        """Caption a batch concurrently on the running loop, results in input order (``rows``: each
        image's row, for ``{column}`` placeholders)."""
        rows = rows if rows is not None else [None] * len(images)
        own = session is None
        session = session or self.session()
        try:
            return list(await asyncio.gather(*(session.caption(v, r) for v, r in zip(images, rows))))
        finally:
            if own:
                await session.aclose()

    def __call__(self, batch: Sequence[Any] | dict[str, list]) -> dict[str, list]:
        if isinstance(batch, dict):  # ds.map(captioner, batched=True): every column of the batch
            images = batch[self.config.dataset.image_column]
            rows = [{name: values[i] for name, values in batch.items()} for i in range(len(images))]
        else:
            images, rows = list(batch), None
        results = self._run(self.acaption(list(images), self._loop_session(), rows))
        return self.output_columns(results)

    def output_columns(self, results: Sequence[RowResult]) -> dict[str, list]:
        """The prompts' columns and the error column for these results."""
        return output_columns(self.prompts, self.config.output.error_column, results)

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
