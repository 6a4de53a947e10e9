#!/usr/bin/env python
"""How fast ``capstream view`` is on a large output: writing the site, and its first page in Chromium.

Makes a dataset of N small distinct JPEGs (every 100th broken), captions it with ``capstream run``
against the fake OpenAI-compatible server (no latency; a real run, through the real HTTP path),
then times ``capstream view`` (once making every thumbnail, once again re-using them) and, in
headless Chromium, the first page: from the start of navigation until the page shows its 50 rows
with every thumbnail loaded (``performance.now()`` at that moment), several times. It also times
the first "errors only" filter (which loads the per-row facets) and a search over every row.

    python scripts/view_bench.py                    # 100,000 rows (the run takes a few minutes)
    python scripts/view_bench.py --rows 10000 --work /tmp/view-bench --loads 5
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from capstream.testing.browser import chromium, missing

FIRST_PAGE = """() => {
    const cards = document.querySelectorAll('#grid .card');
    const images = [...document.querySelectorAll('#grid img')];
    return cards.length === 50 && images.length > 0 && images.every(i => i.complete && i.naturalWidth > 0);
}"""


def _base_jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (48, 32), (90, 140, 200)).save(buf, "JPEG", quality=80)
    return buf.getvalue()


def dataset(rows: int, folder: Path) -> Path:
    """``rows`` distinct 48x32 JPEGs (a comment segment names the row), every 100th one broken."""
    import datasets

    path = folder / f"small-{rows}.parquet"
    if path.exists():
        return path
    base = _base_jpeg()

    def gen():
        for i in range(rows):
            if i % 100 == 99:
                yield {"id": i, "image": {"bytes": b"not an image", "path": None}}
                continue
            comment = f"row {i}".encode()
            data = base[:2] + b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment + base[2:]
            yield {"id": i, "image": {"bytes": data, "path": None}}

    features = datasets.Features({"id": datasets.Value("int64"), "image": datasets.Image()})
    datasets.Dataset.from_generator(gen, features=features, cache_dir=str(folder / "hf")).to_parquet(
        str(path), batch_size=1000)
    return path


def caption(data: Path, out: Path, work: Path, rows: int) -> float | None:
    """Run capstream over ``data`` into ``out`` (skipped when ``out`` already holds that finished run)."""
    summary = out / "summary.json"
    if summary.exists():
        done = json.loads(summary.read_text())
        if done.get("complete") and done.get("rows") == rows:
            return None
    server = subprocess.Popen([sys.executable, "-m", "capstream.testing.openai_server", "--port", "0", "--latency", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        url = server.stdout.readline().strip()
        config = {"dataset": {"path": "parquet", "data_files": str(data)},
                  "model": {"provider": "openai", "name": "fake-vlm", "base_url": url, "api_key_env": None},
                  "limits": {"max_concurrency": 64}, "run": {"chunk_size": 1000, "cache": False},
                  "output": {"dir": str(out)}}
        path = work / "view-bench.yaml"
        path.write_text(yaml.safe_dump(config))
        started = time.monotonic()
        subprocess.run([sys.executable, "-m", "capstream.cli", "run", str(path), "--no-progress", "--overwrite"],
                       check=True, stderr=subprocess.DEVNULL)
        return time.monotonic() - started
    finally:
        server.terminate()
        server.wait()


def build(out: Path) -> tuple[float, str]:
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "capstream.cli", "view", str(out)], check=True,
                            capture_output=True, text=True)
    return time.monotonic() - started, result.stderr.strip().splitlines()[-1]


def first_page_ms(index: Path, loads: int) -> tuple[list[float], float, float]:
    """The first page's time, ``loads`` times (a fresh page each); then the errors filter and a search."""
    times = []
    with chromium() as context:
        for _ in range(loads):
            page = context.new_page()
            page.goto(index.resolve().as_uri(), wait_until="commit")
            page.wait_for_function(FIRST_PAGE, polling="raf", timeout=60_000)
            times.append(page.evaluate("performance.now()"))
            page.close()
        page = context.new_page()
        page.goto(index.resolve().as_uri())
        page.wait_for_function(FIRST_PAGE, polling="raf", timeout=60_000)
        started = page.evaluate("performance.now()")
        page.click("#errors-only")
        page.wait_for_function("document.getElementById('shown').textContent.includes('(of ')", polling="raf")
        errors_ms = page.evaluate("performance.now()") - started
        started = page.evaluate("performance.now()")
        page.fill("#search", "no such text anywhere")
        page.wait_for_function("document.getElementById('shown').textContent.startsWith('0 rows')", polling="raf",
                               timeout=120_000)
        search_ms = page.evaluate("performance.now()") - started - 250  # less the input's debounce
    return times, errors_ms, search_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--loads", type=int, default=5, help="first-page loads to time")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "capstream-view-bench")
    args = parser.parse_args()
    if (reason := missing()) is not None:
        raise SystemExit(f"no browser: {reason}")
    args.work.mkdir(parents=True, exist_ok=True)
    out = args.work / f"out-{args.rows}"
    run_s = caption(dataset(args.rows, args.work), out, args.work, args.rows)
    if run_s is not None:
        print(f"capstream run: {args.rows:,} rows in {run_s:.1f} s", flush=True)
    import shutil

    shutil.rmtree(out / "view", ignore_errors=True)
    first_s, first_line = build(out)
    again_s, again_line = build(out)
    print(f"capstream view, first: {first_s:.1f} s ({first_line})")
    print(f"capstream view, again: {again_s:.1f} s ({again_line})")
    size = sum(p.stat().st_size for p in (out / "view").rglob("*") if p.is_file())
    files = sum(1 for p in (out / "view").rglob("*") if p.is_file())
    print(f"view folder: {size / 2**20:.0f} MB in {files:,} files")
    times, errors_ms, search_ms = first_page_ms(out / "view" / "index.html", args.loads)
    print(f"first page ({args.rows:,} rows, 50 shown with their thumbnails): median {statistics.median(times):.0f} ms, "
          f"max {max(times):.0f} ms over {len(times)} loads ({', '.join(f'{t:.0f}' for t in times)})")
    print(f"errors only (loads the facets): {errors_ms:.0f} ms; a search over every row: {search_ms:.0f} ms")
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
