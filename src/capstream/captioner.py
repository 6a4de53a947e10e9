"""The batched map function: ``Captioner(config)``, a callable usable as

    >>> captioner = Captioner({"model": {"provider": "mock"}})
    >>> ds = ds.map(captioner, batched=True)                            # adds caption + error
    >>> ds = ds.map(captioner, batched=True, input_columns=["image"])   # the images only: no {column} placeholders

Given whole batches (no ``input_columns``: a ``dict``, or datasets' ``LazyBatch``), it reads the
image column and the columns the prompts' ``{column}`` placeholders name; given the image column
alone, a prompt with a placeholder is refused (``ConfigError`` naming the column), never sent with
empty text.

Each call runs the batch on a private event loop in a background thread (so it works from plain
scripts and from notebooks alike) through a ``CaptionSession`` (``row/session.py``) that lives as
long as the Captioner, so the HTTP client and the rate-limit buckets are reused across map batches.
Inside an event loop of your own, ``captioner.session()`` gives a session bound to it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Sequence

from langchain_core.language_models import BaseChatModel

from .config import Config, resolve_config
from .errors import ConfigError
from .row.results import RowResult, output_columns
from .row.session import CaptionSession
from .setup import session_spec


class Captioner:
    """The batched map function: ``ds.map(Captioner(cfg), batched=True)`` adds the prompts' columns
    and the error column (with ``input_columns=[image_col]`` it gets the images only, which is
    enough unless a prompt has ``{column}`` placeholders: those are refused then).

    ``llm`` takes any LangChain chat model instead of the one ``config.model`` describes (the SDK's
    own retries should be off on it; this class retries). Each call runs the batch on a private event
    loop in a background thread, so it works from plain scripts and from notebooks alike.
    """

    def __init__(self, config: Config | dict | str | None = None, *, llm: BaseChatModel | None = None):
        self.config = resolve_config(config)  # checked when it was made
        self.llm = llm
        self.spec = session_spec(self.config, llm)  # checks the key
        self.prompts = self.spec.prompts
        self.prep_pool = ThreadPoolExecutor(self.config.run.prep_threads, thread_name_prefix="capstream-prep")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._session: CaptionSession | None = None
        self._lock = threading.Lock()

    def session(self, base_dir: str | None = None) -> CaptionSession:
        """A new session bound to the running event loop (``base_dir``: where relative image paths point)."""
        return self.spec.open(prep_pool=self.prep_pool, llm=self.llm, base_dir=base_dir)

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

    def __call__(self, batch: Sequence[Any] | Mapping[str, list], *more_columns: Sequence[Any]) -> dict[str, list]:
        images, rows = self._batch_rows(batch, more_columns)
        results = self._run(self.acaption(images, self._loop_session(), rows))
        return self.output_columns(results)

    def _batch_rows(self, batch: Any, more_columns: tuple) -> tuple[list[Any], list[dict[str, Any]] | None]:
        """The batch's images and, for ``{column}`` placeholders, each row's columns they read.
        ``ds.map(captioner, batched=True)`` passes every column (a dict, or a ``LazyBatch`` from
        ``Dataset.map``); with ``input_columns=[image_column]`` the images alone."""
        placeholders = sorted({name for prompt in self.prompts for name in prompt.placeholders})
        image_column = self.config.dataset.image_column
        if more_columns:
            raise ConfigError(f"Captioner: given {1 + len(more_columns)} input_columns; give it the image column alone "
                              f"(input_columns=[{image_column!r}]) or whole batches (no input_columns)")
        if not isinstance(batch, Mapping):
            if placeholders:
                raise ConfigError(f"prompt placeholder {{{placeholders[0]}}}: the map function was given only the "
                                  f"images (input_columns); give it whole batches (no input_columns) so that it "
                                  f"reads column {placeholders[0]!r}")
            return list(batch), None
        if image_column not in batch:
            raise ConfigError(f"dataset.image_column: no column {image_column!r} in the batch "
                              f"(columns: {', '.join(batch)})")
        missing = [name for name in placeholders if name not in batch]
        if missing:
            raise ConfigError(f"prompt placeholder {{{missing[0]}}}: no column {missing[0]!r} in the batch "
                              f"(columns: {', '.join(batch)})")
        images = list(batch[image_column])
        columns = {name: batch[name] for name in placeholders}  # read once: a LazyBatch formats on access
        return images, [{name: values[i] for name, values in columns.items()} for i in range(len(images))]

    def output_columns(self, results: Sequence[RowResult]) -> dict[str, list]:
        """The prompts' columns and the error column for these results (and, with ``output.metadata``,
        each prompt's metadata columns)."""
        return output_columns(self.prompts, self.config.output.error_column, results,
                              metadata=self.config.output.metadata)

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
