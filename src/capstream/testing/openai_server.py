"""A fake OpenAI-compatible chat-completions server for tests and benchmarks.

It speaks enough of the OpenAI HTTP API for the ``openai`` SDK and
``langchain_openai.ChatOpenAI`` to talk to it, answers vision requests with
``"image {w}x{h}"`` and can inject the faults a captioning pipeline must
survive: latency, 429s (with ``Retry-After``), 500s, dropped connections,
hung requests, arbitrary statuses, a bad API key and a server-side RPM limit.

In-process use (the server runs on its own thread and event loop, so sync
tests, async tests and subprocesses can all talk to it)::

    with FakeOpenAI(latency=0.1, p429=0.05, seed=1) as server:
        client = openai.AsyncOpenAI(base_url=server.url, api_key="test")
        ...
        server.p500 = 0.5          # knobs may be flipped at any time
        assert server.by_status[200] > 0

Script use (benchmarks, manual demos)::

    python -m capstream.testing.openai_server --port 0 --latency-lognormal 0.5 0.5 \\
        --stragglers 0.02 10 --p429 0.05

prints the base URL on the first line of stdout, serves until SIGTERM/SIGINT,
then prints a JSON line of counters to stderr.  ``GET /stats`` returns the
counters as JSON at any time.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import collections
import hashlib
import io
import json
import math
import random
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from aiohttp import web
from PIL import Image

from .loopback import LoopbackServer

__all__ = ["FakeOpenAI", "RequestInfo", "image_tokens", "lognormal_latency"]


@dataclass
class RequestInfo:
    """What the server understood of one chat-completions request.

    Passed to the ``reply`` and ``status_for`` callables.  ``width``,
    ``height`` and ``image_sha256`` describe the first image (``None`` when
    there is none; ``width``/``height`` are also ``None`` when it cannot be
    decoded, then ``image_error`` says why).
    """

    width: int | None
    height: int | None
    image_sha256: str | None
    detail: str | None
    text: str
    system: str | None
    model: str
    image_error: str | None = None
    n_images: int = 0
    body: dict | None = None


def image_tokens(width: int, height: int, detail: str | None = "auto") -> int:
    """Token cost of one image by OpenAI's published rule (gpt-4o style)."""
    if detail == "low":
        return 85
    w, h = float(width), float(height)
    if max(w, h) > 2048:
        s = 2048 / max(w, h)
        w, h = w * s, h * s
    if min(w, h) > 768:
        s = 768 / min(w, h)
        w, h = w * s, h * s
    tiles = math.ceil(w / 512) * math.ceil(h / 512)
    return 85 + 170 * tiles


def lognormal_latency(
    median: float, sigma: float, straggler_p: float = 0.0, straggler_factor: float = 1.0
) -> Callable[[random.Random], float]:
    """Return a ``latency`` knob: lognormal seconds, times ``straggler_factor``
    with probability ``straggler_p`` (e.g. ``lognormal_latency(0.5, 0.5, 0.02, 10)``)."""
    mu = math.log(median)

    def latency(rng: random.Random) -> float:
        t = rng.lognormvariate(mu, sigma) if sigma > 0 else median
        return t * straggler_factor if rng.random() < straggler_p else t

    return latency


def _default_reply(info: RequestInfo) -> str:
    if info.width is None:
        return "no image"
    return f"image {info.width}x{info.height}"


_ERROR_KIND = {  # status -> (type, code)
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_error", None),
    404: ("invalid_request_error", "model_not_found"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
}


class FakeOpenAI(LoopbackServer):
    """Fake OpenAI chat-completions server on ``127.0.0.1`` (ephemeral port).

    Knobs (plain attributes, may be changed while running; probabilities are
    drawn per request from ``random.Random(seed)``):

    ``latency``      seconds, or callable ``(rng) -> seconds``, before answering
    ``p429``         probability of 429 (``Retry-After: retry_after``, plus
                     ``retry-after-ms`` when ``retry_after_ms`` is set)
    ``p500``         probability of 500
    ``pdrop``        probability of closing the connection with no response
    ``phang``        probability of never answering (until stop() or ``hang_s``)
    ``status_for``   callable ``(RequestInfo) -> int | None`` forcing a status
    ``reply``        callable ``(RequestInfo) -> str`` replacing the answer
    ``finish_reason`` callable ``(RequestInfo) -> str | None`` replacing ``"stop"``
                     (``"length"``: the answer is cut; ``"content_filter"``: withheld)
    ``api_key``      when set, other ``Authorization: Bearer`` keys get 401
    ``rpm_limit``    sliding 60 s request limit (429 over it, x-ratelimit-* headers)

    Counters (updated under a lock; ``stats()`` gives a consistent snapshot):
    ``requests``, ``ok``, ``by_status`` (Counter; ints plus "drop"/"hang"),
    ``in_flight``, ``max_in_flight``, ``image_requests`` / ``answered_images``
    (Counters keyed by image sha256), ``prompt_tokens_total``,
    ``completion_tokens_total``, ``log`` (list of ``(time.time(), status)``).
    """

    def __init__(
        self,
        latency: float | Callable[[random.Random], float] = 0.0,
        *,
        p429: float = 0.0,
        p500: float = 0.0,
        pdrop: float = 0.0,
        phang: float = 0.0,
        seed: int | None = 0,
        reply: Callable[[RequestInfo], str] | None = None,
        finish_reason: Callable[[RequestInfo], str | None] | None = None,
        status_for: Callable[[RequestInfo], int | None] | None = None,
        api_key: str | None = None,
        rpm_limit: int | None = None,
        retry_after: str | None = "1",
        retry_after_ms: int | None = None,
        hang_s: float = 3600.0,
        model: str = "fake-vlm",
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.latency = latency
        self.p429, self.p500, self.pdrop, self.phang = p429, p500, pdrop, phang
        self.reply = reply
        self.finish_reason = finish_reason
        self.status_for = status_for
        self.api_key = api_key
        self.rpm_limit = rpm_limit
        self.retry_after = retry_after
        self.retry_after_ms = retry_after_ms
        self.hang_s = hang_s
        self.model = model
        super().__init__(host, port)
        self.rng = random.Random(seed)
        self._lock = threading.Lock()
        self._window: collections.deque[float] = collections.deque()
        self._sizes: dict[str, tuple[int, int] | str] = {}  # sha -> size or error
        self.reset_counters()

    # ------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        """Base URL for OpenAI clients, e.g. ``http://127.0.0.1:PORT/v1``."""
        return f"http://{self.host}:{self.port}/v1"

    thread_name = "fake-openai"

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/stats", self._stats)
        return app

    # ------------------------------------------------------------- counters
    def reset_counters(self) -> None:
        """Zero every counter (``in_flight`` keeps tracking live requests)."""
        with self._lock:
            self.requests = 0
            self.ok = 0
            self.by_status: collections.Counter = collections.Counter()
            self.in_flight = getattr(self, "in_flight", 0)
            self.max_in_flight = self.in_flight
            self.image_requests: collections.Counter = collections.Counter()
            self.answered_images: collections.Counter = collections.Counter()
            self.prompt_tokens_total = 0
            self.completion_tokens_total = 0
            self.log: list[tuple[float, int | str]] = []

    def stats(self) -> dict[str, Any]:
        """A JSON-able snapshot of the counters."""
        with self._lock:
            return {
                "requests": self.requests,
                "ok": self.ok,
                "by_status": {str(k): v for k, v in self.by_status.items()},
                "in_flight": self.in_flight,
                "max_in_flight": self.max_in_flight,
                "image_requests": dict(self.image_requests),
                "answered_images": dict(self.answered_images),
                "prompt_tokens_total": self.prompt_tokens_total,
                "completion_tokens_total": self.completion_tokens_total,
            }

    def _record(self, status: int | str) -> None:
        with self._lock:
            self.by_status[status] += 1
            self.log.append((time.time(), status))

    # ------------------------------------------------------------- handlers
    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": [{"id": self.model, "object": "model", "owned_by": "fake"}]}
        )

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        with self._lock:
            self.requests += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._handle(request)
        except Exception as e:  # e.g. a reply/status_for callable raised
            return self._error(500, f"Fake server error: {type(e).__name__}: {e}")
        finally:
            with self._lock:
                self.in_flight -= 1

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw)
            messages = body["messages"]
            info, images = self._parse(body, messages)
        except Exception as e:
            return self._error(400, f"Invalid request body: {e}", code="invalid_request")
        if info.image_sha256:
            with self._lock:
                self.image_requests[info.image_sha256] += 1

        with self._lock:  # all random draws in a fixed order, per request
            lat = self.latency(self.rng) if callable(self.latency) else float(self.latency or 0)
            r_hang, r_drop, r_429, r_500 = (self.rng.random() for _ in range(4))

        if lat > 0 and await self._sleep(lat):
            return self._drop(request, "drop")
        if self.api_key is not None:
            auth = request.headers.get("Authorization", "")
            if auth != f"Bearer {self.api_key}":
                return self._error(401, "Incorrect API key provided.")
        rl_headers, rl_retry = self._rate_limit()
        if rl_retry is not None:
            return self._error(429, "Rate limit reached for requests (rpm).",
                               headers={**rl_headers, "Retry-After": str(rl_retry)})
        if r_hang < self.phang:
            self._record("hang")
            await self._sleep(self.hang_s)
            return self._drop(request, None)
        if r_drop < self.pdrop:
            return self._drop(request, "drop")
        if r_429 < self.p429:
            headers = dict(rl_headers)
            if self.retry_after is not None:
                headers["Retry-After"] = str(self.retry_after)
            if self.retry_after_ms is not None:
                headers["retry-after-ms"] = str(self.retry_after_ms)
            return self._error(429, "Rate limit reached (injected).", headers=headers)
        if r_500 < self.p500:
            return self._error(500, "The server had an error (injected).", headers=rl_headers)
        status = self.status_for(info) if self.status_for else None
        if status is not None and status != 200:
            return self._error(status, f"Forced status {status}.", headers=rl_headers)
        if info.image_error is not None:
            return self._error(400, f"Invalid image: {info.image_error}",
                               code="invalid_image", headers=rl_headers)

        answer = (self.reply or _default_reply)(info)
        finish = (self.finish_reason(info) if self.finish_reason else None) or "stop"
        prompt_tokens = sum(len(t) // 4 + 4 for t in self._message_texts(messages))
        prompt_tokens += sum(image_tokens(w, h, d) for w, h, d in images)
        completion_tokens = len(answer.split())
        with self._lock:
            self.ok += 1
            self.prompt_tokens_total += prompt_tokens
            self.completion_tokens_total += completion_tokens
            if info.image_sha256:
                self.answered_images[info.image_sha256] += 1
        self._record(200)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if body.get("stream"):
            return await self._stream(request, rid, created, info.model, answer, usage,
                                      body, rl_headers, finish)
        return web.json_response({
            "id": rid, "object": "chat.completion", "created": created, "model": info.model,
            "choices": [{"index": 0, "finish_reason": finish, "logprobs": None,
                         "message": {"role": "assistant", "content": answer}}],
            "usage": usage,
        }, headers=rl_headers)

    async def _stream(self, request, rid, created, model, answer, usage, body, headers, finish="stop"):
        """Minimal SSE answer for ``stream=True`` (one content chunk)."""
        resp = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream"})
        await resp.prepare(request)
        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
        chunks = [
            {**base, "choices": [{"index": 0, "finish_reason": None,
                                  "delta": {"role": "assistant", "content": answer}}]},
            {**base, "choices": [{"index": 0, "finish_reason": finish, "delta": {}}]},
        ]
        if (body.get("stream_options") or {}).get("include_usage"):
            chunks.append({**base, "choices": [], "usage": usage})
        for c in chunks:
            await resp.write(f"data: {json.dumps(c)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    # -------------------------------------------------------------- helpers
    async def _sleep(self, seconds: float) -> bool:
        """Sleep; return True early if the server is stopping."""
        assert self._stopping is not None
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
            return True
        except asyncio.TimeoutError:
            return False

    def _drop(self, request: web.Request, key: str | None) -> web.Response:
        """Close the connection abruptly: the client sees no HTTP response."""
        if key is not None:
            self._record(key)
        if request.transport is not None:
            request.transport.abort()
        return web.Response(status=500)  # never reaches the client

    def _error(self, status: int, message: str, code: str | None = None,
               headers: dict[str, str] | None = None) -> web.Response:
        etype, default_code = _ERROR_KIND.get(
            status, ("server_error" if status >= 500 else "invalid_request_error", None))
        self._record(status)
        body = {"error": {"message": message, "type": etype, "param": None,
                          "code": code or default_code}}
        return web.json_response(body, status=status, headers=headers or {})

    def _rate_limit(self) -> tuple[dict[str, str], int | None]:
        """Apply ``rpm_limit``: (x-ratelimit headers, Retry-After seconds or None)."""
        limit = self.rpm_limit
        if not limit:
            return {}, None
        now = time.monotonic()
        with self._lock:
            while self._window and self._window[0] <= now - 60.0:
                self._window.popleft()
            allowed = len(self._window) < limit
            if allowed:
                self._window.append(now)
            reset = (self._window[0] + 60.0 - now) if self._window else 0.0
            remaining = max(0, limit - len(self._window))
        headers = {"x-ratelimit-limit-requests": str(limit),
                   "x-ratelimit-remaining-requests": str(remaining),
                   "x-ratelimit-reset-requests": f"{max(reset, 0.0):.3g}s"}
        return headers, None if allowed else max(1, math.ceil(reset))

    @staticmethod
    def _message_texts(messages: list[dict]) -> list[str]:
        out = []
        for m in messages:
            c = m.get("content")
            if isinstance(c, list):
                c = "".join(p.get("text", "") for p in c if p.get("type") == "text")
            out.append(c or "")
        return out

    def _parse(self, body: dict, messages: list[dict]) -> tuple[RequestInfo, list]:
        """Build the RequestInfo and list of (w, h, detail) of decodable images."""
        texts, system, first, images = [], None, None, []
        for m in messages:
            role, content = m.get("role"), m.get("content")
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content or []
            for p in parts:
                if p.get("type") == "text":
                    if role in ("system", "developer"):
                        system = (system or "") + p.get("text", "")
                    elif role == "user":
                        texts.append(p.get("text", ""))
                elif p.get("type") == "image_url":
                    iu = p.get("image_url")
                    url, detail = (iu, None) if isinstance(iu, str) else (iu.get("url", ""), iu.get("detail"))
                    sha, size = self._decode(url)
                    if isinstance(size, tuple):
                        images.append((size[0], size[1], detail))
                    if first is None:
                        first = (sha, size, detail)
        sha, size, detail = first if first else (None, None, None)
        ok = isinstance(size, tuple)
        info = RequestInfo(
            width=size[0] if ok else None, height=size[1] if ok else None,
            image_sha256=sha, detail=detail, text="".join(texts), system=system,
            model=body.get("model") or self.model,
            image_error=None if first is None or ok else size,
            n_images=len(images), body=body,
        )
        return info, images

    def _decode(self, url: str) -> tuple[str | None, tuple[int, int] | str]:
        """(sha256 of the data-URL bytes, (w, h) or an error string)."""
        if not url.startswith("data:") or "," not in url:
            return None, "only base64 data URLs are supported"
        try:
            data = base64.b64decode(url.split(",", 1)[1], validate=False)
        except (binascii.Error, ValueError) as e:
            return None, f"bad base64: {e}"
        sha = hashlib.sha256(data).hexdigest()
        cached = self._sizes.get(sha)
        if cached is not None:
            return sha, cached
        try:
            with Image.open(io.BytesIO(data)) as img:
                size = img.size
                img.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))  # cheap JPEG decode
                img.load()  # detects truncated / corrupt data
            result: tuple[int, int] | str = (int(size[0]), int(size[1]))
        except Exception as e:
            result = f"{type(e).__name__}: {e}"
        if len(self._sizes) > 10000:
            self._sizes.clear()
        self._sizes[sha] = result
        return sha, result


def main(argv: list[str] | None = None) -> None:
    """Script entry point: serve until SIGTERM/SIGINT, then dump counters to stderr."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--latency", type=float, default=0.0, help="constant latency (s)")
    ap.add_argument("--latency-lognormal", nargs=2, type=float, metavar=("MEDIAN", "SIGMA"))
    ap.add_argument("--stragglers", nargs=2, type=float, metavar=("P", "FACTOR"), default=(0.0, 1.0))
    for knob in ("p429", "p500", "pdrop", "phang"):
        ap.add_argument(f"--{knob}", type=float, default=0.0)
    ap.add_argument("--retry-after", default="1", help="Retry-After value; 'none' for no header")
    ap.add_argument("--retry-after-ms", type=int)
    ap.add_argument("--hang-s", type=float, default=3600.0)
    ap.add_argument("--rpm-limit", type=int)
    ap.add_argument("--api-key")
    ap.add_argument("--model", default="fake-vlm")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)

    sp, sf = a.stragglers
    if a.latency_lognormal:
        latency: Any = lognormal_latency(*a.latency_lognormal, straggler_p=sp, straggler_factor=sf)
    elif sp > 0:
        latency = lambda rng, t=a.latency: t * sf if rng.random() < sp else t  # noqa: E731
    else:
        latency = a.latency
    server = FakeOpenAI(
        latency, p429=a.p429, p500=a.p500, pdrop=a.pdrop, phang=a.phang, seed=a.seed,
        api_key=a.api_key, rpm_limit=a.rpm_limit, hang_s=a.hang_s, model=a.model,
        retry_after=None if a.retry_after.lower() == "none" else a.retry_after,
        retry_after_ms=a.retry_after_ms, host=a.host, port=a.port,
    )
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    server.start()
    print(server.url, flush=True)
    while not done.wait(0.5):
        pass
    print(json.dumps(server.stats()), file=sys.stderr, flush=True)
    server.stop(timeout=2.0)


if __name__ == "__main__":
    main()
