"""Messages that say what is wrong, once: a dataset.path neither local nor on the Hub, --version,
and --log-file (the full log in a file while the terminal keeps the bar)."""

from __future__ import annotations

import socket
import time

import pytest

from capstream import __version__

from conftest import make_rows, run_cli, write_config, write_parquet


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _hub_config(tmp_path, path: str):
    config = write_config(tmp_path / "c.yaml", None, "unused", tmp_path / "out")
    config.write_text(f"dataset: {{path: {path}}}\nmodel: {{provider: mock}}\noutput: {{dir: {tmp_path / 'out'}}}\n")
    return config


def test_a_path_neither_local_nor_on_a_reachable_hub_fails_with_one_line(tmp_path):
    config = _hub_config(tmp_path, "someone/no-such-dataset")
    hub = f"http://127.0.0.1:{_closed_port()}"  # a Hub out of reach
    started = time.monotonic()
    result = run_cli("run", str(config), env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub, "HF_HOME": str(tmp_path / "hf")})
    assert time.monotonic() - started < 15  # not huggingface_hub's five retries of every file
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines == [f"capstream: stopped: dataset.path: 'someone/no-such-dataset' is no local file or folder, "
                     f"and the Hub ({hub}) cannot be reached: {lines[0].rsplit(': ', 1)[1]}"], result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.hub
def test_a_dataset_the_hub_does_not_have_is_a_config_error(tmp_path):
    from capstream.testing.hub_server import FakeHub

    config = _hub_config(tmp_path, "someone/no-such-dataset")
    with FakeHub() as hub:
        result = run_cli("run", str(config), env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub.url,
                                                  "HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"capstream: config error: dataset.path: 'someone/no-such-dataset' is no local file or folder, and the Hub "
        f"({hub.url}) has no dataset of that name that this login may read (log in with `hf auth login` or set "
        "HF_TOKEN for a private one)"], result.stderr


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"capstream {__version__}"


def test_log_file_holds_every_row_error_and_retry_while_the_terminal_keeps_the_report(server, tmp_path):
    rows, broken = make_rows(30, broken_every=10)
    data = write_parquet(tmp_path / "d.parquet", rows)
    config = write_config(tmp_path / "c.yaml", server.url, data, tmp_path / "out")
    failed = []

    def once_a_500(info):  # row 2's first attempt
        if (info.width, info.height) == (66, 50) and not failed:
            failed.append(1)
            return 500
        return None

    server.status_for = once_a_500
    log_file = tmp_path / "run.log"
    result = run_cli("run", str(config), "--log-file", str(log_file))
    assert result.returncode == 0, result.stderr
    text = log_file.read_text()
    for i in sorted(broken):
        assert f"row {i}: ImageError: " in text
    assert "attempt 1 failed (Forced status 500.); trying again in" in text
    assert "rows: 30" in text  # the report too
    assert "row 9: " not in result.stderr and "attempt 1 failed" not in result.stderr  # the terminal: the report
    assert "rows: 30 written" in result.stderr
    assert "sk-test-secret-123" not in text


def test_every_log_line_appears_once(tmp_path):
    """A library that prints its own warnings (huggingface_hub) is not printed a second time by
    capstream's handler; capstream's own warnings appear once, with its prefix."""
    import subprocess
    import sys

    code = """
import logging, sys
import huggingface_hub.utils.logging as hf_logging
from capstream import cli
hf_logging.get_logger("huggingface_hub.file_download").warning("a warning of huggingface_hub")
cli.main(["validate", sys.argv[1]])
logging.getLogger("huggingface_hub.file_download").warning("another of huggingface_hub")
logging.getLogger("capstream.hub").warning("one of capstream")
"""
    config = tmp_path / "c.yaml"
    config.write_text(f"dataset: {{path: {tmp_path}}}\nmodel: {{provider: mock}}\n")
    done = subprocess.run([sys.executable, "-c", code, str(config)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert lines.count("a warning of huggingface_hub") == 1 and lines.count("another of huggingface_hub") == 1
    assert lines.count("capstream: one of capstream") == 1 and len(lines) == 3, lines
