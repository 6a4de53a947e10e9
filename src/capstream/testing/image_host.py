"""A fake image host on 127.0.0.1 that answers as a CDN does, with the faults a URL dataset brings.

It serves the images it holds by path, after a latency (a constant or a callable such as
``openai_server.lognormal_latency(0.2, 0.5)``: CDN-like), honours ``Range`` requests (206 with
``Content-Range``), and can answer 404 for some paths, 503 to the first GET of others, send
``X-Robots-Tag`` opt-outs, redirect, or cut a body short once. It counts every request by path
(``requests``) and by ``User-Agent``, so a test can check that an image was fetched once, twice
(a retry), or never (a refused URL).

    >>> with FakeImageHost({"/a.jpg": jpeg_bytes}, latency=0.05, fail_first={"/a.jpg"}) as host:
    ...     url = host.url("/a.jpg")      # http://127.0.0.1:PORT/a.jpg
    ...     ...                           # first GET: 503, then the image
    ...     assert host.requests["/a.jpg"] == 2
"""

from __future__ import annotations

import asyncio
import collections
import random
import re
import threading
from typing import Callable, Mapping

from aiohttp import web

from .loopback import LoopbackServer

__all__ = ["FakeImageHost"]

_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")
_TYPES = {b"\xff\xd8": "image/jpeg", b"\x89P": "image/png", b"RI": "image/webp", b"GI": "image/gif"}


class FakeImageHost(LoopbackServer):
    """Images by path, served with knobs (every knob may be changed while it runs):

    ``latency``: seconds before the answer (a float, or ``rng -> seconds``); ``missing``: paths
    answered 404 (any unknown path is too); ``fail_first``: paths whose first GET is answered 503
    (``retry_after``: its ``Retry-After``, None for none); ``drop_first``: paths whose first GET
    is cut off half-way through the body; ``opt_out``: path -> ``X-Robots-Tag`` value;
    ``redirects``: path -> ``Location`` (302); ``content_types``: path -> ``Content-Type``
    (default: from the bytes' signature); ``ranges``: honour ``Range`` (False: always 200);
    ``hide_length``: answer a range with ``Content-Range: bytes a-b/*`` (the file's length unsaid).

    Counters: ``requests`` (path -> requests received), ``ranged`` (path -> requests with a
    ``Range``), ``user_agents``, ``by_status``, ``max_in_flight``.
    """

    thread_name = "fake-image-host"

    def __init__(self, images: Mapping[str, bytes] | None = None, *,
                 latency: float | Callable[[random.Random], float] = 0.0, missing: set[str] = frozenset(),
                 fail_first: set[str] = frozenset(), drop_first: set[str] = frozenset(),
                 opt_out: Mapping[str, str] | None = None, redirects: Mapping[str, str] | None = None,
                 content_types: Mapping[str, str] | None = None, retry_after: str | None = None,
                 ranges: bool = True, hide_length: bool = False, seed: int = 0, host: str = "127.0.0.1",
                 port: int = 0):
        super().__init__(host, port)
        self.images = dict(images or {})
        self.latency = latency
        self.missing, self.fail_first, self.drop_first = set(missing), set(fail_first), set(drop_first)
        self.opt_out = dict(opt_out or {})
        self.redirects = dict(redirects or {})
        self.content_types = dict(content_types or {})
        self.retry_after = retry_after
        self.ranges, self.hide_length = ranges, hide_length
        self.rng = random.Random(seed)
        self._lock = threading.Lock()
        self.reset_counters()

    def url(self, path: str) -> str:
        """The URL of ``path`` on this host (``/a.jpg`` -> ``http://127.0.0.1:PORT/a.jpg``)."""
        return f"http://{self.host}:{self.port}{path}"

    def reset_counters(self) -> None:
        with self._lock:
            self.requests: collections.Counter = collections.Counter()
            self.ranged: collections.Counter = collections.Counter()
            self.user_agents: collections.Counter = collections.Counter()
            self.by_status: collections.Counter = collections.Counter()
            self.in_flight = 0
            self.max_in_flight = 0

    def stats(self) -> dict:
        """A JSON-able snapshot of the counters."""
        with self._lock:
            return {"requests": dict(self.requests), "ranged": dict(self.ranged),
                    "user_agents": dict(self.user_agents), "by_status": {str(k): v for k, v in self.by_status.items()},
                    "max_in_flight": self.max_in_flight}

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/stats", self._stats)
        app.router.add_get("/{tail:.*}", self._get)
        return app

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def _get(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        with self._lock:
            self.requests[path] += 1
            first = self.requests[path] == 1
            if "Range" in request.headers:
                self.ranged[path] += 1
            self.user_agents[request.headers.get("User-Agent", "")] += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            delay = self.latency(self.rng) if callable(self.latency) else self.latency
        try:
            if delay > 0:
                await asyncio.sleep(delay)
            response = await self._answer(request, path, first)
        finally:
            with self._lock:
                self.in_flight -= 1
        with self._lock:
            self.by_status[response.status] += 1
        return response

    async def _answer(self, request: web.Request, path: str, first: bool) -> web.StreamResponse:
        if path in self.redirects:
            return web.Response(status=302, headers={"Location": self.redirects[path]})  # as given, even if bad
        data = self.images.get(path)
        if data is None or path in self.missing:
            return web.Response(status=404, text="not found")
        if first and path in self.fail_first:
            headers = {"Retry-After": self.retry_after} if self.retry_after is not None else {}
            return web.Response(status=503, text="try again", headers=headers)
        headers = {"Content-Type": self.content_types.get(path) or _TYPES.get(data[:2], "application/octet-stream"),
                   "Accept-Ranges": "bytes" if self.ranges else "none"}
        if path in self.opt_out:
            headers["X-Robots-Tag"] = self.opt_out[path]
        status, body = 200, data
        wanted = _RANGE.match(request.headers.get("Range", "").strip()) if self.ranges else None
        if wanted:
            start, end = _byte_range(wanted, len(data))
            if start >= len(data) or start > end:
                return web.Response(status=416, headers={"Content-Range": f"bytes */{len(data)}"})
            status, body = 206, data[start:end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{'*' if self.hide_length else len(data)}"
        if first and path in self.drop_first:
            return await self._cut_short(request, status, headers, body)
        return web.Response(status=status, body=body, headers=headers)

    async def _cut_short(self, request: web.Request, status: int, headers: dict, body: bytes) -> web.StreamResponse:
        response = web.StreamResponse(status=status, headers={**headers, "Content-Length": str(len(body))})
        await response.prepare(request)
        await response.write(body[: len(body) // 2])
        request.transport.close()  # a dropped connection, mid-body
        return response


def _byte_range(wanted: re.Match, size: int) -> tuple[int, int]:
    """``bytes=a-b``, ``bytes=a-`` or ``bytes=-n`` as (first, last) byte positions within ``size``."""
    first, last = wanted.group(1), wanted.group(2)
    if not first:  # the last n bytes
        return max(0, size - int(last or 0)), size - 1
    return int(first), min(size - 1, int(last)) if last else size - 1
