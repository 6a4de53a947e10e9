"""``capstream view``: the site it writes from real runs (finished, stopped, of the previous release),
read back from its data files; the pages in a browser are tests/browser's."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from importlib.util import find_spec
from pathlib import Path

import pytest

from capstream.io.events_log import read_events
from capstream.io.layout import OutputLayout

from conftest import REPO, make_rows, run_cli, write_config, write_parquet

SECRET = "sk-test-secret-123"  # run_cli's FAKE_KEY


def script_data(path: Path):
    """The data a data script of the site passes to the gallery (``capstream.block(n, rows);`` ...)."""
    text = path.read_text()
    inner = text[text.index("(") + 1: text.rindex(")")]
    return json.loads(inner.split(", ", 1)[1] if text.startswith("capstream.block(") else inner)


def site_data(view: Path) -> tuple[dict, list[dict], dict]:
    """The gallery's index, every row in order, and the facets."""
    meta = script_data(view / "pages" / "index.js")
    rows = [row for n in range(meta["blocks"]) for row in script_data(view / "pages" / f"rows-{n:06d}.js")]
    return meta, rows, script_data(view / "pages" / "facets.js")


def plotted_series(svg: Path) -> list[str]:
    """The ids of the plotted series in an SVG the report drew (plots.py names them series-...)."""
    return re.findall(r'id="(series-[^"]+)"', svg.read_text())


@pytest.fixture
def finished(server, tmp_path, parquet_300):
    """300 rows, every 10th image broken, through 5% random 429s: a finished run."""
    data, broken = parquet_300
    server.p429 = 0.05
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", server.url, data, out, model={"price_input_per_mtok": 1.0,
                                                                              "price_output_per_mtok": 2.0})
    assert run_cli("run", str(config)).returncode == 0
    return out, broken


def test_view_of_a_finished_run(finished):
    out, broken = finished
    result = run_cli("view", str(out))
    assert result.returncode == 0, result.stderr
    view = out / "view"
    assert result.stdout.splitlines()[0] == str(view / "index.html")
    meta, rows, facets = site_data(view)
    assert meta["rows"] == len(rows) == 300 and meta["complete"] and meta["pending"] == 0
    assert meta["errors"] == len(broken) and meta["by_kind"] == {"ImageError": len(broken)}
    assert [row["k"] for row in rows] == [f"row {i}" for i in range(300)]  # every shard, in source order
    for i, row in enumerate(rows):
        if i in broken:
            assert "t" not in row and row["e"].startswith("ImageError: ") and facets["k"][0][i] == 1
        else:  # its thumbnail, its answer with what the log knows of it
            assert (view / row["t"]).is_file() and row["a"][0]["v"].startswith("image ") and facets["k"][0][i] == 0
            assert row["a"][0]["ti"] > 0 and row["a"][0]["ms"] >= 0 and row["a"][0]["n"] >= 1
    assert len(list((view / "thumbs").rglob("*.jpg"))) == 300 - len(broken)
    # Nothing of the environment reached the site: not the key, whatever the rows say.
    for path in view.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


@pytest.mark.skipif(find_spec("matplotlib") is None, reason="the report's plots need the view extra: "
                                                            "pip install -e '.[view]'")
def test_the_report_of_a_finished_run_draws_what_happened(finished):
    out, _ = finished
    assert run_cli("view", str(out)).returncode == 0
    view = out / "view"
    # The run's events were logged as they happened, and every figure has data.
    events = read_events(OutputLayout(out, "train").events_logs())
    retried = [a for a in events.attempts if a.retried and a.status == 429]
    assert retried and [m.what for m in events.marks] == ["started", "stopped"]
    report = (view / "report.html").read_text()
    for plot in ("rate", "latency", "retries", "tokens", "errors"):
        assert f'src="report/{plot}.svg"' in report and plotted_series(view / "report" / f"{plot}.svg"), plot
    assert f"attempts retried</th><td>{sum(1 for a in events.attempts if a.retried)}" in report
    assert "series-cost" in plotted_series(view / "report" / "tokens.svg")
    assert "No limit was in force" in report  # none configured, none announced by this server


def test_without_matplotlib_the_report_gives_its_figures_as_tables(finished, monkeypatch):
    from capstream.view import build_view

    out, broken = finished
    monkeypatch.setitem(sys.modules, "capstream.view.plots", None)  # as if the view extra were not installed
    site = build_view(out)
    report = site.report.read_text()
    assert 'pip install "capstream[view]"' in report and "<img" not in report
    assert f"ImageError</th><td>{len(broken)} rows" in report and "attempts retried" in report
    assert site.rows == 300 and not list((out / "view" / "report").glob("*.svg"))


def test_the_report_gives_each_prompts_retries(server, tmp_path, parquet_300):
    """Several prompts: the retries each prompt's answers needed, from the attempts the log records."""
    data, broken = parquet_300
    server.p429 = 0.1
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", server.url, data, out, retry={"max_attempts": 10, "max_wait_s": 0.2},
                          prompts={"caption": {"text": "Describe."}, "short": {"text": "One word."}})
    assert run_cli("run", str(config)).returncode == 0
    needed = {"caption": 0, "short": 0}
    for log in OutputLayout(out, "train").results_logs():
        for line in log.read_text().splitlines():
            record = json.loads(line)
            needed[record["p"]] += record.get("n", 1) - 1
    assert sum(needed.values()) > 0  # some answers were retried
    assert run_cli("view", str(out)).returncode == 0
    report = (out / "view" / "report.html").read_text()
    for name, n in needed.items():
        assert f"prompt {name}: retries its answers needed</th><td>{n:,}<" in report, name


def test_a_second_view_reuses_the_thumbnails(finished):
    out, _ = finished
    assert run_cli("view", str(out)).returncode == 0
    thumb = out / "view" / "thumbs" / "000001" / "0.jpg"
    made = thumb.stat().st_mtime_ns
    again = run_cli("view", str(out))
    assert again.returncode == 0 and " 0 thumbnails made" in again.stderr
    shard = OutputLayout(out, "train").shard_path(1)
    os.utime(shard)  # a shard rewritten (--retry-errors): its chunk's thumbnails are made again
    third = run_cli("view", str(out))
    assert re.search(r" (\d+) thumbnails made", third.stderr).group(1) == str(sum(
        1 for i in range(64, 128) if i % 10 != 9))
    assert thumb.stat().st_mtime_ns > made


def test_view_of_a_stopped_run_shows_what_is_done(server, tmp_path):
    rows, _ = make_rows(200, broken_every=25)
    data = write_parquet(tmp_path / "src.parquet", rows)
    out = tmp_path / "out"
    # About 280 tokens a request at $1,000 per million: the budget stops the run inside its second chunk.
    config = write_config(tmp_path / "c.yaml", server.url, data, out, limits={"max_concurrency": 2},
                          model={"price_input_per_mtok": 1000.0, "price_output_per_mtok": 0.0},
                          run={"max_cost_usd": 25.0, "chunk_size": 64})
    assert run_cli("run", str(config)).returncode == 1
    assert run_cli("view", str(out)).returncode == 0
    meta, site_rows, _ = site_data(out / "view")
    assert not meta["complete"] and meta["written"] == 64 and meta["pending"] > 0
    assert meta["rows"] == len(site_rows) == 64 + meta["pending"]
    pending = [row for row in site_rows if not row["w"]]
    assert all(row["c"] == 1 and "t" not in row and "chunk 1" in row["in"] for row in pending)
    positions = [row["x"] for row in pending]  # answered out of order, shown in source order
    assert positions == sorted(positions) and all(64 <= x < 128 for x in positions)
    report = (out / "view" / "report.html").read_text()
    assert "not complete (stopped: run.max_cost_usd reached" in report


def test_view_of_a_run_still_going(server, tmp_path):
    """Viewed while the run writes: the chunks written, the answers logged since; again at the end: all."""
    rows, _ = make_rows(320)
    data = write_parquet(tmp_path / "src.parquet", rows)
    out = tmp_path / "out"
    server.latency = 0.1  # 320 rows two at a time: about 16 s
    config = write_config(tmp_path / "c.yaml", server.url, data, out, limits={"max_concurrency": 2})
    env = {**os.environ, "FAKE_KEY": SECRET}
    run = subprocess.Popen([sys.executable, "-m", "capstream.cli", "run", str(config), "--no-progress"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=REPO)
    try:
        manifest = OutputLayout(out, "train").manifest
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (manifest.exists() and json.loads(manifest.read_text())["done"]):
            time.sleep(0.05)
        assert run_cli("view", str(out)).returncode == 0
        meta, site_rows, _ = site_data(out / "view")
        assert run.poll() is None, "the run ended before it was viewed: make it slower"
        assert not meta["complete"] and meta["written"] >= 64 and meta["rows"] == len(site_rows) < 320
        written = [row["x"] for row in site_rows if row["w"]]  # chunks finish in any order: shown in source order
        assert len(written) == meta["written"] and written == sorted(written)
        assert "running, or killed" in (out / "view" / "report.html").read_text()
    finally:
        assert run.wait(timeout=120) == 0
    assert run_cli("view", str(out)).returncode == 0
    meta, site_rows, _ = site_data(out / "view")
    assert meta["complete"] and meta["pending"] == 0 and len(site_rows) == 320


def test_view_of_a_folder_of_the_previous_release_says_what_it_cannot_show(tmp_path):
    out = tmp_path / "out"
    shutil.copytree(REPO / "tests" / "data" / "previous_release" / "out", out)
    result = run_cli("view", str(out))
    assert result.returncode == 0, result.stderr
    meta, rows, _ = site_data(out / "view")
    assert meta["written"] == 16 and meta["pending"] == 5 and len(rows) == 21
    report = (out / "view" / "report.html").read_text()
    assert "Not recorded: no answer in the results log carries its latency" in report
    assert report.count("this folder has no events log") == 2  # retries, limits
    assert "have no time (logged by a capstream that did not record it)" in report


def test_view_refuses_a_folder_that_is_not_an_output(tmp_path):
    result = run_cli("view", str(tmp_path))
    assert result.returncode == 2 and "not a capstream output folder" in result.stderr
    assert not (tmp_path / "view").exists()


def test_view_serve_serves_on_localhost(finished):
    out, _ = finished
    env = {**os.environ, "FAKE_KEY": SECRET}
    proc = subprocess.Popen([sys.executable, "-m", "capstream.cli", "view", str(out), "--serve"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        path, url = proc.stdout.readline().strip(), proc.stdout.readline().strip()
        assert path == str(out / "view" / "index.html")
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/index\.html", url), url
        with urllib.request.urlopen(url, timeout=10) as page:
            assert page.status == 200 and b'src="pages/index.js"' in page.read()
        with urllib.request.urlopen(url.replace("index.html", "pages/rows-000000.js"), timeout=10) as data:
            assert data.read().startswith(b"capstream.block(0, ")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_view_open_hands_the_page_to_the_browser(finished, tmp_path):
    """``--open`` opens the page with the user's browser ($BROWSER here: a script that notes what it got)."""
    out, _ = finished
    noted = tmp_path / "opened.txt"
    script = tmp_path / "browser.py"
    script.write_text(f"import sys\nopen({str(noted)!r}, 'w').write(sys.argv[1])\n")
    result = run_cli("view", str(out), "--open", env={"BROWSER": f"{sys.executable} {script} %s"})
    assert result.returncode == 0, result.stderr
    assert noted.read_text() == (out / "view" / "index.html").resolve().as_uri()
