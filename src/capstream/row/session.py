"""Captioning one row: prepare its image once, then ask each prompt.

A ``CaptionSession`` belongs to one event loop. ``await session.caption(image, row)`` prepares the
image off the loop once (``ImagePreparer``; an image URL is downloaded first, on the loop, by
``row/downloads.py``), then for each prompt: an identical request in flight
or an answer bought before (the response cache) is re-used, else the request is sent
(``model.sending.Sender``: a slot, the rate limits, retries) and the answer checked against the
prompt's schema. It returns a ``RowResult``; the row's failures come back as data, a failure that
would hit every row raises ``RunStopped``.

``SessionSpec`` is what every session of a run is made of, decided once from the config
(``setup.py``); it is plain data, so a Ray actor receives it and opens its own sessions:

    >>> spec = setup.session_spec(config)
    >>> session = spec.open(prep_pool=pool)            # inside the loop that will use it
    >>> result = await session.caption(row["image"], row)
    >>> await session.aclose()
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from ..cost.pricing import image_rule, sent_size
from ..errors import FilteredAnswer, ImageError, InvalidAnswer, NotSent, RequestFailed, RowError, TruncatedAnswer
from ..model.call import Answer, ImageRequest
from ..model.limits import RateLimits
from ..model.retry import invalid_answer_retrying
from ..model.sending import Limits, Sender, Usage, describe_refusal, open_model_call
from .cache import RecentAnswers, ResponseCache, content_key
from .downloads import ImageDownloads, RowSlots, shown_url
from .images import KeptFiles, PreparedImage, load_image_bytes, prepare_image, url_of
from .prompts import Prompt
from .results import PromptAnswer, Provenance, RowResult, row_result

if TYPE_CHECKING:
    from langchain_core.language_models import BaseChatModel

    from ..config import ImageConfig, LimitsConfig, RetryConfig
    from ..model.events import Observer
    from ..model.settings import ModelConfig

RecordAnswer = Callable[[str, PromptAnswer], None]  # (prompt name, answer): the results log's append


@dataclass(frozen=True)
class SessionSpec:
    """Everything a run's caption sessions are made of (config sections handed down, and the
    compiled prompts). ``processes``: ``run.workers``; ``cache_dir``: the response cache (None:
    answers kept in memory only)."""

    prompts: tuple[Prompt, ...]
    model: "ModelConfig"
    image: "ImageConfig"
    limits: "LimitsConfig"
    retry: "RetryConfig"
    processes: int = 1
    cache_dir: str | None = None

    def open(self, *, prep_pool: Executor, llm: "BaseChatModel | None" = None, usage: Usage | None = None,
             stopping: asyncio.Event | None = None, limits: Limits | None = None,
             before_send: Callable[[], None] | None = None, base_dir: str | None = None,
             keep_files: bool = False, keep_downloads: bool = False,
             observer: "Observer | None" = None) -> "CaptionSession":
        """A session on the running event loop. ``usage``: where it counts what it pays (a run's
        own); ``stopping``: set to send nothing more; ``limits``: a cluster's share instead of this
        process's own buckets; ``before_send``: the budget check; ``base_dir``: where relative image
        paths point; ``keep_files`` / ``keep_downloads``: keep the bytes of image files read by path /
        of images downloaded from URLs, for the shard writer; ``observer``: told of failed attempts
        and of this process's limits moving (the events log)."""
        usage = usage if usage is not None else Usage()
        sender = Sender(open_model_call(self.model, llm=llm, processes=self.processes),
                        limits if limits is not None else RateLimits(self.limits.requests_per_minute,
                                                                     self.limits.tokens_per_minute, observer=observer),
                        usage=usage, max_concurrency=self.limits.max_concurrency,
                        max_attempts=self.retry.max_attempts, max_wait_s=self.retry.max_wait_s,
                        stopping=stopping if stopping is not None else asyncio.Event(),
                        refusal=describe_refusal(self.model, llm), before_send=before_send, observer=observer)
        images = ImagePreparer(self.image, self.model, prep_pool, base_dir=base_dir, keep_files=keep_files,
                               keep_downloads=keep_downloads)
        return CaptionSession(self.prompts, images, sender, self.open_bought(), self.prompt_asks(llm),
                              self.retry.invalid_answer_attempts, output_budget=self.model.max_tokens or 300,
                              row_slots=RowSlots(self.limits.max_concurrency, self.image.download_concurrency))

    def open_bought(self) -> "ResponseCache | RecentAnswers":
        """The answers bought before: the response cache, or this run's answers only (the cache off,
        and the mock provider, which is free: nothing to keep)."""
        return ResponseCache(self.cache_dir) if self.cache_dir and self.model.provider != "mock" else RecentAnswers()

    def prompt_asks(self, llm: "BaseChatModel | None" = None) -> dict[str, "PromptAsk"]:
        """Each prompt's fixed part of its requests, by prompt name (``llm``: a model given in code)."""
        asked_of = self.model.identity() if llm is None else {"llm": _llm_identity(llm)}
        return {p.name: PromptAsk.of(p, asked_of, self.image.detail) for p in self.prompts}


def _llm_identity(llm: Any) -> str:
    """What identifies a chat model given in code, the same in every run: the string LangChain's own
    response cache keys it by (class and parameters, secrets as placeholders). ``repr`` is only the
    fallback: it names client objects by memory address, so it differs between runs."""
    try:
        return llm._get_llm_string()
    except Exception:  # not a LangChain chat model, or one whose parameters do not serialise
        return repr(llm)


@dataclass(frozen=True)
class PromptAsk:
    """What decides one prompt's answers apart from its rendered text and the image, computed once
    per session rather than per request."""

    identity: dict[str, Any]  # the content key's fixed part
    options: dict[str, Any]  # per-request model parameters (response_format, temperature, max_tokens)
    max_tokens: int | None  # the prompt's own answer cap (None: the model's)

    @classmethod
    def of(cls, prompt: Prompt, asked_of: dict[str, Any], detail: str) -> "PromptAsk":
        return cls({**asked_of, **prompt.identity(), "detail": detail}, prompt.request_options(),
                   dict(prompt.options).get("max_tokens"))

    def key(self, text: str, system: str | None, image_sha256: str) -> str:
        """The content key of this prompt asked with ``text`` and ``system`` about an image."""
        return content_key({**self.identity, "text": text, "system": system}, image_sha256)


class ImagePreparer:
    """Turns a row's image value into the payload sent, off the event loop, at the size the image
    settings and the model's token rule decide; an image URL is downloaded first, on the loop
    (``row/downloads.py``). With ``keep_files`` (``keep_downloads``), the bytes of
    image files the rows name by path only (a Hub repo's images) (of the images downloaded) are kept
    in ``files_read`` as read, for the shard writer to embed (and drop) instead of reading them again."""

    def __init__(self, image: "ImageConfig", model: "ModelConfig", pool: Executor, *, base_dir: str | None = None,
                 keep_files: bool = False, keep_downloads: bool = False):
        self.max_side, self.quality, self.detail = image.max_side, image.quality, image.detail
        self.pool = pool
        self.base_dir = base_dir
        self.keep_files, self.keep_downloads = keep_files, keep_downloads
        self.files_read: KeptFiles | None = KeptFiles() if keep_files or keep_downloads else None
        self.downloads = ImageDownloads(image)
        self._sent_size = sent_size(image, model.name)  # image.max_side and max_tokens_per_image
        self._rule = image_rule(model.name)  # looked up once, not per request

    async def prepare(self, value: Any) -> tuple[PreparedImage, str]:
        """The image as sent, and the SHA-256 of its bytes."""
        url = url_of(value)
        downloaded = await self.downloads.fetch(url) if url is not None else None  # ImageError: the row's

        def prepare_and_hash() -> tuple[PreparedImage, str]:
            source = value if downloaded is None else downloaded
            by_path = downloaded is None and isinstance(value, Mapping) and not value.get("bytes") and value.get("path")
            if by_path and self.keep_files:
                source = load_image_bytes(value, base_dir=self.base_dir)
                self.files_read.put(value["path"], source)
            try:
                image = prepare_image(source, max_side=self.max_side, quality=self.quality, base_dir=self.base_dir,
                                      target_size=self._sent_size)
            except ImageError as err:
                if url is None:
                    raise
                raise ImageError(f"{err.message}: {shown_url(url)}") from None  # which download it was
            if downloaded is not None and self.keep_downloads:
                self.files_read.put(url, downloaded)
            return image, hashlib.sha256(image.data).hexdigest()

        return await asyncio.get_running_loop().run_in_executor(self.pool, prepare_and_hash)

    async def aclose(self) -> None:
        """Close the downloads' connections; call on the loop that used it."""
        await self.downloads.aclose()

    def tokens(self, image: PreparedImage) -> int:
        """Input tokens the image counts under the model's rule (as ``capstream estimate`` counts it)."""
        return self._rule.tokens(image.width, image.height, self.detail)

    def input_tokens(self, image: PreparedImage, text: str, system: str | None) -> int:
        """Input tokens of one request about the image: its rule's, and its text's at about 4
        characters a token (the limiter's and the budget's estimate; the provider counts exactly)."""
        return self.tokens(image) + (len(text) + len(system or "")) // 4 + 10


class CaptionSession:
    """One event loop's captioning of rows; make one with ``SessionSpec.open()`` inside that loop."""

    def __init__(self, prompts: Sequence[Prompt], images: ImagePreparer, sender: Sender,
                 bought: ResponseCache | RecentAnswers, asks: dict[str, PromptAsk], invalid_answer_attempts: int, *,
                 output_budget: int, row_slots: RowSlots):
        self.prompts = tuple(prompts)
        self.images = images
        self.sender = sender
        # Answers bought earlier (the cache) or earlier in this run, and requests in flight, by
        # content key: identical requests are paid once.
        self.bought = bought
        self.asks = asks
        self.invalid_answer_attempts = invalid_answer_attempts
        self.output_budget = output_budget  # output tokens a request counts when its prompt sets no cap
        # How many rows a backend starts ahead of the request slots (more for rows downloaded from URLs).
        self.row_slots = row_slots
        self._in_flight: dict[str, asyncio.Future] = {}

    @property
    def usage(self) -> Usage:
        return self.sender.usage

    @property
    def stopping(self) -> asyncio.Event:
        return self.sender.stopping

    def estimated_tokens(self, image: PreparedImage, text: str, system: str | None, max_tokens: int | None = None) -> int:
        """Tokens one request counts against a tokens-per-minute limit (input + max output)."""
        return self.images.input_tokens(image, text, system) + (max_tokens or self.output_budget)

    async def caption(self, value: Any, row: dict[str, Any] | None = None, *,
                      known: dict[str, PromptAnswer] | None = None, record: RecordAnswer | None = None) -> RowResult:
        """Ask every prompt about one image; row failures come back as data, run-stopping ones raise.

        ``row``: the row's other columns, for ``{column}`` placeholders. ``known``: answers already
        received (by prompt name), not asked again. ``record(prompt_name, answer)`` is called with
        each new answer the moment it is there (the run logs it).
        """
        answers = dict(known or {})
        todo = [p for p in self.prompts if p.name not in answers]
        if todo:
            try:
                image, digest = await self.images.prepare(value)
            except RowError as err:
                for prompt in todo:
                    answers[prompt.name] = PromptAnswer(error=err.as_text())
                    if record is not None:
                        record(prompt.name, answers[prompt.name])
            else:
                answers.update(await self._answers(todo, image, digest, row or {}, record))
        return row_result(self.prompts, answers)

    async def _answers(self, todo: list[Prompt], image: PreparedImage, digest: str, row: dict[str, Any],
                       record: RecordAnswer | None) -> dict[str, PromptAnswer]:
        if len(todo) == 1:  # the common case, without a task per prompt
            return {todo[0].name: await self._answer(todo[0], image, digest, row, record)}
        outcomes = await asyncio.gather(*(self._answer(p, image, digest, row, record) for p in todo),
                                        return_exceptions=True)
        stopped = [o for o in outcomes if isinstance(o, BaseException)]
        if stopped:  # a run-stopping failure outranks a request left unsent
            raise next((o for o in stopped if not isinstance(o, NotSent)), stopped[0])
        return {p.name: o for p, o in zip(todo, outcomes)}

    async def _answer(self, prompt: Prompt, image: PreparedImage, digest: str, row: dict[str, Any],
                      record: RecordAnswer | None) -> PromptAnswer:
        """One prompt's answer: from a request in flight, from the answers bought, or asked now."""
        text, system = prompt.render(row)
        ask = self.asks[prompt.name]
        key = ask.key(text, system, digest)
        if key in self._in_flight:
            answer = await asyncio.shield(self._in_flight[key])
            answer = PromptAnswer(answer.value, answer.error, source="dedup", provenance=answer.provenance)
        elif (cached := self.bought.get_answer(key)) is not None:
            answer = PromptAnswer(cached.value, source="cache", provenance=cached.provenance)
        else:
            answer = await self._ask_once(prompt, ask, key, ImageRequest(text, system, image.data_url(),
                                                                        self.images.detail, ask.options),
                                          self.estimated_tokens(image, text, system, ask.max_tokens))
        if answer.source != "request":
            self.usage.count_reused(answer.source)
        if record is not None:
            record(prompt.name, answer)
        return answer

    async def _ask_once(self, prompt: Prompt, ask: PromptAsk, key: str, request: ImageRequest, tokens: int) -> PromptAnswer:
        """Ask, with rows that want the same answer meanwhile waiting on this one; keep a good answer."""
        shared = self._in_flight[key] = asyncio.get_running_loop().create_future()
        try:
            answer = await self._ask(prompt, request, tokens)
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
            self.bought.put(key, answer.value, input_tokens=answer.input_tokens, output_tokens=answer.output_tokens,
                            provenance=answer.provenance)
        return answer

    async def _ask(self, prompt: Prompt, request: ImageRequest, tokens: int) -> PromptAnswer:
        """Send, and ask again while the answer does not match the prompt's schema."""
        paid = [0, 0]
        last: list[Answer] = []

        async def send_and_read() -> Any:
            answer = await self.sender.send(request, tokens)
            paid[0] += answer.input_tokens
            paid[1] += answer.output_tokens
            last[:] = [answer]
            return prompt.read(answer.text, answer.finish_reason)

        try:
            if prompt.schema is None:  # free text is never rejected: no second (tenacity) loop per request
                value = await send_and_read()
            else:
                async for attempt in invalid_answer_retrying(max_attempts=self.invalid_answer_attempts):
                    with attempt:
                        value = await send_and_read()
        except (InvalidAnswer, TruncatedAnswer, FilteredAnswer) as bad:  # an answer, not a usable one
            return PromptAnswer(error=self.sender.refusal.scrub(answer_error(bad)), input_tokens=paid[0],
                                output_tokens=paid[1], provenance=provenance(last[0], paid))
        except RequestFailed as failed:  # this row's request was refused (Sender raised the rest)
            return PromptAnswer(error=self.sender.refusal.scrub(failed.as_row_error()),
                                input_tokens=paid[0], output_tokens=paid[1])
        return PromptAnswer(value, None, paid[0], paid[1], provenance=provenance(last[0], paid))

    async def aclose(self) -> None:
        """Close the model call (HTTP client, worker processes), the downloads and the cache; call on
        the session's loop."""
        await self.sender.aclose()
        await self.images.aclose()
        self.bought.close()


def answer_error(bad: InvalidAnswer | TruncatedAnswer | FilteredAnswer) -> str:
    """The error column's text for an answer that came but cannot be used, its raw text kept."""
    raw = bad.raw if len(bad.raw) <= 2000 else bad.raw[:2000] + "..."
    reason = bad.reason if isinstance(bad, InvalidAnswer) else bad.message
    return f"{bad.kind}: {reason}; raw answer: {raw}"


def provenance(answer: Answer, paid: Sequence[int]) -> Provenance:
    """How ``answer`` (the last of the requests its prompt needed, which paid ``paid`` input and
    output tokens together) was bought, as the results log and the output's metadata keep it."""
    return Provenance(answer.model, answer.finish_reason, answer.latency_ms, answer.attempts, time.time(),
                      paid[0], paid[1])


__all__ = ["SessionSpec", "CaptionSession", "ImagePreparer", "PromptAsk", "RecordAnswer", "answer_error", "provenance"]
