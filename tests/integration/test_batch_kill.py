"""A batch run killed at each step, through a real ``capstream run`` subprocess, then run again.

The fake server holds the step the test kills in (``hold``): the upload after the file is stored,
the batch after it is made and before its id reaches the run, the batches in progress, the
download of their files. After each kill the same command runs to its end and the test checks that
(a) the output is every row's answer and (b) no request went into two batches, and none was answered
twice into the results log.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from capstream.errors import RunStopped
from capstream.testing.batch_server import FakeBatchOpenAI

from conftest import REPO, check_output, make_rows, write_config, write_parquet

pytestmark = pytest.mark.slow  # every test kills real runs

KEY = "sk-test-secret-123"


class Cli:
    """One ``capstream run`` subprocess, its output in a file."""

    def __init__(self, config: Path, log: Path):
        self.log = log
        self._out = open(log, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "capstream.cli", "run", str(config), "--no-progress"],
                                     stdout=self._out, stderr=subprocess.STDOUT, env={**os.environ, "FAKE_KEY": KEY},
                                     cwd=REPO)

    def wait_for(self, predicate, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert self.proc.poll() is None, f"the run ended too early:\n{self.output()}"
            assert time.monotonic() < deadline, f"timed out waiting:\n{self.output()}"
            time.sleep(0.01)

    def kill(self, sig: int = signal.SIGKILL) -> int:
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(30)
        finally:
            self._out.close()

    def finish(self, timeout: float = 120) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._out.close()

    def output(self) -> str:
        if not self._out.closed:
            self._out.flush()
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="module")
def source_200(tmp_path_factory):
    rows, broken = make_rows(200, broken_every=20)
    return write_parquet(tmp_path_factory.mktemp("src200") / "images.parquet", rows), rows, broken


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("FAKE_KEY", KEY)
    with FakeBatchOpenAI(step_s=0.02) as s:
        yield s


def batch_config(tmp_path: Path, server, data: Path, **batch) -> Path:
    return write_config(tmp_path / "c.yaml", server.url, data, tmp_path / "out",
                        prompt={"text": "Caption. Alt text: {alt}"},
                        run={"backend": "batch", "chunk_size": 64}, batch={"poll_s": 0.02, **batch})


def run_to_end(config: Path, log: Path) -> str:
    cli = Cli(config, log)
    assert cli.finish() == 0, cli.output()
    return cli.output()


def logged(out: Path) -> collections.Counter:
    """How many times each (key, prompt) was written into the results logs."""
    count = collections.Counter()
    for log in (out / ".capstream").glob("results*.jsonl"):
        for line in log.read_text().splitlines():
            record = json.loads(line)
            count[(record["k"], record["p"])] += 1
    return count


def each_request_in_one_batch(server) -> None:
    ids = [c for b in server.batches.values() if b.status != "failed" for c in b.custom_ids]
    assert len(ids) == len(set(ids)), collections.Counter(ids).most_common(3)


@pytest.mark.parametrize("step", ["upload", "create", "progress", "content"])
def test_killed_at_each_step_then_rerun(server, source_200, tmp_path, step):
    data, rows, broken = source_200
    config = batch_config(tmp_path, server, data, max_requests=60)
    server.hold.add(step)
    cli = Cli(config, tmp_path / "killed.log")
    reached = {"upload": lambda: server.uploads == 1, "create": lambda: server.creates == 1,
               "progress": lambda: server.creates == 4 and all(b.status == "in_progress"
                                                               for b in server.batches.values()),
               "content": lambda: any(b.status == "completed" for b in server.batches.values())}[step]
    cli.wait_for(reached)
    time.sleep(0.2)  # let the run sit in the step
    assert cli.kill() == -signal.SIGKILL
    server.hold.discard(step)
    output = run_to_end(config, tmp_path / "rerun.log")
    assert "Traceback" not in output
    check_output(tmp_path / "out", rows, broken)
    each_request_in_one_batch(server)
    assert server.creates == 4  # 180 requests, 60 per file: one batch each, none made twice
    if step == "upload":
        assert server.uploads == 5  # the file whose upload was cut off went up again (an unused copy stays)
    else:
        assert server.uploads == 4
    assert set(logged(tmp_path / "out").values()) == {1}  # every answer logged once
    summary = json.loads((tmp_path / "out/summary.json").read_text())
    assert summary["complete"] and summary["rows"] == 200


def test_ctrl_c_leaves_the_batches_running_and_a_rerun_collects_them(server, source_200, tmp_path):
    data, rows, broken = source_200
    config = batch_config(tmp_path, server, data, max_requests=60)
    server.hold.add("progress")
    cli = Cli(config, tmp_path / "interrupted.log")
    cli.wait_for(lambda: server.creates == 4)
    assert cli.kill(signal.SIGINT) == 130
    assert "the batches stay at the provider" in cli.output()
    assert all(b.status == "in_progress" for b in server.batches.values())  # nothing cancelled
    server.hold.discard("progress")
    run_to_end(config, tmp_path / "rerun.log")
    check_output(tmp_path / "out", rows, broken)
    assert server.creates == server.uploads == 4
    each_request_in_one_batch(server)


def test_stopped_while_logging_a_batch_logs_no_answer_twice(server, source_200, tmp_path, monkeypatch):
    """A write of an answer fails (as a full disk makes it fail) while a batch is collected: the run
    stops with part of the batch logged. Twice: the second run stops part way through the same batch
    too. The third collects the batch again and logs only the answers not logged yet."""
    from capstream.api import run
    from capstream.config import load_config
    from capstream.io.results_log import ResultsLog

    data, rows, broken = source_200
    config = batch_config(tmp_path, server, data)
    append = ResultsLog.append

    def failing_at(n: int):
        calls = []

        def failing(self, record):
            calls.append(record)
            if len(calls) == n:
                raise RunStopped(f"cannot write {self.path}: No space left on device")
            return append(self, record)

        return failing

    for fail_at, logged_then in ((50, 49), (60, 49 + 59)):
        monkeypatch.setattr(ResultsLog, "append", failing_at(fail_at))
        with pytest.raises(RunStopped, match="No space left"):
            run(load_config(config), show_progress=False)
        assert sum(logged(tmp_path / "out").values()) == logged_then  # the image errors first, then answers
    monkeypatch.setattr(ResultsLog, "append", append)
    result = run(load_config(config), show_progress=False)
    check_output(tmp_path / "out", rows, broken)
    assert set(logged(tmp_path / "out").values()) == {1}
    assert server.creates == 1 and server.requests == 190
    assert result.summary.paid_input_tokens == server.prompt_tokens_total  # each answer's tokens counted once


def test_the_done_when_scenario():
    """1,200 rows, 3 prompts, batch.max_requests 1000, killed three times at random moments: the
    script's checks (see scripts/batch_scenario.py) all hold."""
    done = subprocess.run([sys.executable, "scripts/batch_scenario.py", "--json"], cwd=REPO, capture_output=True,
                          text=True, timeout=900)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["checks"] and all(report["checks"].values()), report
    assert done.returncode == 0
    assert report["requests"] == 3 * (1200 - 24) and report["failed_lines"] and report["expired_lines"]
    assert sum(k["exit"] == "killed" for k in report["kills"]) >= 2
