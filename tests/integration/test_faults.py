"""Transient faults are retried through tenacity; row faults become error rows; fatal ones stop the run."""

from __future__ import annotations

import time

import pytest

from capstream import run

from conftest import (
    check_output,
    expected_caption,
    load_out,
    make_rows,
    run_cli,
    write_config,
    write_parquet,
)


def _config(server, tmp_path, rows, **sections):
    data = write_parquet(tmp_path / "d.parquet", rows)
    return write_config(tmp_path / "c.yaml", server.url, data, tmp_path / "out", **sections)


@pytest.mark.slow
def test_429_500_drop_hang_are_retried(server, tmp_path):
    """1000 rows; 5% 429 (Retry-After: 1), 3% 500, 1% dropped connections, 0.5% hung requests."""
    rows, broken = make_rows(1000, broken_every=50)
    server.p429, server.p500, server.pdrop, server.phang = 0.05, 0.03, 0.01, 0.005
    config = _config(server, tmp_path, rows, model={"timeout_s": 3}, retry={"max_attempts": 10, "max_wait_s": 5},
                     run={"chunk_size": 100})
    result = run_cli("run", str(config))
    assert result.returncode == 0, result.stderr
    check_output(tmp_path / "out", rows, broken)  # every good row its right caption; only broken ones err
    assert server.by_status[429] and server.by_status[500] and server.by_status["drop"] and server.by_status["hang"]
    assert server.ok == 1000 - len(broken)


def test_retry_after_is_honoured(server, tmp_path, monkeypatch):
    """After a 429 with Retry-After: 1 the next attempt waits about a second, not the short backoff."""
    rows, _ = make_rows(1)
    server.p429 = 1.0
    server.retry_after = "1"
    calls = []

    def latency(rng):  # called for every request before the server decides its answer
        calls.append(1)
        if len(calls) == 3:
            server.p429 = 0.0
        return 0.0

    server.latency = latency
    config = _config(server, tmp_path, rows, retry={"max_attempts": 5, "max_wait_s": 10})
    monkeypatch.setenv("FAKE_KEY", "k")
    run(str(config), show_progress=False)
    log = [t for t, status in server.log]
    assert [s for _, s in server.log][:2] == [429, 429]
    assert log[1] - log[0] >= 0.9 and log[2] - log[1] >= 0.9


def test_400_is_an_error_row_without_retry(server, tmp_path, monkeypatch):
    rows, _ = make_rows(10)
    refused = {3, 7}
    server.status_for = lambda info: 400 if info.text and info.width in {64 + i for i in refused} else None
    config = _config(server, tmp_path, rows)
    monkeypatch.setenv("FAKE_KEY", "k")
    run(str(config), show_progress=False)
    ds = load_out(tmp_path / "out")
    for i, row in enumerate(ds):
        if i in refused:
            assert row["caption"] is None and row["error"].startswith("RequestError: HTTP 400: "), row
        else:
            assert row["caption"] == expected_caption(i)
    assert server.requests == 10  # no retry of the refused ones


@pytest.mark.parametrize("status, word", [(401, "401"), (404, "404")])
def test_bad_key_or_unknown_model_stops_at_once(server, tmp_path, status, word):
    rows, _ = make_rows(200)
    server.status_for = lambda info: status
    config = _config(server, tmp_path, rows, limits={"max_concurrency": 4})
    started = time.monotonic()
    result = run_cli("run", str(config))
    assert result.returncode == 1
    assert time.monotonic() - started < 30
    assert word in result.stderr and "stopped" in result.stderr
    assert server.requests <= 8  # only what was in flight, not 200 rows
    assert "sk-test-secret-123" not in result.stderr
    if status == 401:  # where the key came from, so the user knows what to fix
        assert "environment variable FAKE_KEY" in result.stderr, result.stderr


def test_endpoint_down_stops_with_one_message_and_resumes(server, tmp_path):
    rows, broken = make_rows(100, broken_every=25)
    config = _config(server, tmp_path, rows, retry={"max_attempts": 3, "max_wait_s": 0.2}, run={"chunk_size": 10})
    answered = []

    def down_after_40(info):
        answered.append(1)
        return 503 if len(answered) > 40 else None

    server.status_for = down_after_40
    result = run_cli("run", str(config))
    assert result.returncode == 1
    assert result.stderr.count("still failing after 3 attempts") == 1
    assert "rerun" in result.stderr
    ok_before = server.ok
    server.status_for = None
    server.reset_counters()
    result = run_cli("run", str(config))
    assert result.returncode == 0, result.stderr
    check_output(tmp_path / "out", rows, broken)
    # Nothing answered before is asked again.
    assert server.requests == 100 - len(broken) - ok_before


def _closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens (bound, then released)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_refused_connection_stops_at_once_naming_the_url(tmp_path):
    """Nothing listening at base_url: one message saying so, with the URL, in a few seconds (not
    "Request timed out" after every retry), and the run resumable."""
    rows, _ = make_rows(50)
    data = write_parquet(tmp_path / "d.parquet", rows)
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    config = write_config(tmp_path / "c.yaml", url, data, tmp_path / "out")  # default retries: 6 attempts, 60 s
    config.write_text(config.read_text().replace("max_attempts: 4", "max_attempts: 6").replace("max_wait_s: 1", "max_wait_s: 60"))
    started = time.monotonic()
    result = run_cli("run", str(config))
    assert time.monotonic() - started < 10
    assert result.returncode == 1
    assert result.stderr.count(f"nothing is listening at {url}: connection refused") == 1, result.stderr
    assert "timed out" not in result.stderr and "rerun" in result.stderr


def test_a_server_restarting_mid_run_is_waited_for(tmp_path, monkeypatch):
    """Refused connections after the endpoint has answered are a restart: retried, the run completes."""
    import threading

    from capstream.testing.openai_server import FakeOpenAI

    rows, broken = make_rows(60, broken_every=30)
    first = FakeOpenAI(latency=0.05).start()
    port = first.port
    data = write_parquet(tmp_path / "d.parquet", rows)
    config = write_config(tmp_path / "c.yaml", first.url, data, tmp_path / "out", limits={"max_concurrency": 2},
                          retry={"max_attempts": 8, "max_wait_s": 2}, run={"chunk_size": 10})
    monkeypatch.setenv("FAKE_KEY", "k")
    restarted: list[FakeOpenAI] = []

    def restart() -> None:
        while first.ok < 15:
            time.sleep(0.01)
        first.stop()
        time.sleep(1.0)  # refused meanwhile
        restarted.append(FakeOpenAI(port=port).start())

    thread = threading.Thread(target=restart)
    thread.start()
    try:
        result = run(str(config), show_progress=False)
    finally:
        thread.join()
        for server in restarted:
            server.stop()
    assert result.summary.complete and result.summary.retries > 0
    check_output(tmp_path / "out", rows, broken)


def test_a_server_echoing_the_key_does_not_leak_it(server, tmp_path, monkeypatch):
    rows, _ = make_rows(3)
    server.status_for = lambda info: 400
    server.reply = None
    config = _config(server, tmp_path, rows)
    monkeypatch.setenv("FAKE_KEY", "sk-echoed-key-999")

    import capstream.model.call as mc

    real = mc.translate

    def echoing(exc):  # as some proxies do: the request's key in the error message
        failed = real(exc)
        failed.message += " (key sk-echoed-key-999)"
        return failed

    monkeypatch.setattr(mc, "translate", echoing)
    run(str(config), show_progress=False)
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            assert b"sk-echoed-key-999" not in path.read_bytes(), path
    assert "***" in load_out(tmp_path / "out")["error"][0]


def test_a_cut_or_withheld_answer_is_an_error_row_of_its_own_kind(server, tmp_path):
    """finish_reason "length" (cut at max_tokens) or "content_filter" (withheld) is never a caption:
    each is an error row of its own kind, its raw text kept, counted in the summary and the card,
    and it is not asked again (the same request gives the same cut)."""
    import json

    rows, _ = make_rows(12)
    cut, withheld = {2, 5}, {7}
    width_of = {64 + i: i for i in range(12)}
    server.finish_reason = lambda info: ("length" if width_of.get(info.width) in cut else
                                         "content_filter" if width_of.get(info.width) in withheld else None)
    config = _config(server, tmp_path, rows)
    result = run_cli("run", str(config))
    assert result.returncode == 0, result.stderr
    assert server.requests == 12  # not retried
    ds = load_out(tmp_path / "out")
    for i, row in enumerate(ds):
        if i in cut:
            assert row["caption"] is None and row["error"].startswith("TruncatedAnswer: the answer was cut at max_tokens")
            assert row["error"].endswith(f"raw answer: {expected_caption(i)}") and "--retry-errors" in row["error"]
        elif i in withheld:
            assert row["caption"] is None and row["error"].startswith("FilteredAnswer: the provider withheld")
        else:
            assert row["error"] is None and row["caption"] == expected_caption(i)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["errors"] == {"TruncatedAnswer": 2, "FilteredAnswer": 1} and summary["ok"] == 9
    assert "FilteredAnswer: 1, TruncatedAnswer: 2" in (tmp_path / "out" / "README.md").read_text()


def test_the_results_log_keeps_how_each_answer_was_bought(server, tmp_path):
    """Each logged answer carries the model that answered, its finish_reason, the last attempt's
    latency, the attempts it took and when it came; a rerun re-uses them as they were."""
    import json

    rows, broken = make_rows(20, broken_every=10)
    server.p500 = 0.3
    config = _config(server, tmp_path, rows, retry={"max_attempts": 8, "max_wait_s": 0.05})
    started = time.time()
    assert run_cli("run", str(config)).returncode == 0
    lines = [json.loads(line) for line in (tmp_path / "out" / ".capstream" / "results.jsonl").read_text().splitlines()]
    bought = [r for r in lines if r["e"] is None]
    assert len(bought) == 20 - len(broken)
    assert all(r["m"] == "fake-vlm" and r["f"] == "stop" and r["ms"] >= 0 and started <= r["t"] <= time.time()
               for r in bought)
    assert sum(r["n"] for r in bought) == server.requests and max(r["n"] for r in bought) > 1  # retried ones
    assert all("m" not in r for r in lines if r["e"] is not None)  # an unusable image bought nothing
    check_output(tmp_path / "out", rows, broken)
