"""A row as a batch run asks about it: its requests built without sending, its answers read from a batch.

``BatchRows`` is the Batch API's counterpart of ``CaptionSession``, made of the same parts
(``SessionSpec``): ``plan(image, row, known)`` prepares the row's image once as an online run does
(``ImagePreparer``: the same sizes, detail and re-encoding), serves each prompt from the answers
bought before (the response cache, the same content keys) or builds the JSON body the chat model
would send for it (LangChain builds it: ``chat_models.request_body``); ``read(prompt, line)`` turns a
batch's result line into the answer, read as the online path reads a reply (``response_message``,
``answer_of``, ``Prompt.read``, the same provenance), or says why the line must go into a later batch.

    >>> rows = BatchRows.open(spec, prep_pool=pool)
    >>> planned = await rows.plan(item.image, item.row, item.known)
    >>> planned.answers            # prompt name -> answer without a request (cache, unusable image)
    >>> planned.asks[0].body_json  # the request body, as bytes of JSON
    >>> outcome = rows.read("caption", ResultLine(...), attempts=1)
    >>> await rows.aclose()
"""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from ..errors import (
    ConfigError,
    Failure,
    FilteredAnswer,
    InvalidAnswer,
    RequestFailed,
    RowError,
    TruncatedAnswer,
)
from ..model.batch_api import ResultLine
from ..model.call import Answer, answer_of
from ..model.chat_models import build_chat_model, build_messages, can_build_bodies, request_body, response_message
from ..model.retry import status_failure
from ..model.sending import Refusal, describe_refusal
from .cache import RecentAnswers, ResponseCache
from .images import PreparedImage
from .prompts import Prompt
from .results import PromptAnswer, Provenance
from .session import ImagePreparer, PromptAsk, SessionSpec, answer_error

if TYPE_CHECKING:
    from langchain_core.language_models import BaseChatModel


@dataclass(frozen=True)
class PlannedAsk:
    """One request of a row for a batch: its prompt, its content key, its body (JSON bytes) and the
    tokens it is expected to cost (input as ``capstream estimate`` counts it, output at its cap)."""

    prompt: str
    prompt_index: int
    key: str
    body_json: bytes
    input_tokens: int
    output_tokens: int


@dataclass
class PlannedRow:
    """A row's prompts still to ask: answered without a request (``answers``) or to send (``asks``)."""

    answers: dict[str, PromptAnswer]
    asks: list[PlannedAsk]


@dataclass(frozen=True)
class LineOutcome:
    """What one result line gives: the answer, or why the request must go into a later batch
    (``again``: ``"HTTP 500"``, ``"batch_expired"``, ``"InvalidAnswer"``...; then ``answer`` is what
    it would be if it may not: the error, with the tokens this line paid)."""

    answer: PromptAnswer
    again: str | None = None
    invalid: bool = False  # asked again because the answer does not match the prompt's schema
    stops_run: str | None = None  # the provider refused the model or the key: why the run stops (asked again later)


class BatchRows:
    """Rows of a batch run; see the module's docstring. Use from one event loop."""

    def __init__(self, prompts: tuple[Prompt, ...], images: ImagePreparer, llm: "BaseChatModel",
                 bought: ResponseCache | RecentAnswers, asks: dict[str, PromptAsk], *, output_budget: int,
                 refusal: Refusal, body_model: str | None = None):
        self.prompts = {p.name: p for p in prompts}
        self.order = tuple(p.name for p in prompts)
        self.images = images
        self.llm = llm
        self.bought = bought
        self.asks = asks
        self.output_budget = output_budget
        self.refusal = refusal
        self.body_model = body_model  # Azure: each line names its deployment

    @classmethod
    def open(cls, spec: SessionSpec, *, prep_pool: Executor, base_dir: str | None = None) -> "BatchRows":
        """The batch rows of a run's ``SessionSpec`` (the model built from ``spec.model``, never sent to)."""
        llm = build_chat_model(spec.model)
        if not can_build_bodies(llm):
            raise ConfigError(f"run.backend: batch: the {type(llm).__name__} chat model cannot build request bodies")
        images = ImagePreparer(spec.image, spec.model, prep_pool, base_dir=base_dir)
        return cls(spec.prompts, images, llm, spec.open_bought(), spec.prompt_asks(),
                   output_budget=spec.model.max_tokens or 300, refusal=describe_refusal(spec.model),
                   body_model=spec.model.name if spec.model.provider == "azure" else None)

    async def plan(self, value: Any, row: dict[str, Any], todo: Sequence[str]) -> PlannedRow:
        """The row's prompts named in ``todo``: from the answers bought before, or requests to send."""
        if not todo:
            return PlannedRow({}, [])
        try:
            image, digest = await self.images.prepare(value)
        except RowError as err:
            return PlannedRow({name: PromptAnswer(error=err.as_text()) for name in todo}, [])
        answers: dict[str, PromptAnswer] = {}
        to_build = []
        for name in todo:
            text, system = self.prompts[name].render(row)
            key = self.asks[name].key(text, system, digest)
            if (bought := self.bought.get_answer(key)) is not None:
                answers[name] = PromptAnswer(bought.value, source="cache", provenance=bought.provenance)
            else:
                to_build.append((name, key, text, system))
        if not to_build:
            return PlannedRow(answers, [])
        loop = asyncio.get_running_loop()
        asks = await loop.run_in_executor(self.images.pool, self._build, image, to_build)
        return PlannedRow(answers, asks)

    def _build(self, image: PreparedImage, to_build: list[tuple[str, str, str, str | None]]) -> list[PlannedAsk]:
        """The requests' bodies (CPU: the image's base64 and JSON), off the event loop."""
        url = image.data_url()
        asks = []
        for name, key, text, system in to_build:
            ask = self.asks[name]
            body = request_body(self.llm, build_messages(text, system, url, self.images.detail), ask.options)
            if self.body_model is not None:
                body["model"] = self.body_model
            tokens_in = self.images.input_tokens(image, text, system)
            asks.append(PlannedAsk(name, self.order.index(name), key,
                                   json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode(),
                                   tokens_in, ask.max_tokens or self.output_budget))
        return asks

    def read(self, prompt: str, line: ResultLine, *, attempts: int, paid: tuple[int, int] = (0, 0)) -> LineOutcome:
        """The answer a result line gives for ``prompt`` (``attempts``: batches the request went into,
        this one included; ``paid``: tokens earlier batches paid for it, for an answer asked again).
        A line refused for a reason that would refuse every line (bad key, no model) is to be asked
        again, with ``stops_run`` saying why the run stops once the file is collected."""
        if line.status == 200 and line.body is not None:
            return self._read_answer(self.prompts[prompt], line.body, attempts, paid)
        # No answer: an error row, or a request to send again. It is dated all the same (the log
        # keeps when each line was read: a rerun after a kill while collecting logs none twice).
        origin = Provenance(attempts=attempts, answered_at=time.time())
        if line.status is not None:
            failed = RequestFailed(status_failure(line.status), line.error_message or f"HTTP {line.status}",
                                   line.status)
            error = PromptAnswer(error=self.refusal.scrub(failed.as_row_error()), input_tokens=paid[0],
                                 output_tokens=paid[1], provenance=origin)
            if failed.failure is Failure.TRANSIENT:
                return LineOutcome(error, again=f"HTTP {line.status}")
            if failed.failure is Failure.FATAL:  # not the row's fault: the rest of the file is collected first
                return LineOutcome(error, again=f"HTTP {line.status}", stops_run=(
                    f"{self.refusal.endpoint} refused model {self.refusal.model!r} in a batch: {error.error}"))
            return LineOutcome(error)
        code = line.error_code or "not_answered"
        text = f"BatchError: {code}" + (f": {line.error_message}" if line.error_message else "")
        return LineOutcome(PromptAnswer(error=self.refusal.scrub(text), input_tokens=paid[0], output_tokens=paid[1],
                                        provenance=origin), again=code)

    def _read_answer(self, prompt: Prompt, body: dict[str, Any], attempts: int, paid: tuple[int, int]) -> LineOutcome:
        try:
            answer = answer_of(response_message(self.llm, body))
        except Exception as err:  # a body that is not a chat completion: the row's, as a bad reply is
            return LineOutcome(PromptAnswer(error=f"ModelError: unreadable answer in a batch: {type(err).__name__}: "
                                                  f"{err}", input_tokens=paid[0], output_tokens=paid[1],
                                            provenance=Provenance(attempts=attempts, answered_at=time.time())))
        tokens = (paid[0] + answer.input_tokens, paid[1] + answer.output_tokens)
        origin = _provenance(answer, attempts)
        try:
            value = prompt.read(answer.text, answer.finish_reason)
        except (InvalidAnswer, TruncatedAnswer, FilteredAnswer) as bad:  # an answer, not a usable one
            error = PromptAnswer(error=self.refusal.scrub(answer_error(bad)), input_tokens=tokens[0],
                                 output_tokens=tokens[1], provenance=origin)
            invalid = isinstance(bad, InvalidAnswer)
            return LineOutcome(error, again="InvalidAnswer" if invalid else None, invalid=invalid)
        return LineOutcome(PromptAnswer(value, None, tokens[0], tokens[1], provenance=origin))

    def keep(self, key: str, answer: PromptAnswer) -> None:
        """A good answer bought through a batch goes into the answers bought (the response cache)."""
        if answer.ok:
            self.bought.put(key, answer.value, input_tokens=answer.input_tokens, output_tokens=answer.output_tokens,
                            provenance=answer.provenance)

    async def aclose(self) -> None:
        """Close the answers bought and the downloads' connections; call on the loop that planned."""
        self.bought.close()
        await self.images.aclose()


def _provenance(answer: Answer, attempts: int) -> Provenance:
    """As ``session.provenance``; a batch line has no latency of its own."""
    return Provenance(answer.model, answer.finish_reason, None, attempts, time.time())


__all__ = ["BatchRows", "PlannedRow", "PlannedAsk", "LineOutcome"]
