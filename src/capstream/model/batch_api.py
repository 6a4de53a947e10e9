"""The provider's Batch API: upload a request file, create a batch, look at it, fetch its files, cancel it.

``BatchAPI(model)`` talks to ``/v1/files`` and ``/v1/batches`` through the ``openai`` SDK
(``AsyncOpenAI`` with ``model.base_url``; ``AsyncAzureOpenAI`` for Azure), the SDK's own retries off:
transient failures (429, 5xx, timeouts, dropped connections) are tried again by the one tenacity
policy of ``retry.py``. What a failure means is decided here, once: still failing after every attempt,
or refused (bad key, unknown endpoint, a file the provider will not take), the run stops
(``RunStopped``, one message, the key scrubbed). The one refusal that is not final is the enqueued-token
limit: ``create`` then returns a ``BatchState`` whose ``refusal`` is ``token_limit_exceeded`` and
the caller waits, as it does for a batch that failed validation for that reason.

    >>> api = BatchAPI(config.model, max_attempts=6, max_wait_s=60)
    >>> file_id = await api.upload(Path("requests-000001.jsonl"))
    >>> state = await api.create(file_id, completion_window="24h", metadata={"capstream_run": "..."})
    >>> state = await api.retrieve(state.id)                # validating, in_progress, ..., completed
    >>> await api.download(state.output_file_id, Path("out.jsonl"))
    >>> await api.aclose()
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator

from ..errors import Failure, RunStopped
from .call import translate
from .retry import request_retrying
from .sending import describe_refusal
from .settings import ModelConfig

TOKEN_LIMIT = "token_limit_exceeded"  # the enqueued-token limit: wait for batches in flight, then again
DONE = frozenset({"completed", "failed", "expired", "cancelled"})  # a batch in these states changes no more
RUNNING = frozenset({"validating", "in_progress", "finalizing"})  # may still be cancelled
WITH_RESULTS = DONE - {"failed"}  # done, with output and error files to collect (failed: refused whole)
TRANSFER_TIMEOUT_S = 600.0  # uploading or downloading a file of up to 200 MB


@dataclass(frozen=True)
class BatchState:
    """What the provider says of one batch (``openai.types.Batch``, the fields a run reads)."""

    id: str
    status: str  # validating, in_progress, finalizing, completed, failed, expired, cancelling, cancelled
    created_at: float = 0.0
    output_file_id: str | None = None
    error_file_id: str | None = None
    total: int = 0
    completed: int = 0
    failed: int = 0
    metadata: dict[str, str] = field(default_factory=dict)
    errors: tuple[tuple[str | None, str | None], ...] = ()  # (code, message) of a batch that failed validation

    @property
    def done(self) -> bool:
        return self.status in DONE

    @property
    def refusal(self) -> str | None:
        """Why the provider refused the batch as a whole (``failed``): the code of its first error."""
        if self.status != "failed":
            return None
        return next((code for code, _ in self.errors if code), "failed")

    def refusal_text(self) -> str:
        return "; ".join(f"{code}: {message}" if code else str(message) for code, message in self.errors) or self.status

    @classmethod
    def of(cls, batch: Any) -> "BatchState":
        counts = getattr(batch, "request_counts", None)
        errors = getattr(getattr(batch, "errors", None), "data", None) or []
        return cls(batch.id, batch.status, float(batch.created_at or 0), batch.output_file_id, batch.error_file_id,
                   int(getattr(counts, "total", 0) or 0), int(getattr(counts, "completed", 0) or 0),
                   int(getattr(counts, "failed", 0) or 0), dict(batch.metadata or {}),
                   tuple((e.code, e.message) for e in errors))

    @classmethod
    def refused(cls, code: str, message: str) -> "BatchState":
        """A create the provider answered with a refusal instead of a batch."""
        return cls("", "failed", errors=((code, message),))


def request_line(custom_id: str, url: str, body_json: bytes) -> bytes:
    """One line of a request file (the OpenAI batch format), ``body_json`` being the JSON of the body."""
    return b'{"custom_id": %s, "method": "POST", "url": %s, "body": %s}\n' % (
        json.dumps(custom_id).encode(), json.dumps(url).encode(), body_json)


@dataclass(frozen=True)
class ResultLine:
    """One line of a batch's output or error file (or of a result file put back by hand): the
    request's ``custom_id``, and the response's HTTP status and body, or the error that kept the
    request from being sent (``batch_expired``, ``batch_cancelled``, ...)."""

    custom_id: str
    status: int | None = None
    body: dict[str, Any] | None = None
    error_code: str | None = None
    error_message: str | None = None

    @classmethod
    def parse(cls, line: bytes | str) -> "ResultLine | None":
        """The line read; None for one that is not a result line (blank, cut short, no custom_id)."""
        try:
            data = json.loads(line)
        except ValueError:
            return None
        if not isinstance(data, dict) or not isinstance(data.get("custom_id"), str):
            return None
        response = data.get("response") if isinstance(data.get("response"), dict) else {}
        body = response.get("body") if isinstance(response.get("body"), dict) else None
        error = data.get("error") if isinstance(data.get("error"), dict) else None
        if error is None and body is not None and isinstance(body.get("error"), dict):
            error = body["error"]  # a refused request: its status, and the API's error object as its body
        status = response.get("status_code")
        return cls(data["custom_id"], status if isinstance(status, int) else None, body,
                   error.get("code") if error else None, error.get("message") if error else None)


def read_result_lines(path: Path) -> Iterator[ResultLine]:
    """The result lines of one file, in order."""
    try:
        with open(path, "rb") as f:
            for line in f:
                parsed = ResultLine.parse(line)
                if parsed is not None:
                    yield parsed
    except OSError as err:
        raise RunStopped(f"cannot read {path}: {err.strerror or err}") from None


class BatchAPI:
    """The Files and Batches endpoints of ``model``'s provider; open and close on one event loop."""

    def __init__(self, model: ModelConfig, *, max_attempts: int, max_wait_s: float):
        import openai

        common: dict[str, Any] = {"api_key": model.api_key() or "not-needed", "max_retries": 0,
                                  "timeout": max(model.timeout_s, TRANSFER_TIMEOUT_S)}
        if model.provider == "azure":
            self.client = openai.AsyncAzureOpenAI(azure_endpoint=model.base_url, api_version=model.api_version,
                                                  **common)
            self.endpoint = "/chat/completions"  # Azure's batch lines and batches name it so
        else:
            self.client = openai.AsyncOpenAI(base_url=model.base_url, **common)
            self.endpoint = "/v1/chat/completions"
        self.refusal = describe_refusal(model)
        self.max_attempts = max_attempts
        self.max_wait_s = max_wait_s

    async def upload(self, path: Path) -> str:
        """Upload a request file (purpose ``batch``); its file id."""
        uploaded = await self._call(f"the upload of {path.name}", self.client.files.create, file=path, purpose="batch")
        return uploaded.id

    async def create(self, file_id: str, *, completion_window: str, metadata: dict[str, str],
                     identity: dict[str, str]) -> BatchState:
        """Create a batch of the uploaded file; a refused ``BatchState`` for the enqueued-token limit.

        A failed attempt may still have made the batch (only its answer lost): before each attempt
        after the first, the batches whose metadata holds ``identity`` are looked for, and the one
        found is returned instead of making a second batch of the same requests."""
        since = time.time() - 3600  # the provider's clock may differ from ours

        async def create_once(attempt: int) -> BatchState:
            if attempt > 1 and (found := await self.find(identity, since=since)):
                return await self.adopt(found)
            return BatchState.of(await self.client.batches.create(
                input_file_id=file_id, endpoint=self.endpoint, completion_window=completion_window, metadata=metadata))

        try:
            return await self._retrying_numbered(create_once)
        except RunStopped:
            raise
        except Exception as exc:
            if getattr(exc, "code", None) == TOKEN_LIMIT:  # the error's code, not its text
                return BatchState.refused(TOKEN_LIMIT, self.refusal.scrub(str(getattr(exc, "message", exc))))
            raise self._stopped("a new batch", exc) from None

    async def retrieve(self, batch_id: str) -> BatchState:
        return BatchState.of(await self._call(f"batch {batch_id}", self.client.batches.retrieve, batch_id))

    async def cancel(self, batch_id: str) -> BatchState:
        return BatchState.of(await self._call(f"cancelling batch {batch_id}", self.client.batches.cancel, batch_id))

    async def find(self, metadata: dict[str, str], *, since: float) -> list[BatchState]:
        """The batches created since ``since`` (unix seconds) whose metadata holds ``metadata``: those a
        run created but was killed before it could record (the list is newest first)."""
        async def listed() -> list[BatchState]:
            found = []
            async for batch in self.client.batches.list(limit=100):
                if float(batch.created_at or 0) < since:
                    break
                state = BatchState.of(batch)
                if all(state.metadata.get(k) == v for k, v in metadata.items()):
                    found.append(state)
            return found

        return await self._call("the list of batches", listed)

    async def download(self, file_id: str, dest: Path) -> None:
        """A batch's output or error file, streamed to ``dest`` (written whole, then renamed into place)."""
        part = dest.with_name(dest.name + ".part")

        async def fetch() -> None:
            async with self.client.files.with_streaming_response.content(file_id) as response:
                try:
                    with open(part, "wb") as f:
                        async for block in response.iter_bytes():
                            f.write(block)
                        f.flush()
                        os.fsync(f.fileno())
                    os.replace(part, dest)
                except OSError as err:  # the disk, not the network: not tried again
                    raise RunStopped(f"cannot write {dest}: {err.strerror or err}") from None

        await self._call(f"file {file_id}", fetch)

    async def aclose(self) -> None:
        await self.client.close()

    async def _call(self, what: str, fn: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Any:
        """``fn`` with transient failures tried again; any other failure stops the run."""
        try:
            return await self._retrying(fn, *args, **kwargs)
        except RunStopped:
            raise
        except Exception as exc:
            raise self._stopped(what, exc) from None

    async def adopt(self, found: list[BatchState]) -> BatchState:
        """The batch to keep of those made of one request file (``find``'s list, newest first): the
        oldest; any other is cancelled, so that no request is paid for twice."""
        for extra in found[:-1]:
            if extra.status in RUNNING:
                await self.cancel(extra.id)
        return found[-1]

    async def _retrying(self, fn: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Any:
        return await self._retrying_numbered(lambda attempt: fn(*args, **kwargs))

    async def _retrying_numbered(self, fn: Callable[[int], Awaitable[Any]]) -> Any:
        """``fn(attempt number)`` with transient failures tried again (``model/retry``'s policy)."""
        async for attempt in request_retrying(max_attempts=self.max_attempts, max_wait_s=self.max_wait_s):
            with attempt:
                return await fn(attempt.retry_state.attempt_number)
        raise AssertionError("unreachable: tenacity reraises the last error")

    def _stopped(self, what: str, exc: BaseException) -> RunStopped:
        """What stops the run when a call failed for good (translated once, ``call.translate``)."""
        failed = translate(exc)
        text = self.refusal.scrub(failed.as_row_error())
        if failed.failure is Failure.TRANSIENT:
            return RunStopped(f"{self.refusal.endpoint} still failing after {self.max_attempts} attempts at "
                              f"{what}: {text}")
        return RunStopped(f"{self.refusal.endpoint} refused {what}: {text}")


__all__ = ["BatchAPI", "BatchState", "ResultLine", "request_line", "read_result_lines", "TOKEN_LIMIT", "DONE",
           "RUNNING", "WITH_RESULTS"]
