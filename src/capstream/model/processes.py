"""Processes that send requests (``run.workers``), so that a fast endpoint can keep more than one core busy.

Against a local vLLM server the client's CPU is the limit, and most of it goes to LangChain's
message handling and the OpenAI SDK's request building and parsing, all under one GIL.
``ProcessPool`` spreads that part over processes; everything else stays in the main process, which
owns the run: the reader, the chunk window, the results log, the rate limits (so they stay global)
and the retry policy. A worker only sends the one attempt it is handed and returns an ``Answer`` or
a ``RequestFailed``, exactly like an in-process ``ModelCall``: the pool is a drop-in for it.

Workers are plain ``python -m capstream.model.processes`` processes, not ``multiprocessing`` ones: its
spawn start re-imports the parent's main module, which costs a CLI run a second import of the
whole pipeline and re-runs the top of a user's unguarded script. A worker imports only the model
call, builds its own chat model from the config it reads on stdin (the API key comes from its
inherited environment: no secret crosses the pipe or the socket), runs in its own session and
ignores SIGINT (a terminal's Ctrl-C is for the main process, which decides when to stop), and exits
when the main process goes away.

    >>> pool = ProcessPool(config.model, processes=1, local=ModelCall(llm))
    >>> answer = await pool(request)         # on the least loaded of the local call and the workers
    >>> await pool.aclose()
"""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import signal
import site
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from ..errors import Failure, RequestFailed
from .call import Answer, ImageRequest, ModelCall
from .settings import OPENAI_COMPATIBLE, ModelConfig

_HEADER = struct.Struct(">I")


def _frame(obj: Any) -> bytes:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(data)) + data


async def _read_frame(reader: asyncio.StreamReader) -> Any:
    (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    return pickle.loads(await reader.readexactly(size))


# --- the worker side -------------------------------------------------------------------------------

def _worker_main(socket_path: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    asyncio.run(_serve(socket_path, ModelConfig(**json.load(sys.stdin))))


async def _serve(socket_path: str, model: ModelConfig) -> None:
    from .chat_models import async_http_client, build_chat_model

    try:
        reader, writer = await asyncio.open_unix_connection(socket_path)
    except OSError:  # the run ended (or its process went away) before this worker was ready
        return
    http = async_http_client(model.timeout_s) if model.provider in OPENAI_COMPATIBLE else None
    call = ModelCall(build_chat_model(model, http), owns=http)
    tasks: set[asyncio.Task] = set()

    async def one(request_id: int, request: ImageRequest) -> None:
        try:
            result: Any = await call(request)
        except RequestFailed as failed:
            result = failed
        writer.write(_frame((request_id, result)))

    writer.write(_frame(("ready", os.getpid())))
    try:
        while True:
            request_id, request = await _read_frame(reader)
            task = asyncio.create_task(one(request_id, request))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    except (asyncio.IncompleteReadError, ConnectionError):
        pass  # the main process closed the connection or went away
    finally:
        for task in tasks:
            task.cancel()
        await call.aclose()


# --- the main side ---------------------------------------------------------------------------------

def _worker_env() -> dict[str, str]:
    """The environment for a worker: this one, plus this capstream's folder on PYTHONPATH when it is
    not a site folder (a source checkout the caller put on sys.path at run time), so that the worker
    runs the same code. A site folder is left out: ahead of the standard library it could shadow it."""
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    if root not in {str(Path(p).resolve()) for p in (*site.getsitepackages(), site.getusersitepackages())}:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


class _Worker:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self.pending: dict[int, asyncio.Future] = {}
        self.alive = True

    @property
    def load(self) -> int:
        return len(self.pending)

    async def receive(self) -> None:
        try:
            while True:
                request_id, result = await _read_frame(self.reader)
                future = self.pending.pop(request_id, None)
                if future is not None and not future.done():
                    future.set_result(result)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.alive = False
            lost = RequestFailed(Failure.TRANSIENT, "worker process ended")
            for future in self.pending.values():
                if not future.done():
                    future.set_exception(lost)
            self.pending.clear()


class ProcessPool:
    """``processes`` worker processes plus, optionally, an in-process call (``local``) that serves
    while the workers start and takes a share of the load afterwards."""

    def __init__(self, model: ModelConfig, processes: int, local: ModelCall | None = None):
        self.model = model
        self.processes = processes
        self.local = local
        self._local_load = 0
        self._workers: list[_Worker] = []
        self._procs: list[subprocess.Popen] = []
        self._next_id = 0
        self.sent_to_processes = 0  # how many attempts the worker processes made (the rest: local)
        self._tmp = tempfile.TemporaryDirectory(prefix="capstream-workers-")
        self._server: asyncio.AbstractServer | None = None
        self._first_ready = asyncio.Event()
        self._started = asyncio.get_running_loop().create_task(self._start())

    async def _start(self) -> None:
        path = os.path.join(self._tmp.name, "sock")
        self._server = await asyncio.start_unix_server(self._accept, path)
        model = json.dumps(self.model.model_dump(mode="json")).encode()
        env = _worker_env()
        for _ in range(self.processes):
            # Its own session: a terminal's Ctrl-C goes to the main process alone (which decides
            # when to stop), even while the worker is still importing; it exits when the socket closes.
            proc = subprocess.Popen([sys.executable, "-m", "capstream.model.processes", path], stdin=subprocess.PIPE,
                                    stdout=subprocess.DEVNULL, env=env, start_new_session=True)
            with proc.stdin:
                proc.stdin.write(model)
            self._procs.append(proc)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_frame(reader)  # ("ready", pid): the worker has built its model
        worker = _Worker(reader, writer)
        self._workers.append(worker)
        self._first_ready.set()
        await worker.receive()

    def _pick(self) -> _Worker | None:
        """The least loaded live worker, or None for the local call. The main process also reads,
        prepares images and writes results, so its own call counts double."""
        live = [w for w in self._workers if w.alive]
        best = min(live, key=lambda w: w.load, default=None)
        if self.local is not None and (best is None or 2 * self._local_load <= best.load):
            return None
        if best is None:
            raise RequestFailed(Failure.TRANSIENT, "no worker process is running")
        return best

    async def __call__(self, request: ImageRequest) -> Answer:
        if self.local is None and not self._workers:
            await self._first_ready.wait()  # only at start-up, with no in-process call to serve
        worker = self._pick()
        if worker is None:
            self._local_load += 1
            try:
                return await self.local(request)
            finally:
                self._local_load -= 1
        self._next_id += 1
        self.sent_to_processes += 1
        request_id = self._next_id
        future = asyncio.get_running_loop().create_future()
        worker.pending[request_id] = future
        worker.writer.write(_frame((request_id, request)))
        result = await future
        if isinstance(result, RequestFailed):
            raise result
        return result

    async def aclose(self) -> None:
        await asyncio.gather(self._started, return_exceptions=True)
        for worker in self._workers:
            worker.writer.close()
        if self._server is not None:
            self._server.close()
        for proc in self._procs:
            try:  # a worker exits once its connection closes
                await asyncio.to_thread(proc.wait, 5)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait)
        self._tmp.cleanup()
        if self.local is not None:
            await self.local.aclose()


if __name__ == "__main__":
    _worker_main(sys.argv[1])
