"""The end of a run says what happened and what to do next: re-used answers, how to load the output,
where the output of a Python call without output.dir went, and the progress as plain lines when
stderr is not a terminal."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import datasets

from capstream import caption_dataset

from conftest import FEATURES, REPO, expected_caption, make_rows, run_cli, write_config, write_parquet


def test_a_run_served_from_the_cache_says_so_and_how_to_load_the_output(server, tmp_path):
    rows, broken = make_rows(30, broken_every=10)
    data = write_parquet(tmp_path / "d.parquet", rows)
    config = write_config(tmp_path / "c.yaml", server.url, data, tmp_path / "first")
    assert run_cli("run", str(config)).returncode == 0
    server.reset_counters()
    again = tmp_path / "again"
    result = run_cli("run", str(config), "--set", f"output.dir={again}")
    assert result.returncode == 0, result.stderr
    assert server.requests == 0
    assert f"re-used, not paid again: {30 - len(broken)} answers from the response cache" in result.stderr
    assert f"next: `capstream run {config} --retry-errors` asks again only for the {len(broken)} rows with errors" \
        in result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith("output: ")]
    code = line.split("load it with ", 1)[1]
    assert code == f'datasets.load_dataset("{again}", split="train")'
    ds = eval(code, {"datasets": datasets})  # the line printed loads the output
    assert len(ds) == 30 and ds[0]["caption"] == expected_caption(0)


def test_the_python_api_without_output_dir_says_where_and_resumes_there(server, tmp_path, monkeypatch, caplog,
                                                                       response_cache):
    rows, _ = make_rows(12)
    ds = datasets.Dataset.from_list(rows, features=FEATURES)
    monkeypatch.setenv("FAKE_KEY", "k")
    config = {"model": {"base_url": server.url, "name": "fake-vlm", "api_key_env": "FAKE_KEY"},
              "run": {"cache": False}}  # the second call must find its answers in the folder, not the cache
    temp_before = set(os.listdir(tempfile.gettempdir()))
    out = caption_dataset(ds, config=config, show_progress=False)
    assert out["caption"][:] == [expected_caption(i) for i in range(12)]
    [warning] = [r.getMessage() for r in caplog.records if "output.dir is not set" in r.getMessage()]
    folder = warning.split("the output goes to ", 1)[1].split(" (")[0]
    assert folder.startswith(str(response_cache / "outputs")) and os.path.isdir(os.path.join(folder, "data"))
    caplog.clear()
    server.reset_counters()
    again = caption_dataset(ds, config=config, show_progress=False)
    assert server.requests == 0 and again["caption"][:] == out["caption"][:]  # the same folder: resumed
    assert folder in caplog.text
    assert not {n for n in set(os.listdir(tempfile.gettempdir())) - temp_before if n.startswith("capstream-")}


def test_without_a_terminal_progress_is_plain_lines(server, tmp_path):
    rows, _ = make_rows(40)
    data = write_parquet(tmp_path / "d.parquet", rows)
    config = write_config(tmp_path / "c.yaml", server.url, data, tmp_path / "out")
    done = subprocess.run([sys.executable, "-m", "capstream.cli", "run", str(config)], capture_output=True, text=True,
                          env={**os.environ, "FAKE_KEY": "k"}, cwd=REPO, timeout=120)  # stderr: a pipe
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr
    progress = [line for line in done.stderr.splitlines() if " rows (" in line and "row/s" in line]
    assert progress and progress[-1].startswith("40/40 rows (100%)"), done.stderr
    assert len(progress) <= 2  # a short run: the last figures (and at most one line on the way)
