"""The runner's stop path, driven in-process."""

from __future__ import annotations

import asyncio

import datasets

from capstream.captioner import Captioner
from capstream.engine import Interrupted, Runner
from capstream.source import open_source
from capstream.store import RunStore
from conftest import FEATURES, make_rows


def test_stop_with_a_full_window_and_unsent_rows_does_not_hang(server, tmp_path, monkeypatch):
    """Window of one chunk, one request slot: at the stop, row 1 waits for the slot and is never sent,
    so chunk 0 never completes; the feeder, waiting for a window slot, must still wake up."""
    monkeypatch.setenv("FAKE_KEY", "k")
    rows, _ = make_rows(6)
    data = datasets.Dataset.from_list(rows, features=FEATURES)
    config = {"model": {"base_url": server.url, "name": "fake-vlm", "api_key_env": "FAKE_KEY"},
              "limits": {"max_concurrency": 1}, "run": {"chunk_size": 2, "window_chunks": 1}}
    captioner = Captioner(config)
    store = RunStore(tmp_path / "out", "train")
    store.open({}, 2)
    server.latency = 0.5

    async def main():
        runner = Runner(open_source(captioner.config.dataset, data), captioner, store)
        task = asyncio.create_task(runner.run())
        while server.requests == 0:
            await asyncio.sleep(0.01)
        runner.request_stop()
        return await asyncio.wait_for(task, timeout=10)

    try:
        asyncio.run(main())
    except Interrupted:
        pass
    else:
        raise AssertionError("expected Interrupted")
    assert server.requests == 1  # the waiting row was not sent
    assert store.logged_results(set()).keys() == {0}
