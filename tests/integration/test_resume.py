"""Resume, fingerprint refusal and --retry-errors (the kill tests are in test_kill_resume.py)."""

from __future__ import annotations

import json

import pytest

from conftest import (
    REPO,
    check_output,
    load_out,
    make_rows,
    run_cli,
    write_config,
    write_parquet,
)


def _setup(server, tmp_path, n=120, **sections):
    rows, broken = make_rows(n, broken_every=40)
    data = write_parquet(tmp_path / "d.parquet", rows)
    config = write_config(tmp_path / "c.yaml", server.url, data, tmp_path / "out",
                          run={"chunk_size": 25}, **sections)
    return config, rows, broken


@pytest.mark.slow
def test_changed_settings_are_refused_unless_overwrite(server, tmp_path):
    config, rows, broken = _setup(server, tmp_path)
    assert run_cli("run", str(config)).returncode == 0
    server.reset_counters()
    for override, name in [("prompt.text=Something else", "prompt.text"), ("model.name=other", "model.name"),
                           ("image.max_side=512", "image.max_side"), ("model.temperature=0.7", "model.temperature"),
                           ("dataset.split=test", "dataset.split")]:
        result = run_cli("run", str(config), "--set", override)
        assert result.returncode == 2, result.stderr
        assert name in result.stderr and "--overwrite" in result.stderr
    assert server.requests == 0
    result = run_cli("run", str(config), "--set", "prompt.text=Something else", "--overwrite")
    assert result.returncode == 0, result.stderr
    assert server.requests == 120 - len(broken)
    check_output(tmp_path / "out", rows, broken)


def test_finished_run_sends_nothing(server, tmp_path):
    config, rows, broken = _setup(server, tmp_path, dataset={"streaming": True})
    assert run_cli("run", str(config)).returncode == 0
    shards = {p.name: p.read_bytes() for p in (tmp_path / "out" / "data").iterdir()}
    server.reset_counters()
    result = run_cli("run", str(config))
    assert result.returncode == 0, result.stderr
    assert server.requests == 0
    assert {p.name: p.read_bytes() for p in (tmp_path / "out" / "data").iterdir()} == shards


@pytest.mark.slow
def test_retry_errors_asks_only_for_the_failed_rows(server, tmp_path):
    config, rows, broken = _setup(server, tmp_path)
    refused = {3, 30, 31, 77}
    sizes = {f"{64 + i % 400}x{48 + i // 400 + i % 7}" for i in refused}
    server.status_for = lambda info: 400 if f"{info.width}x{info.height}" in sizes else None
    assert run_cli("run", str(config)).returncode == 0
    ds = load_out(tmp_path / "out")
    assert {i for i, e in enumerate(ds["error"]) if e and e.startswith("RequestError")} == refused
    shard_times = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out" / "data").iterdir()}

    server.status_for = None  # the server recovers
    server.reset_counters()
    result = run_cli("run", str(config), "--retry-errors")
    assert result.returncode == 0, result.stderr
    assert server.requests == len(refused)  # broken images fail again locally, without a request
    check_output(tmp_path / "out", rows, broken)
    rewritten = {name for name, t in shard_times.items()
                 if (tmp_path / "out" / "data" / name).stat().st_mtime_ns != t}
    # Shards with errors are rewritten (the refused rows' and the broken images'); clean ones are not.
    assert {"train-000000.parquet", "train-000001.parquet", "train-000003.parquet"} <= rewritten
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["errors"] == {"ImageError": len(broken)} and summary["complete"]

    server.reset_counters()  # and once more: only the broken images, which cost no request
    assert run_cli("run", str(config), "--retry-errors").returncode == 0
    assert server.requests == 0


def test_runs_resume_and_retry_across_log_segments(server, tmp_path, monkeypatch):
    """The engine through sealed segments: --retry-errors and a rerun of a finished run."""
    from capstream import run
    from capstream.io.results_log import ResultsLog

    monkeypatch.setattr(ResultsLog, "segment_bytes", 2000)
    monkeypatch.setenv("FAKE_KEY", "sk-test-secret-123")
    config, rows, broken = _setup(server, tmp_path)
    refused = {3, 30, 77}
    sizes = {f"{64 + i % 400}x{48 + i // 400 + i % 7}" for i in refused}
    server.status_for = lambda info: 400 if f"{info.width}x{info.height}" in sizes else None
    run(str(config), show_progress=False)
    assert len(list((tmp_path / "out" / ".capstream").glob("results.0*.jsonl.summary.json"))) >= 3
    server.status_for = None
    server.reset_counters()
    run(str(config), retry_errors=True, show_progress=False)
    assert server.requests == len(refused)
    check_output(tmp_path / "out", rows, broken)
    server.reset_counters()
    summary = run(str(config), show_progress=False).summary
    assert server.requests == 0 and summary.complete
    assert summary.paid_input_tokens == json.loads((tmp_path / "out" / "summary.json").read_text())["paid_input_tokens"]


def test_a_folder_written_by_the_previous_release_resumes(server, tmp_path):
    """tests/data/previous_release/out: a run the release before the run core stopped part way (two
    shards, five answers of a third chunk in its log). The rerun takes its manifest, its log and its
    shards as they are: it asks only the rows not answered, and the output is whole."""
    import shutil

    folder = tmp_path / "previous"
    shutil.copytree(REPO / "tests" / "data" / "previous_release", folder)
    manifest = json.loads((folder / "out" / ".capstream" / "manifest.json").read_text())
    old_url = manifest["fingerprint"]["model.base_url"]
    for name in ("config.yaml", "out/.capstream/manifest.json", "out/.capstream/config.json"):
        path = folder / name
        path.write_text(path.read_text().replace(old_url, server.url))  # this test's server, same settings
    logged_ok = [json.loads(line) for line in (folder / "out" / ".capstream" / "results.jsonl").read_text().splitlines()]
    logged_ok = [r for r in logged_ok if r["e"] is None]
    assert sorted(manifest["done"]) == ["0", "1"] and len(logged_ok) == 19

    result = run_cli("run", "config.yaml", cwd=folder)
    assert result.returncode == 0, result.stderr
    rows, broken = make_rows(40, broken_every=10)
    check_output(folder / "out", rows, broken)
    assert server.requests == 40 - len(broken) - len(logged_ok)  # nothing logged was asked again
    summary = json.loads((folder / "out" / "summary.json").read_text())
    assert summary["complete"] and summary["rows_from_log"] == 5 and summary["started"] < summary["finished"]
