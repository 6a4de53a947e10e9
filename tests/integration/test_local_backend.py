"""The local backend's stop path, driven in-process."""

from __future__ import annotations

import threading

import datasets
import pytest

from capstream.config import config_from_dict
from capstream.errors import Interrupted
from capstream.setup import plan_run

from conftest import FEATURES, make_rows


def test_stop_with_a_full_window_and_unsent_rows_does_not_hang(server, tmp_path, monkeypatch):
    """Window of one chunk, one request slot: at the stop, row 1 waits for the slot and is never sent,
    so chunk 0 never completes; the feeder, waiting for a window slot, must still wake up."""
    monkeypatch.setenv("FAKE_KEY", "k")
    rows, _ = make_rows(6)
    data = datasets.Dataset.from_list(rows, features=FEATURES)
    config = config_from_dict({"model": {"base_url": server.url, "name": "fake-vlm", "api_key_env": "FAKE_KEY"},
                               "limits": {"max_concurrency": 1}, "run": {"chunk_size": 2, "window_chunks": 1},
                               "output": {"dir": str(tmp_path / "out")}})
    server.latency = 0.5
    plan = plan_run(config, data, show_progress=False)
    done = threading.Event()
    outcome = {}

    def run() -> None:
        try:
            plan.core.run(plan.backend)
        except BaseException as err:
            outcome["error"] = err
        done.set()

    threading.Thread(target=run, daemon=True).start()
    while server.requests == 0:
        done.wait(0.01)
    plan.backend.request_stop()
    assert done.wait(10), "the run did not stop"
    with pytest.raises(Interrupted):
        raise outcome["error"]
    assert server.requests == 1  # the waiting row was not sent
    assert plan.core.store.logged_answers(set()).answers.keys() == {0}
