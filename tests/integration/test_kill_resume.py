"""Kills, Ctrl-C, reruns and failed writes, through a real ``capstream run`` subprocess.

Every test drives ``python -m capstream.cli run CONFIG --no-progress`` against the fake server in
this process, interrupts it the way a user or the system would, reruns the same command and checks
that (a) the output is row for row what an uninterrupted run gives and (b) the server was asked
again only for what was in flight when the run died.
"""

from __future__ import annotations

import json
import os
import random
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, check_output, make_rows, write_config, write_parquet

pytestmark = pytest.mark.slow  # every test kills or interrupts real runs

KEY = "sk-test-secret-123"


def cli_env() -> dict[str, str]:
    # Read at each start, not at import: the per-test response cache folder (conftest) is set later.
    return {**os.environ, "FAKE_KEY": KEY}


# -- helpers ---------------------------------------------------------------------------------------


class Cli:
    """One ``capstream run`` subprocess; stderr goes to a file so no pipe can fill up and block it."""

    def __init__(self, config: Path, log: Path, *, own_group: bool = False):
        self.log = log
        self._err = open(log, "wb")
        self.proc = subprocess.Popen(  # own_group: as a terminal's foreground job (see signal_group)
            [sys.executable, "-m", "capstream.cli", "run", str(config), "--no-progress"],
            stdout=self._err, stderr=subprocess.STDOUT, env=cli_env(), cwd=REPO, start_new_session=own_group,
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        assert self.alive(), f"the run ended before signal {sig}:\n{self.output()}"
        self.proc.send_signal(sig)

    def signal_group(self, sig: int) -> None:
        """What a terminal's Ctrl-C does: the signal to every process of the job (started own_group)."""
        assert self.alive(), f"the run ended before signal {sig}:\n{self.output()}"
        os.killpg(self.proc.pid, sig)

    def wait(self, timeout: float = 120) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            if self.alive():
                self.proc.kill()
                self.proc.wait()
            self._err.close()

    def output(self) -> str:
        if not self._err.closed:
            self._err.flush()
        return self.log.read_text(errors="replace")


def run_to_end(config: Path, timeout: float = 120, preexec_fn=None) -> tuple[int, str]:
    """Run to its end; output through a pipe (a file-size limit on the child does not touch it)."""
    done = subprocess.run([sys.executable, "-m", "capstream.cli", "run", str(config), "--no-progress"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=cli_env(), cwd=REPO,
                          timeout=timeout, preexec_fn=preexec_fn)
    return done.returncode, done.stdout


def wait_until(predicate, cli: Cli, timeout: float = 60) -> None:
    """Poll ``predicate`` while the run is alive; fail if it ends or the time runs out first."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert cli.alive(), f"the run ended too early (rc {cli.proc.returncode}):\n{cli.output()}"
        assert time.monotonic() < deadline, f"timed out waiting:\n{cli.output()}"
        time.sleep(0.005)


def repeated_images(server) -> int:
    """Requests beyond the first for the same image (a snapshot, safe while the server runs)."""
    return sum(n - 1 for n in server.stats()["image_requests"].values() if n > 1)


def manifest(out: Path) -> dict:
    return json.loads((out / ".capstream" / "manifest.json").read_text())


@pytest.fixture(scope="module")
def source_1200(tmp_path_factory):
    rows, broken = make_rows(1200, broken_every=50)
    return write_parquet(tmp_path_factory.mktemp("src1200") / "images.parquet", rows), rows, broken


@pytest.fixture(scope="module")
def source_400(tmp_path_factory):
    rows, broken = make_rows(400, broken_every=40)
    return write_parquet(tmp_path_factory.mktemp("src400") / "images.parquet", rows), rows, broken


# -- 1. SIGKILL at random moments ------------------------------------------------------------------

KILLS = 3
CONCURRENCY = 16


@pytest.mark.parametrize("streaming", [False, True])
def test_sigkill_three_times_then_resume(server, source_1200, tmp_path, streaming):
    data_file, rows, broken = source_1200
    good = len(rows) - len(broken)
    out = tmp_path / "out"
    server.latency = lambda rng: rng.uniform(0.02, 0.05)
    config = write_config(tmp_path / "c.yaml", server.url, data_file, out, dataset={"streaming": streaming},
                          limits={"max_concurrency": CONCURRENCY}, run={"chunk_size": 100})
    rng = random.Random(20240 + streaming)
    measured = []
    for k in range(KILLS):
        remaining = good - len(server.stats()["answered_images"])
        target = server.ok + max(1, int(remaining * rng.uniform(0.1, 0.9)))
        cli = Cli(config, tmp_path / f"kill{k}.log")
        wait_until(lambda: server.ok >= target, cli)
        in_flight = server.in_flight
        cli.signal(signal.SIGKILL)
        assert cli.wait(10) == -signal.SIGKILL
        measured.append({"answered": server.ok, "in_flight": in_flight,
                         "shards": len(list((out / "data").glob("*.parquet"))),
                         "asked_again_so_far": repeated_images(server)})

    rc, err = run_to_end(config)
    assert rc == 0, err
    assert "Traceback" not in err
    check_output(out, rows, broken)
    m = manifest(out)
    assert m["complete"] is True and len(m["done"]) == 12
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"] == 1200 and summary["ok"] == good and summary["errors"] == {"ImageError": len(broken)}

    stats = server.stats()
    repeats = repeated_images(server)
    # Requests the server never read in full (the client died while sending) carry no image.
    cut_off = stats["requests"] - sum(stats["image_requests"].values())
    print(f"\nstreaming={streaming}: kills at {measured}; {stats['requests']} requests for {good} images: "
          f"{repeats} asked again, {cut_off} cut off while sending")
    assert len(stats["image_requests"]) == good  # every usable image asked, never a broken one
    # The server answers a body it could not read in full with a 500 nobody receives; nothing else failed.
    assert set(stats["by_status"]) <= {"200", "500"} and stats["by_status"].get("500", 0) == cut_off
    # At most max_concurrency requests are open at a kill: each is asked again or was cut off.
    assert repeats + cut_off <= KILLS * CONCURRENCY


# -- 2. a finished run, run again ------------------------------------------------------------------

_UPDATED = re.compile(rb"Updated \d{4}-\d\d-\d\d \d\d:\d\d UTC")


def snapshot(out: Path) -> dict[str, bytes]:
    """Every file of the output folder (summary.json holds this run's timings, so not it)."""
    files = {}
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out).as_posix()
        if path.is_file() and rel != "summary.json":
            data = path.read_bytes()
            files[rel] = _UPDATED.sub(b"Updated <time>", data) if rel == "README.md" else data
    return files


@pytest.mark.parametrize("streaming", [False, True])
def test_finished_run_rerun_sends_nothing_and_changes_nothing(server, source_400, tmp_path, streaming):
    data_file, rows, broken = source_400
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", server.url, data_file, out, dataset={"streaming": streaming},
                          run={"chunk_size": 64})
    rc, err = run_to_end(config)
    assert rc == 0, err
    check_output(out, rows, broken)
    before, requests = snapshot(out), server.requests
    assert requests == len(rows) - len(broken)
    assert len([f for f in before if f.startswith("data/")]) == 7

    rc, err = run_to_end(config)
    assert rc == 0, err
    assert server.requests == requests
    after = snapshot(out)
    assert sorted(after) == sorted(before)
    changed = [name for name in before if before[name] != after[name]]
    assert not changed, f"changed by a rerun of a finished run: {changed}"
    assert json.loads((out / "summary.json").read_text())["rows_this_run"] == 0


# -- 3. Ctrl-C -------------------------------------------------------------------------------------


def _sigint_config(server, source, tmp_path):
    data_file, rows, broken = source
    return write_config(tmp_path / "c.yaml", server.url, data_file, tmp_path / "out",
                        limits={"max_concurrency": 8}, model={"timeout_s": 5})


def test_ctrl_c_saves_and_rerun_resumes(server, source_400, tmp_path):
    _, rows, broken = source_400
    out = tmp_path / "out"
    server.latency = 0.3
    config = _sigint_config(server, source_400, tmp_path)
    cli = Cli(config, tmp_path / "first.log")
    wait_until(lambda: server.ok >= 40, cli)
    asked_at_signal = server.requests
    cli.signal(signal.SIGINT)
    sent = time.monotonic()
    rc = cli.wait(5 + 5 + 10)  # the drain waits at most model.timeout_s + 5 s
    took = time.monotonic() - sent
    err = cli.output()
    assert rc == 130, err
    assert took < 5 + 5 + 3, took
    assert "rerun" in err and "Traceback" not in err
    asked_first = server.requests
    # No new rows after Ctrl-C: only those the engine had started (at most 2 x max_concurrency).
    assert asked_first - asked_at_signal <= 2 * 8

    server.latency = 0.01
    rc, err = run_to_end(config)
    assert rc == 0, err
    check_output(out, rows, broken)
    repeats = repeated_images(server)
    print(f"\nSIGINT after {asked_at_signal} requests: {asked_first - asked_at_signal} more sent, exit after "
          f"{took:.2f}s, {repeats} asked again")
    assert repeats <= 8
    assert len(server.stats()["image_requests"]) == len(rows) - len(broken)


def test_after_ctrl_c_the_counts_agree(server, source_400, tmp_path):
    """The rows written plus the rows answered in chunks not written yet are the rows this run
    answered, in the summary and in the lines printed."""
    server.latency = 0.2
    config = _sigint_config(server, source_400, tmp_path)
    cli = Cli(config, tmp_path / "first.log")
    wait_until(lambda: server.ok >= 90, cli)  # a chunk written (64 rows), the next one part way
    cli.signal(signal.SIGINT)
    assert cli.wait(20) == 130
    err = cli.output()
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["rows"] + summary["rows_pending"] == summary["rows_this_run"] + summary["rows_from_log"]
    assert summary["rows"] >= 64 and summary["rows_pending"] > 0, summary
    assert f"rows: {summary['rows']} written" in err
    assert f"; {summary['rows_pending']} more answered, in chunks not written yet" in err
    assert f"this run: {summary['rows_this_run']} rows answered" in err


def test_ctrl_c_at_a_terminal_with_worker_processes(server, source_400, tmp_path):
    """A terminal's Ctrl-C reaches every process of the job. Worker processes (here still starting,
    as the first requests go out) leave it to the main process, which saves and exits 130 with its
    one message and no traceback; the rerun completes."""
    _, rows, broken = source_400
    server.latency = 0.3
    config = write_config(tmp_path / "c.yaml", server.url, source_400[0], tmp_path / "out", run={"workers": 2},
                          limits={"max_concurrency": 8}, model={"timeout_s": 5})
    cli = Cli(config, tmp_path / "first.log", own_group=True)
    wait_until(lambda: server.requests >= 1, cli)
    cli.signal_group(signal.SIGINT)
    rc = cli.wait(5 + 5 + 10)
    err = cli.output()
    assert rc == 130, err
    assert "rerun" in err and "Traceback" not in err and "KeyboardInterrupt" not in err, err
    server.latency = 0.01
    rc, err = run_to_end(config)
    assert rc == 0, err
    check_output(tmp_path / "out", rows, broken)


def test_ctrl_c_twice_quits_at_once_and_rerun_resumes(server, source_400, tmp_path):
    _, rows, broken = source_400
    out = tmp_path / "out"
    server.latency = 0.3
    config = _sigint_config(server, source_400, tmp_path)
    cli = Cli(config, tmp_path / "first.log")
    wait_until(lambda: server.ok >= 40, cli)
    # From now on the requests in flight take 4 s: a graceful stop would wait for them, a second
    # Ctrl-C must not.
    server.latency = 4.0
    time.sleep(0.5)
    cli.signal(signal.SIGINT)
    time.sleep(0.2)  # two separate deliveries, not one merged pending signal
    cli.signal(signal.SIGINT)
    sent = time.monotonic()
    rc = cli.wait(20)
    took = time.monotonic() - sent
    err = cli.output()
    assert rc == 130, err
    assert took < 2.0, f"second Ctrl-C took {took:.1f}s to quit"
    assert "rerun" in err and "Traceback" not in err

    server.latency = 0.01
    rc, err = run_to_end(config)
    assert rc == 0, err
    check_output(out, rows, broken)
    repeats = repeated_images(server)
    print(f"\nSIGINT twice: exit after {took:.2f}s, {repeats} asked again")
    assert repeats <= 8


# -- 4. a write that fails -------------------------------------------------------------------------


def _limit_file_size(limit: int):
    def preexec() -> None:  # in the child: no file may grow past `limit` bytes -> EFBIG, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


OBSTACLES = ["data_is_a_file", "log_is_a_folder", "log_unopenable_mid_run", "file_size_limit"]


@pytest.mark.parametrize("obstacle", OBSTACLES)
def test_failed_write_stops_with_one_message_and_rerun_completes(server, source_400, tmp_path, obstacle):
    """As root no permission stops a write, so each obstacle is one that does:

    * ``data_is_a_file``: ``OUT/data`` is a file, so the first shard cannot be written;
    * ``log_is_a_folder``: ``results.jsonl`` is a folder before the run starts;
    * ``log_unopenable_mid_run``: it becomes a folder after the run started, before the first answer;
    * ``file_size_limit``: RLIMIT_FSIZE of 8 KB (EFBIG, like a full disk): the results log fills up
      after about 100 answers, before the first 200-row chunk is done.
    """
    data_file, rows, broken = source_400
    good = len(rows) - len(broken)
    out = tmp_path / "out"
    concurrency = 8
    # Streaming: nothing goes through the datasets cache, so the size limit hits only the output.
    config = write_config(tmp_path / "c.yaml", server.url, data_file, out, dataset={"streaming": True},
                          limits={"max_concurrency": concurrency}, run={"chunk_size": 200})
    server.latency = 0.01
    blocked = out / ".capstream" / "results.jsonl"
    if obstacle == "data_is_a_file":
        out.mkdir()
        blocked = out / "data"
        blocked.write_text("not a folder")
    elif obstacle == "log_is_a_folder":
        blocked.mkdir(parents=True)

    if obstacle == "log_unopenable_mid_run":
        server.latency = 1.0  # the first answers arrive well after the folder is made
        cli = Cli(config, tmp_path / "first.log")
        wait_until(lambda: server.requests >= 1, cli)
        assert not blocked.exists(), "precondition: the results log is opened when the first answer arrives"
        blocked.mkdir()
        server.latency = 0.01
        rc = cli.wait(60)
        err = cli.output()
    else:
        rc, err = run_to_end(config, timeout=60,
                             preexec_fn=_limit_file_size(8 * 1024) if obstacle == "file_size_limit" else None)
    asked_first = server.requests
    tail = err[-2500:]  # enough to read; a broken run can print hundreds of tracebacks
    print(f"\n{obstacle}: exit {rc}, {asked_first} requests\n{tail}")
    assert rc == 1, tail
    assert "Traceback" not in err and "exception" not in err.lower(), tail
    assert err.count("capstream: stopped:") == 1, tail
    assert str(blocked) in err, tail
    assert asked_first < good

    if obstacle == "data_is_a_file":
        blocked.unlink()
    elif obstacle in ("log_is_a_folder", "log_unopenable_mid_run"):
        blocked.rmdir()
    rc, err = run_to_end(config)
    assert rc == 0, err
    check_output(out, rows, broken)
    repeats = repeated_images(server)
    print(f"{obstacle}: rerun asked {server.requests - asked_first}, {repeats} asked again")
    assert len(server.stats()["image_requests"]) == good
    # Answers logged before the failure are not paid for twice; what the engine had started (up to
    # twice max_concurrency rows) may be, when the log itself is what failed.
    assert repeats <= 2 * concurrency
