"""A whole run through the real ChatOpenAI HTTP path against the fake server, as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import datasets
import pytest

from conftest import (
    REPO,
    check_output,
    expected_caption,
    load_out,
    make_rows,
    run_cli,
    write_config,
    write_parquet,
)


@pytest.fixture(scope="module")
def source_300(tmp_path_factory):
    rows, broken = make_rows(300, broken_every=10)
    path = write_parquet(tmp_path_factory.mktemp("src") / "images.parquet", rows)
    return path, rows, broken


@pytest.mark.parametrize("streaming", [False, True])
def test_cli_run_300_rows(server, source_300, tmp_path, streaming):
    data_file, rows, broken = source_300
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", server.url, data_file, out, dataset={"streaming": streaming})
    result = run_cli("run", str(config))
    assert result.returncode == 0, result.stderr
    check_output(out, rows, broken)
    # One request per usable image, none for the broken ones.
    assert server.requests == 300 - len(broken)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"] == 300 and summary["ok"] == 300 - len(broken)
    assert summary["errors"] == {"ImageError": len(broken)}
    assert summary["complete"] is True
    card = (out / "README.md").read_text()
    assert "fake-vlm" in card and "Describe this image" in card
    # The key never reaches any output file.
    for path in out.rglob("*"):
        if path.is_file():
            assert b"sk-test-secret-123" not in path.read_bytes(), path
    assert "sk-test-secret-123" not in result.stderr + result.stdout


def test_script_and_python_api_give_the_same(server, source_300, tmp_path):
    data_file, rows, broken = source_300
    out_cli = tmp_path / "cli"
    config = write_config(tmp_path / "c.yaml", server.url, data_file, out_cli)
    script = subprocess.run([sys.executable, "scripts/caption.py", "--config", str(config), "--no-progress"],
                            capture_output=True, text=True, cwd=REPO, env={**__import__("os").environ, "FAKE_KEY": "k"})
    assert script.returncode == 0, script.stderr
    by_script = check_output(out_cli, rows, broken)

    import os

    from capstream import caption_dataset

    os.environ["FAKE_KEY"] = "k"
    try:
        ds = datasets.load_dataset("parquet", data_files=str(data_file), split="train")
        cfg = {"model": {"base_url": server.url, "name": "fake-vlm", "api_key_env": "FAKE_KEY"},
               "output": {"dir": str(tmp_path / "api")}, "run": {"chunk_size": 50}}
        result = caption_dataset(ds, config=cfg, show_progress=False)
    finally:
        del os.environ["FAKE_KEY"]
    assert result["caption"][:] == by_script["caption"][:]
    assert result["error"][:] == by_script["error"][:]
    assert result["id"][:] == list(range(300))


def test_max_concurrency_is_held(server, tmp_path):
    rows, _ = make_rows(60)
    data_file = write_parquet(tmp_path / "d.parquet", rows)
    server.latency = 0.05
    config = write_config(tmp_path / "c.yaml", server.url, data_file, tmp_path / "out")
    result = run_cli("run", str(config), "--set", "limits.max_concurrency=3")
    assert result.returncode == 0, result.stderr
    assert server.requests == 60
    assert server.max_in_flight == 3  # reached, never passed


def test_caption_dataset_from_local_image_folder(server, tmp_path, monkeypatch):
    """imagefolder rows come as paths with bytes=None: they are read, sent, and embedded in the output."""
    from capstream import caption_dataset

    from conftest import jpeg, size_of_row

    folder = tmp_path / "pics"
    folder.mkdir()
    for i in range(5):
        (folder / f"{i}.jpg").write_bytes(jpeg(*size_of_row(i)))
    monkeypatch.setenv("FAKE_KEY", "k")
    cfg = {"dataset": {"path": "imagefolder", "data_dir": str(folder)},
           "model": {"base_url": server.url, "name": "fake-vlm", "api_key_env": "FAKE_KEY"},
           "output": {"dir": str(tmp_path / "out")}}
    ds = caption_dataset(None, config=cfg, show_progress=False)
    assert sorted(ds["caption"][:]) == sorted(expected_caption(i) for i in range(5))
    raw = ds.cast_column("image", datasets.Image(decode=False))
    for row in raw:
        assert row["image"]["bytes"] == (folder / row["image"]["path"]).read_bytes()


def test_batched_map_function(server, monkeypatch):
    """The public building block works on its own with ds.map(batched=True)."""
    from capstream import Captioner

    rows, broken = make_rows(20, broken_every=7)
    ds = datasets.Dataset.from_list(rows, features=datasets.Features(
        {"id": datasets.Value("int64"), "image": datasets.Image(decode=False), "alt": datasets.Value("string")}))
    monkeypatch.setenv("FAKE_KEY", "k")
    captioner = Captioner({"model": {"base_url": server.url, "name": "fake-vlm", "api_key_env": "FAKE_KEY"}})
    out = ds.map(captioner, batched=True, batch_size=8, input_columns=["image"])
    for i, row in enumerate(out):
        if i in broken:
            assert row["caption"] is None and row["error"].startswith("ImageError")
        else:
            assert row["caption"] == expected_caption(i) and row["error"] is None
    captioner.close()


def test_demo_config_runs_offline(tmp_path):
    out = tmp_path / "demo-out"
    result = run_cli("run", "configs/demo.yaml", "--set", f"output.dir={out}")
    assert result.returncode == 0, result.stderr
    ds = load_out(out)
    assert len(ds) > 0
    assert all("mock caption" in c for c in ds["caption"][:] if c)


@pytest.mark.slow
def test_worker_processes_give_the_same_output(server, source_300, tmp_path):
    """run.workers: 2 sends part of the requests from a second process; limits and output unchanged."""
    data_file, rows, broken = source_300
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", server.url, data_file, out, run={"workers": 2, "chunk_size": 64},
                          limits={"max_concurrency": 8})
    server.latency = 0.25  # long enough for the worker process to start (it imports LangChain)
    result = run_cli("run", str(config))
    assert result.returncode == 0, result.stderr
    check_output(out, rows, broken)
    assert server.requests == 300 - len(broken)
    assert server.max_in_flight <= 8
    summary = json.loads((out / "summary.json").read_text())
    assert 0 < summary["worker_requests"] < summary["requests"]  # both processes sent requests


@pytest.mark.slow
def test_worker_processes_from_a_script_without_a_main_guard(server, source_300, tmp_path):
    """A worker process runs only the model call: it does not re-run the caller's script, as a
    multiprocessing spawn start would (there, the script's run() would start again in the worker)."""
    data_file, rows, broken = source_300
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", server.url, data_file, out, run={"workers": 2, "chunk_size": 64},
                          limits={"max_concurrency": 8})
    server.latency = 0.25
    script = tmp_path / "caption.py"
    script.write_text(f"from capstream import run\nrun({str(config)!r}, show_progress=False)\nprint('ran')\n")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240,
                            env={**os.environ, "FAKE_KEY": "sk-test-secret-123"}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ran"]
    check_output(out, rows, broken)
    assert json.loads((out / "summary.json").read_text())["worker_requests"] > 0
