"""An aiohttp server on 127.0.0.1 running on its own thread and event loop, for the fake servers.

Subclasses give ``make_app()``; tests and subprocesses reach the server at ``host:port`` (port 0
picks a free one). ``stopping`` is set on ``stop()``, so handlers that hang can end.

    with MyFake() as server:      # started, listening
        ...                       # server.port is the real port
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from aiohttp import web


class LoopbackServer:
    thread_name = "loopback-server"
    shutdown_timeout_s = 1.0

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.host, self.port = host, port
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._stopping: asyncio.Event | None = None

    def make_app(self) -> web.Application:
        raise NotImplementedError

    def start(self) -> Any:
        """Start serving on a background thread; returns once listening."""
        if self._thread is not None:
            return self
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._serve_start())
            except BaseException as e:  # pragma: no cover - bind failures
                errors.append(e)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._thread = threading.Thread(target=run, name=self.thread_name, daemon=True)
        self._thread.start()
        ready.wait()
        if errors:
            self._thread = None
            raise errors[0]
        return self

    async def _serve_start(self) -> None:
        self._stopping = asyncio.Event()
        self._runner = web.AppRunner(self.make_app(), access_log=None, shutdown_timeout=self.shutdown_timeout_s)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        self.port = self._runner.addresses[0][1]

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving; hung and sleeping requests are cut off."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return

        async def shutdown() -> None:
            self._stopping.set()
            await self._runner.cleanup()

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(timeout)
        except Exception:  # pragma: no cover - best effort on a stuck loop
            pass
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        self._thread = self._loop = None

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
