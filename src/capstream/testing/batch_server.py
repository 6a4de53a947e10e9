"""A fake OpenAI Files + Batches API on 127.0.0.1, with the chat server's answers and fault knobs.

``FakeBatchOpenAI`` is a ``FakeOpenAI`` (the same ``/v1/chat/completions``, the same answers, the same
knobs: ``reply``, ``status_for``, ``finish_reason``, ``latency``, ``api_key``...) that also speaks
what the ``openai`` SDK's ``files`` and ``batches`` resources use:

* ``POST /v1/files`` (multipart, purpose ``batch``), ``GET /v1/files/{id}/content``;
* ``POST /v1/batches``, ``GET /v1/batches/{id}``, ``GET /v1/batches`` (newest first, ``limit``,
  ``after``), ``POST /v1/batches/{id}/cancel``.

A batch moves through ``validating``, ``in_progress``, ``finalizing`` and ``completed`` (``step_s``
in each); each line is answered by posting its body to this server's own chat endpoint, so a line
gets exactly the answer (or the forced status) an online request with that body gets. The output
file holds the 200 lines, the error file the others and the lines not done.

Knobs (plain attributes, may change while it runs): ``step_s``; ``expire_after`` (a batch expires
after that many lines: the rest are ``batch_expired``; ``expire_batches``: how many batches do,
None: all); ``token_limit_refusals`` (the next N batches fail validation with
``token_limit_exceeded``); ``max_unfinished`` (a batch created while that many are unfinished fails
so too); ``refuse_code`` (the next batch fails validation with this code); ``hold`` (a set of
steps that wait while named: ``upload`` after the file is stored, ``create`` after the batch is
made and before its id is answered, ``progress`` before any line is done, ``content`` before a
file is served); ``lose_create_replies`` (the next N batches are made, but their creation is
answered with a 500, as a reply lost on the way back).

Counters: ``uploads``, ``creates``, ``retrieves``, ``uploaded`` (file id -> bytes), ``batches`` (id -> ``FakeBatch``),
``submitted`` (Counter of custom_ids over every batch that went past validation), ``expired_ids``,
``failed_ids`` (lines answered with a 5xx).

    with FakeBatchOpenAI(step_s=0.05) as server:
        client = openai.OpenAI(base_url=server.url, api_key="k")
        ...
"""

from __future__ import annotations

import asyncio
import collections
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from .openai_server import FakeOpenAI

__all__ = ["FakeBatchOpenAI", "FakeBatch"]


@dataclass
class FakeBatch:
    id: str
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str]
    created_at: int
    status: str = "validating"
    errors: list[dict] = field(default_factory=list)
    output_file_id: str | None = None
    error_file_id: str | None = None
    total: int = 0
    completed: int = 0
    failed: int = 0
    cancel: bool = False
    times: dict[str, int] = field(default_factory=dict)
    custom_ids: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "object": "batch", "endpoint": self.endpoint, "input_file_id": self.input_file_id,
            "completion_window": self.completion_window, "status": self.status,
            "errors": {"object": "list", "data": self.errors} if self.errors else None,
            "output_file_id": self.output_file_id, "error_file_id": self.error_file_id,
            "created_at": self.created_at, "metadata": self.metadata,
            "request_counts": {"total": self.total, "completed": self.completed, "failed": self.failed},
            **{f"{k}_at": v for k, v in self.times.items()},
        }


class FakeBatchOpenAI(FakeOpenAI):
    """See the module's docstring."""

    thread_name = "fake-batch-openai"

    def __init__(self, *args: Any, step_s: float = 0.05, expire_after: int | None = None,
                 expire_batches: int | None = None, token_limit_refusals: int = 0, max_unfinished: int | None = None,
                 line_concurrency: int = 16, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.step_s = step_s
        self.expire_after = expire_after
        self.expire_batches = expire_batches
        self.token_limit_refusals = token_limit_refusals
        self.max_unfinished = max_unfinished
        self.refuse_code: str | None = None
        self.lose_create_replies = 0
        self.hold: set[str] = set()
        self.line_concurrency = line_concurrency
        self.uploads = 0
        self.creates = 0
        self.retrieves = 0
        self.uploaded: dict[str, bytes] = {}
        self.file_names: dict[str, str] = {}
        self.batches: dict[str, FakeBatch] = {}
        self.submitted: collections.Counter[str] = collections.Counter()
        self.expired_ids: set[str] = set()
        self.failed_ids: set[str] = set()
        self._tasks: set[asyncio.Task] = set()

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=1024 * 2**20)  # request files of up to 200 MB, and more
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/stats", self._stats)
        app.router.add_post("/v1/files", self._h_upload)
        app.router.add_get("/v1/files/{file_id}/content", self._h_content)
        app.router.add_post("/v1/batches", self._h_create)
        app.router.add_get("/v1/batches", self._h_list)
        app.router.add_get("/v1/batches/{batch_id}", self._h_retrieve)
        app.router.add_post("/v1/batches/{batch_id}/cancel", self._h_cancel)
        return app

    # -- helpers ------------------------------------------------------------------------------------

    def lines_of(self, file_id: str) -> list[dict]:
        return [json.loads(line) for line in self.uploaded[file_id].splitlines() if line.strip()]

    def unfinished(self) -> int:
        return sum(b.status in ("validating", "in_progress", "finalizing", "cancelling") for b in self.batches.values())

    async def _wait_while_held(self, step: str) -> None:
        while step in self.hold and not self._stopping.is_set():
            await asyncio.sleep(0.02)  # a test server: the test thread flips the knob

    def _unauthorized(self, request: web.Request) -> web.Response | None:
        if self.api_key is not None and request.headers.get("Authorization", "") != f"Bearer {self.api_key}":
            return self._error(401, "Incorrect API key provided.")
        return None

    def _store(self, data: bytes, name: str) -> str:
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        self.uploaded[file_id] = data
        self.file_names[file_id] = name
        return file_id

    @staticmethod
    def _file_json(file_id: str, data: bytes, name: str, purpose: str) -> dict[str, Any]:
        return {"id": file_id, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                "filename": name, "purpose": purpose, "status": "processed"}

    # -- handlers -----------------------------------------------------------------------------------

    async def _h_upload(self, request: web.Request) -> web.Response:
        if (denied := self._unauthorized(request)) is not None:
            return denied
        form = await request.post()
        upload = form.get("file")
        if upload is None or form.get("purpose") != "batch":
            return self._error(400, "expected a file with purpose batch")
        data = upload.file.read()
        file_id = self._store(data, upload.filename)
        self.uploads += 1
        await self._wait_while_held("upload")
        return web.json_response(self._file_json(file_id, data, upload.filename, "batch"))

    async def _h_content(self, request: web.Request) -> web.StreamResponse:
        if (denied := self._unauthorized(request)) is not None:
            return denied
        await self._wait_while_held("content")
        data = self.uploaded.get(request.match_info["file_id"])
        if data is None:
            return self._error(404, "No such File object")
        return web.Response(body=data, content_type="application/octet-stream")

    async def _h_create(self, request: web.Request) -> web.Response:
        if (denied := self._unauthorized(request)) is not None:
            return denied
        body = await request.json()
        if body.get("input_file_id") not in self.uploaded:
            return self._error(400, f"No such file: {body.get('input_file_id')}")
        batch = FakeBatch(f"batch_{uuid.uuid4().hex[:24]}", body["input_file_id"], body.get("endpoint", ""),
                          body.get("completion_window", ""), dict(body.get("metadata") or {}), int(time.time()))
        unfinished = self.unfinished()
        self.batches[batch.id] = batch
        self.creates += 1
        task = asyncio.ensure_future(self._work(batch, request.headers.get("Authorization"), unfinished))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        await self._wait_while_held("create")
        if self.lose_create_replies > 0:
            self.lose_create_replies -= 1
            return self._error(500, "The server had an error while processing your request")
        return web.json_response(batch.to_json())

    async def _h_retrieve(self, request: web.Request) -> web.Response:
        self.retrieves += 1
        batch = self._batch_asked(request)
        return batch if isinstance(batch, web.Response) else web.json_response(batch.to_json())

    def _batch_asked(self, request: web.Request) -> FakeBatch | web.Response:
        """The batch a request names, or the error response (a bad key, no such batch)."""
        if (denied := self._unauthorized(request)) is not None:
            return denied
        batch = self.batches.get(request.match_info["batch_id"])
        return batch if batch is not None else self._error(404, "No such Batch object")

    async def _h_list(self, request: web.Request) -> web.Response:
        if (denied := self._unauthorized(request)) is not None:
            return denied
        newest_first = list(reversed(self.batches.values()))  # kept in the order they were made
        after = request.query.get("after")
        if after:
            ids = [b.id for b in newest_first]
            newest_first = newest_first[ids.index(after) + 1:] if after in ids else []
        limit = int(request.query.get("limit", "20"))
        page = newest_first[:limit]
        return web.json_response({"object": "list", "data": [b.to_json() for b in page],
                                  "first_id": page[0].id if page else None, "last_id": page[-1].id if page else None,
                                  "has_more": len(newest_first) > limit})

    async def _h_cancel(self, request: web.Request) -> web.Response:
        batch = self._batch_asked(request)
        if isinstance(batch, web.Response):
            return batch
        if batch.status in ("validating", "in_progress", "finalizing"):
            batch.cancel = True
            batch.status = "cancelling"
            batch.times["cancelling"] = int(time.time())
        return web.json_response(batch.to_json())

    # -- a batch's life -----------------------------------------------------------------------------

    async def _work(self, batch: FakeBatch, auth: str | None, unfinished_before: int) -> None:
        try:
            await self._sleep(self.step_s)
            if self._refused(batch, unfinished_before):
                return
            lines = self.lines_of(batch.input_file_id)
            batch.total = len(lines)
            batch.custom_ids = [line["custom_id"] for line in lines]
            self.submitted.update(batch.custom_ids)
            if not batch.cancel:
                batch.status = "in_progress"
            batch.times["in_progress"] = int(time.time())
            await self._wait_while_held("progress")
            expire_after = self.expire_after
            if expire_after is not None and self.expire_batches is not None:
                if self.expire_batches <= 0:
                    expire_after = None
                else:
                    self.expire_batches -= 1
            outputs, errors = await self._answer(batch, lines, auth, expire_after)
            if not batch.cancel:
                batch.status = "finalizing"
                batch.times["finalizing"] = int(time.time())
            await self._sleep(self.step_s)
            if outputs:
                batch.output_file_id = self._store(_jsonl(outputs), f"{batch.id}_output.jsonl")
            if errors:
                batch.error_file_id = self._store(_jsonl(errors), f"{batch.id}_error.jsonl")
            expired = any((e.get("error") or {}).get("code") == "batch_expired" for e in errors)
            batch.status = "cancelled" if batch.cancel else ("expired" if expired else "completed")
            batch.times[batch.status] = int(time.time())
        except Exception as err:  # a bug of the fake: a failed batch that says so
            batch.status, batch.errors = "failed", [{"code": "fake_server_error", "message": repr(err)}]

    def _refused(self, batch: FakeBatch, unfinished_before: int) -> bool:
        """Validation: the knobs, then the file's lines."""
        code = message = None
        crowded = self.max_unfinished is not None and unfinished_before >= self.max_unfinished
        if self.token_limit_refusals > 0 or crowded:
            self.token_limit_refusals = max(0, self.token_limit_refusals - 1)
            code, message = "token_limit_exceeded", ("Enqueued token limit reached for fake-vlm in organization "
                                                     "org-fake. Please try again once some in_progress batches "
                                                     "have been completed.")
        elif self.refuse_code is not None:
            code, message, self.refuse_code = self.refuse_code, f"refused ({self.refuse_code})", None
        else:
            seen = set()
            for number, line in enumerate(self.uploaded[batch.input_file_id].splitlines(), start=1):
                try:
                    data = json.loads(line)
                    ok = (isinstance(data.get("body"), dict) and data.get("method") == "POST"
                          and data.get("url") == batch.endpoint and data.get("custom_id") not in seen)
                    seen.add(data.get("custom_id"))
                except ValueError:
                    ok = False
                if not ok:
                    code, message = "invalid_request", f"line {number} is not a valid request of this batch"
                    break
        if code is None:
            return False
        batch.status, batch.errors = "failed", [{"code": code, "message": message, "param": None, "line": None}]
        batch.times["failed"] = int(time.time())
        return True

    async def _answer(self, batch: FakeBatch, lines: list[dict], auth: str | None,
                      expire_after: int | None) -> tuple[list[dict], list[dict]]:
        outputs: list[dict | None] = [None] * len(lines)
        errors: list[dict | None] = [None] * len(lines)
        slots = asyncio.Semaphore(self.line_concurrency)
        url = f"http://{self.host}:{self.port}/v1/chat/completions"
        headers = {"Authorization": auth} if auth else {}
        done = 0

        async def one(i: int, line: dict) -> None:
            nonlocal done
            async with slots:
                if batch.cancel or (expire_after is not None and done >= expire_after):
                    code = "batch_cancelled" if batch.cancel else "batch_expired"
                    if code == "batch_expired":
                        self.expired_ids.add(line["custom_id"])
                    errors[i] = {"id": f"batch_req_{uuid.uuid4().hex[:16]}", "custom_id": line["custom_id"],
                                 "response": None,
                                 "error": {"code": code, "message": f"the request was not run ({code})"}}
                    return
                done += 1
                async with session.post(url, json=line["body"], headers=headers) as response:
                    status, body = response.status, await response.json()
                record = {"id": f"batch_req_{uuid.uuid4().hex[:16]}", "custom_id": line["custom_id"],
                          "response": {"status_code": status, "request_id": f"req_{uuid.uuid4().hex[:16]}",
                                       "body": body}, "error": None}
                if status == 200:
                    outputs[i] = record
                    batch.completed += 1
                else:
                    errors[i] = record
                    batch.failed += 1
                    if status >= 500:
                        self.failed_ids.add(line["custom_id"])

        async with aiohttp.ClientSession() as session:
            await asyncio.gather(*(one(i, line) for i, line in enumerate(lines)))
        return [o for o in outputs if o is not None], [e for e in errors if e is not None]


def _jsonl(records: list[dict]) -> bytes:
    return b"".join((json.dumps(r) + "\n").encode() for r in records)
