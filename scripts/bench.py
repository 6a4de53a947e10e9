#!/usr/bin/env python
"""Throughput and memory benchmark: capstream against chunked LCEL ``abatch``, side by side, one run.

Every scenario starts its own fake OpenAI-compatible server (``capstream.testing.openai_server``, a
separate process on 127.0.0.1) and runs, each in its own subprocess, against the same data:

* capstream: ``capstream run`` with the scenario's config;
* baseline: chunked LCEL ``abatch``, the common LangChain recipe: a plain LCEL chain (message builder | ChatOpenAI |
  StrOutputParser) and ``chain.abatch(chunk, config={"max_concurrency": n})`` per chunk.

Rates are rows over the work time each side reports (from opening the dataset to the last row
written, Python's import time excluded; it is the same for both); the wall time of the whole
subprocess is shown too. Peak RSS is that of the subprocess's whole process tree (its RSS and its
children's, summed, sampled every 0.1 s; at least the subprocess's own peak from ``wait4``); CPU
seconds are the subprocess's with its worker processes, and the fake server's in brackets: on 2
cores they share the machine.

The ``urls`` scenario runs capstream twice on the same rows, as image bytes in the parquet and as
URLs served by a fake image host (``capstream.testing.image_host``, in this process) with CDN-like
latency and faults (404s, a first-GET 503, ``X-Robots-Tag: noai``), and checks what the URL run
did: every good row captioned, each image downloaded once (twice where the 503 was retried), the
404 and opted-out rows' errors, rows in order; then that a 127.0.0.1 URL is refused with default
settings (the host receives no request), and ``capstream estimate`` on 300 URLs at 0.2 s each.

    python scripts/bench.py                 # every scenario (about 15 minutes on 2 cores)
    python scripts/bench.py --only zero     # scenarios whose name contains "zero"
    python scripts/bench.py --list
    python scripts/bench.py --bounds        # the best any client can do against the heavy-tail server
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEAVY_TAIL = ["--latency-lognormal", "0.5", "0.5", "--stragglers", "0.02", "10"]
HEAVY_TAIL_MEAN_S = 0.5 * 2.718281828 ** (0.5**2 / 2) * (0.98 + 0.02 * 10)  # lognormal mean x stragglers


@dataclass
class Scenario:
    name: str
    rows: int
    concurrency: int
    chunk: int
    server_args: list[str]
    limits: dict = field(default_factory=dict)
    run: dict = field(default_factory=dict)  # extra run.* keys for capstream
    streaming: bool = False
    ceiling: float | None = None  # rows/s a perfect client reaches
    baseline: bool = True  # also run the baseline (chunked LCEL abatch)
    baseline_of: str | None = None  # compare with the baseline side of this scenario (same data and server)
    compare_local: bool = False  # also run the local backend (fast server, no limit) and compare outputs
    folder_files: int = 0  # read a folder of this many parquet files (dataset.path: the folder; limit: rows)
    urls: bool = False  # the same rows as bytes and as URLs served by a fake image host, side by side
    note: str = ""


SCENARIOS = [
    Scenario("heavy-tail-2000", 2000, 32, 256, HEAVY_TAIL, ceiling=32 / HEAVY_TAIL_MEAN_S,
             note="lognormal latency (median 0.5 s, sigma 0.5), 2% stragglers at 10x"),
    Scenario("heavy-tail-8000", 8000, 32, 256, HEAVY_TAIL, ceiling=32 / HEAVY_TAIL_MEAN_S, baseline=False,
             note="the same, 8000 rows, against the ceiling"),
    Scenario("zero-latency-3000", 3000, 64, 256, ["--latency", "0"], note="the client's CPU is the limit"),
    Scenario("zero-latency-3000-workers-2", 3000, 64, 256, ["--latency", "0"], run={"workers": 2}, baseline=False,
             baseline_of="zero-latency-3000",
             note="the same with run.workers: 2"),
    Scenario("rpm-600-configured", 900, 32, 100, ["--latency", "0.2", "--rpm-limit", "600"],
             limits={"requests_per_minute": 600}, ceiling=10.0, note="server allows 600/min; 600 configured"),
    Scenario("rpm-600-unconfigured", 900, 32, 100, ["--latency", "0.2", "--rpm-limit", "600"],
             ceiling=10.0, note="server allows 600/min; no limit configured"),
    Scenario("ray-rpm-600-workers-2", 1200, 32, 100, ["--latency", "0.2", "--rpm-limit", "600"],
             limits={"requests_per_minute": 600}, run={"backend": "ray", "workers": 2}, ceiling=10.0, baseline=False,
             compare_local=True, note="run.backend: ray, 2 workers, one global limit; server allows 600/min, "
                                      "600 configured; seconds include starting Ray"),
    Scenario("stream-memory-4000", 4000, 32, 256, ["--latency", "0"], streaming=True, note="peak RSS"),
    Scenario("stream-memory-16000", 16000, 32, 256, ["--latency", "0"], streaming=True, note="peak RSS"),
    Scenario("stream-folder-4000", 4000, 32, 256, ["--latency", "0"], streaming=True, folder_files=4, baseline=False,
             note="peak RSS: a folder of 4 files x 4,000 rows (dataset.path: the folder), dataset.limit 4000"),
    Scenario("stream-folder-16000", 16000, 32, 256, ["--latency", "0"], streaming=True, folder_files=4,
             baseline=False, note="peak RSS: the whole folder"),
    Scenario("urls-vs-bytes-2000", 2000, 32, 256, HEAVY_TAIL, ceiling=32 / HEAVY_TAIL_MEAN_S, baseline=False,
             urls=True, note="the heavy-tail server; the same rows as bytes and as URLs (image host: lognormal "
                             "latency, median 0.2 s, sigma 0.5; 2% 404, 5% a first-GET 503, 1% X-Robots-Tag: noai)"),
]
FOLDER_ROWS_PER_FILE = 4000
URL_MISSING, URL_FLAKY, URL_OPTED_OUT = (lambda i: i % 50 == 7), (lambda i: i % 20 == 3), (lambda i: i % 100 == 42)


# --- data ------------------------------------------------------------------------------------------

def _base_jpeg() -> bytes:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (640, 480))
    draw = ImageDraw.Draw(img)
    for y in range(0, 480, 8):
        draw.rectangle([0, y, 640, y + 8], fill=(y % 256, (y * 3) % 256, 255 - y % 256))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def _unique_jpeg(base: bytes, i: int) -> bytes:
    """The same picture with a comment segment naming the row: distinct bytes, no encode per row."""
    comment = f"row {i}".encode()
    return base[:2] + b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment + base[2:]


def dataset_file(rows: int, folder: Path) -> Path:
    """A parquet file of ``rows`` distinct 640x480 JPEGs (made once, kept in the bench folder)."""
    import datasets

    path = folder / f"images-{rows}-rg100.parquet"
    if path.exists():
        return path
    base = _base_jpeg()
    features = datasets.Features({"id": datasets.Value("int64"), "image": datasets.Image()})

    def gen():
        for i in range(rows):
            yield {"id": i, "image": {"bytes": _unique_jpeg(base, i), "path": None}}

    # Row groups of 100 rows, as the Hub writes image datasets: a streaming reader holds one group at
    # a time, so groups of thousands of images would measure the file's layout, not the client.
    datasets.Dataset.from_generator(gen, features=features, cache_dir=str(folder / "hf")).to_parquet(
        str(path), batch_size=100)
    return path


def dataset_folder(files: int, rows_per_file: int, folder: Path) -> Path:
    """A folder of ``files`` parquet files of ``rows_per_file`` distinct 640x480 JPEGs each, row groups
    of 100 rows (the layout of issue 15's memory figures)."""
    import datasets

    path = folder / f"folder-{files}x{rows_per_file}-rg100"
    if path.exists():
        return path
    base = _base_jpeg()
    features = datasets.Features({"id": datasets.Value("int64"), "image": datasets.Image()})
    made = folder / (path.name + ".partial")
    made.mkdir(exist_ok=True)
    for part in range(files):
        def gen(part=part):
            for i in range(part * rows_per_file, (part + 1) * rows_per_file):
                yield {"id": i, "image": {"bytes": _unique_jpeg(base, i), "path": None}}

        datasets.Dataset.from_generator(gen, features=features, cache_dir=str(folder / "hf")).to_parquet(
            str(made / f"part-{part:05d}.parquet"), batch_size=100)
    made.rename(path)
    return path


def url_dataset(data: Path, host, folder: Path) -> Path:
    """The rows of ``data`` with each image as a URL on ``host`` (its bytes served there), and the
    host's faults set (404s, a first-GET 503, opt-outs)."""
    import datasets
    import pyarrow.parquet as pq

    table = pq.read_table(data)
    ids, images = table.column("id").to_pylist(), table.column("image").to_pylist()
    for i, image in zip(ids, images):
        host.images[f"/img/{i}.jpg"] = image["bytes"]
    host.missing |= {f"/img/{i}.jpg" for i in ids if URL_MISSING(i)}
    host.fail_first |= {f"/img/{i}.jpg" for i in ids if URL_FLAKY(i)}
    host.opt_out.update({f"/img/{i}.jpg": "noai" for i in ids if URL_OPTED_OUT(i)})
    path = folder / f"urls-{data.stem}.parquet"
    features = datasets.Features({"id": datasets.Value("int64"), "url": datasets.Value("string")})
    datasets.Dataset.from_dict({"id": ids, "url": [host.url(f"/img/{i}.jpg") for i in ids]},
                               features=features).to_parquet(str(path))
    return path


# --- the fake server -------------------------------------------------------------------------------

class Server:
    def __init__(self, args: list[str]):
        self.proc = subprocess.Popen([sys.executable, "-m", "capstream.testing.openai_server", "--port", "0", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.url = self.proc.stdout.readline().strip()

    def stats(self) -> dict:
        with urllib.request.urlopen(self.url.rsplit("/v1", 1)[0] + "/stats", timeout=30) as r:
            return json.loads(r.read())

    def stop(self) -> float:
        """Stop the server; return the CPU seconds it used."""
        self.proc.terminate()
        _, status, usage = os.wait4(self.proc.pid, 0)
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        return usage.ru_utime + usage.ru_stime


# --- the two sides ---------------------------------------------------------------------------------

def tree_rss_mb(pid: int) -> float:
    """The RSS of ``pid`` and all its descendants, summed, in MB (from /proc; 0 where unreadable)."""
    total_kb, todo = 0, [pid]
    while todo:
        proc = todo.pop()
        try:
            with open(f"/proc/{proc}/status") as status:
                total_kb += next((int(line.split()[1]) for line in status if line.startswith("VmRSS:")), 0)
            for task in os.listdir(f"/proc/{proc}/task"):
                with open(f"/proc/{proc}/task/{task}/children") as children:
                    todo += [int(child) for child in children.read().split()]
        except (OSError, ValueError):  # gone meanwhile, or no /proc
            pass
    return total_kb / 1024


def run_measured(cmd: list[str], env: dict | None = None) -> tuple[float, float, float, str]:
    """Run a subprocess; return wall seconds, the peak RSS of its process tree in MB (sampled every
    0.1 s; at least its own peak), CPU seconds (its own and its reaped children's: capstream's worker
    processes) and its stdout."""
    started = time.monotonic()
    peak_tree = 0.0
    with tempfile.TemporaryFile(mode="w+") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.DEVNULL, env={**os.environ, **(env or {})},
                                cwd=REPO)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            peak_tree = max(peak_tree, tree_rss_mb(proc.pid))
            time.sleep(0.1)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {proc.returncode}")
    return time.monotonic() - started, max(peak_tree, usage.ru_maxrss / 1024), usage.ru_utime + usage.ru_stime, text


def run_capstream(sc: Scenario, url: str, data: Path, work: Path, out: Path | None = None,
                  dataset: dict | None = None, image: dict | None = None) -> dict:
    import yaml

    out = out or work / f"out-{sc.name}"
    if dataset is None:
        dataset = {"path": str(data)} if data.is_dir() else {"path": "parquet", "data_files": str(data)}
        if data.is_dir() and sc.rows < sc.folder_files * FOLDER_ROWS_PER_FILE:
            dataset["limit"] = sc.rows
    config = {
        "dataset": {**dataset, "streaming": sc.streaming},
        "model": {"provider": "openai", "name": "fake-vlm", "base_url": url, "api_key_env": None, "timeout_s": 60},
        "limits": {"max_concurrency": sc.concurrency, **sc.limits},
        "retry": {"max_attempts": 10, "max_wait_s": 30},
        "run": {"chunk_size": sc.chunk, "cache": False, **sc.run},  # every scenario buys every answer
        "output": {"dir": str(out)},
        "image": image or {},
    }
    path = work / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    wall, rss, cpu, _ = run_measured([sys.executable, "-m", "capstream.cli", "run", str(path), "--no-progress",
                                      "--overwrite"])
    summary = json.loads((out / "summary.json").read_text())
    return {"wall": wall, "rss": rss, "cpu": cpu, "seconds": summary["seconds"], "ok": summary["ok"], "rows": summary["rows"],
            "startup_s": summary.get("startup_s")}


def run_baseline(sc: Scenario, url: str, data: Path) -> dict:
    args = json.dumps({"url": url, "data": str(data), "chunk": sc.chunk, "concurrency": sc.concurrency,
                       "streaming": sc.streaming})
    wall, rss, cpu, text = run_measured([sys.executable, __file__, "--baseline-side", args])
    result = json.loads(text.strip().splitlines()[-1])
    return {"wall": wall, "rss": rss, "cpu": cpu, **result}


async def _baseline(url: str, data: str, chunk: int, concurrency: int, streaming: bool) -> dict:
    """Chunked LCEL ``abatch``, the common LangChain recipe: ``chain.abatch(chunk, config={"max_concurrency": n})``."""
    import datasets
    from langchain_core.messages import HumanMessage
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.runnables import RunnableLambda
    from langchain_openai import ChatOpenAI

    def build_caption_message(image_url: str):
        return [HumanMessage(content=[{"type": "text", "text": "Caption this image."},
                                      {"type": "image_url", "image_url": {"url": image_url}}])]

    llm = ChatOpenAI(model="fake-vlm", base_url=url, api_key="not-needed", timeout=60)
    chain = RunnableLambda(build_caption_message) | llm | StrOutputParser()
    started = time.monotonic()
    ds = datasets.load_dataset("parquet", data_files=data, split="train", streaming=streaming)
    ds = ds.cast_column("image", datasets.Image(decode=False))
    ok = rows = 0
    for batch in ds.iter(batch_size=chunk):
        urls = ["data:image/jpeg;base64," + base64.b64encode(img["bytes"]).decode() for img in batch["image"]]
        results = await chain.abatch(urls, config={"max_concurrency": concurrency}, return_exceptions=True)
        rows += len(results)
        ok += sum(1 for r in results if isinstance(r, str))
    return {"seconds": time.monotonic() - started, "ok": ok, "rows": rows}


def best_case_seconds(rows: int, concurrency: int, chunk: int | None = None, server_seed: int = 0) -> float:
    """Seconds a client with no time of its own needs against the heavy-tail server: it draws each
    request's latency in arrival order from a fixed seed (``--seed``, 0 in every scenario), so the
    schedule is known. Slots refilled the instant they free (``chunk=None``), or chunk by chunk with
    a barrier (the baseline's chunks)."""
    import heapq
    import random

    from capstream.testing.openai_server import lognormal_latency

    rng, latency = random.Random(server_seed), lognormal_latency(0.5, 0.5, 0.02, 10)
    latencies = []
    for _ in range(rows):
        latencies.append(latency(rng))
        for _ in range(4):  # the server's other draws per request (hang, drop, 429, 500)
            rng.random()
    total = 0.0
    for start in range(0, rows, chunk or rows):
        slots = [0.0] * concurrency
        end = 0.0
        for seconds in latencies[start:start + (chunk or rows)]:
            free = heapq.heappop(slots)
            heapq.heappush(slots, free + seconds)
            end = max(end, free + seconds)
        total += end
    return total


# --- the table -------------------------------------------------------------------------------------

def measure(sc: Scenario, work: Path) -> list[dict]:
    if sc.urls:
        return measure_urls(sc, work)
    data = dataset_folder(sc.folder_files, FOLDER_ROWS_PER_FILE, work) if sc.folder_files else dataset_file(sc.rows, work)
    rows = []
    for side in (["capstream", "baseline"] if sc.baseline else ["capstream"]):
        server = Server(sc.server_args)
        try:
            result = run_capstream(sc, server.url, data, work) if side == "capstream" else run_baseline(sc, server.url, data)
            stats = server.stats()
        finally:
            server_cpu = server.stop()
        by_status = stats["by_status"]
        requests = stats["requests"]
        result.update(
            scenario=sc.name, side=side, rate=result["rows"] / result["seconds"],
            requests=requests, r429=by_status.get("429", 0), server_cpu=server_cpu,
            dups=sum(n - 1 for n in stats["image_requests"].values() if n > 1),
        )
        print(f"  {side:9s} {result['rows']} rows in {result['seconds']:.1f}s = {result['rate']:.1f} rows/s, "
              f"{result['r429']} x 429, peak {result['rss']:.0f} MB, CPU {result['cpu']:.1f} s "
              f"(server {server_cpu:.1f} s)", file=sys.stderr, flush=True)
        rows.append(result)
    if sc.compare_local:
        rows[0]["same_as_local"] = same_as_local(sc, data, work)
        print(f"  output equals the local backend's: {rows[0]['same_as_local']}", file=sys.stderr, flush=True)
    return rows


def measure_urls(sc: Scenario, work: Path) -> list[dict]:
    """The same rows as bytes, then as URLs on a fake image host; what the URL run did, checked."""
    from capstream.testing.image_host import FakeImageHost
    from capstream.testing.openai_server import lognormal_latency

    data = dataset_file(sc.rows, work)
    results = []
    with FakeImageHost(latency=lognormal_latency(0.2, 0.5), seed=0) as host:
        urls = url_dataset(data, host, work)
        for side, source, dataset in (("bytes", data, None), ("urls", urls, {"path": "parquet", "data_files": str(urls),
                                                                             "image_column": "url"})):
            host.reset_counters()
            server = Server(sc.server_args)
            try:
                result = run_capstream(sc, server.url, source, work, work / f"out-{sc.name}-{side}", dataset=dataset,
                                       image={"allow_private_urls": True})  # the host is on 127.0.0.1
                stats = server.stats()
            finally:
                server_cpu = server.stop()
            result.update(scenario=sc.name, side=side, rate=result["rows"] / result["seconds"],
                          requests=stats["requests"], r429=stats["by_status"].get("429", 0), server_cpu=server_cpu,
                          dups=sum(n - 1 for n in stats["image_requests"].values() if n > 1))
            print(f"  {side:9s} {result['rows']} rows in {result['seconds']:.1f}s = {result['rate']:.1f} rows/s, "
                  f"peak {result['rss']:.0f} MB, CPU {result['cpu']:.1f} s (server {server_cpu:.1f} s)",
                  file=sys.stderr, flush=True)
            results.append(result)
        results[-1]["checks"] = url_checks(shards(work / f"out-{sc.name}-urls"), host, sc.rows)
        results[-1]["checks"].update(refusal_check(sc, host, urls, work), **estimate_check(work))
    for name, value in results[-1]["checks"].items():
        print(f"  {name}: {value}", file=sys.stderr, flush=True)
    return results


def url_checks(table, host, rows: int) -> dict:
    """What the URL run did, from its shards and the host's counters."""
    ids, errors, captions = (table.column(c).to_pylist() for c in ("id", "error", "caption"))
    bad = {i for i in range(rows) if URL_MISSING(i) or URL_OPTED_OUT(i)}
    expected_requests = {f"/img/{i}.jpg": 2 if URL_FLAKY(i) and not URL_MISSING(i) else 1 for i in range(rows)}
    return {
        "rows in order": ids == list(range(rows)),
        "good rows captioned": f"{sum(c is not None for i, c in enumerate(captions) if i not in bad)}"
                               f"/{rows - len(bad)}",
        "404 rows saying so": f"{sum('download failed: HTTP 404' in (errors[i] or '') for i in range(rows) if URL_MISSING(i))}"
                              f"/{sum(URL_MISSING(i) for i in range(rows))}",
        "opted-out rows saying so": f"{sum('opted out' in (errors[i] or '') for i in range(rows) if URL_OPTED_OUT(i))}"
                                    f"/{sum(URL_OPTED_OUT(i) for i in range(rows))}",
        "downloads as expected (once; twice after a 503)": dict(host.requests) == expected_requests,
        "images downloaded twice": sum(n == 2 for n in host.requests.values()),
    }


def shards(out: Path):
    """An output folder's shards, in order, as one table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pa.concat_tables([pq.read_table(path) for path in sorted((out / "data").glob("*.parquet"))])


def refusal_check(sc: Scenario, host, urls: Path, work: Path) -> dict:
    """With default settings a 127.0.0.1 URL is refused and the host sees no request."""
    host.reset_counters()
    server = Server(["--latency", "0"])
    out = work / f"out-{sc.name}-defaults"
    try:
        run_capstream(Scenario("defaults", 20, 4, 20, []), server.url, urls, work, out,
                      dataset={"path": "parquet", "data_files": str(urls), "image_column": "url", "limit": 20})
    finally:
        server.stop()
    errors = shards(out).column("error").to_pylist()
    return {"defaults: 20 URLs on 127.0.0.1 refused": sum((e or "").startswith("ImageError: refused") for e in errors),
            "defaults: requests the image host received": sum(host.requests.values())}


def estimate_check(work: Path) -> dict:
    """``capstream estimate`` on 300 URLs answering in 0.2 s each (a host of its own, no faults): the
    command's wall time, imports included; and its image tokens against the estimate of the same
    300 images as bytes (a full read)."""
    import yaml

    from capstream.testing.image_host import FakeImageHost

    data = dataset_file(300, work)
    model = {"name": "gpt-4o", "api_key_env": None}
    with FakeImageHost(latency=0.2) as host:
        urls = url_dataset(data, host, work)
        host.missing.clear()
        host.fail_first.clear()
        host.opt_out.clear()
        found = {}
        for side, config in (("urls", {"dataset": {"path": "parquet", "data_files": str(urls), "image_column": "url"},
                                       "model": model, "image": {"allow_private_urls": True}}),
                             ("bytes", {"dataset": {"path": "parquet", "data_files": str(data)}, "model": model})):
            path = work / f"estimate-{side}.yaml"
            path.write_text(yaml.safe_dump(config))
            host.reset_counters()
            wall, _, _, text = run_measured([sys.executable, "-c", ESTIMATE_TIMED, str(path)],
                                            env={"CAPSTREAM_NO_TIKTOKEN": "1"})
            found[side] = (wall, json.loads(text.strip().splitlines()[-1]), sum(host.requests.values()),
                           sum(host.ranged.values()))
    (wall, by_url, requests, ranged), (bytes_wall, by_bytes, _, _) = found["urls"], found["bytes"]
    return {"estimate: 300 URLs at 0.2 s each, seconds (the same images as bytes)":
                f"{by_url['seconds']:.2f} ({by_bytes['seconds']:.2f})",
            "estimate: the command's wall seconds, imports included (as bytes)": f"{wall:.2f} ({bytes_wall:.2f})",
            "estimate: image tokens by URL = by bytes (a full read)":
                f"{by_url['image_tokens'] == by_bytes['image_tokens']} ({by_url['image_tokens']:,})",
            "estimate: requests to the host (ranged)": f"{requests} ({ranged})"}


# ``capstream estimate CONFIG --json``, its own time measured from opening the dataset (imports excluded).
ESTIMATE_TIMED = """
import json, sys, time
from capstream.config import load_config
from capstream.cost.estimate import estimate
started = time.monotonic()
found = estimate(load_config(sys.argv[1])).as_dict()
print(json.dumps({**found, "seconds": time.monotonic() - started}))
"""


def same_as_local(sc: Scenario, data: Path, work: Path) -> bool:
    """Run the local backend on the same data (fast server, no limit) and compare every shard."""
    import pyarrow.parquet as pq

    local = Scenario(sc.name + "-local", sc.rows, sc.concurrency, sc.chunk, ["--latency", "0"])
    server = Server(local.server_args)
    try:
        run_capstream(local, server.url, data, work)
    finally:
        server.stop()
    mine = sorted((work / f"out-{sc.name}" / "data").glob("*.parquet"))
    theirs = sorted((work / f"out-{local.name}" / "data").glob("*.parquet"))
    return [p.name for p in mine] == [p.name for p in theirs] and all(
        pq.read_table(a).equals(pq.read_table(b)) for a, b in zip(mine, theirs))


def table(results: list[dict]) -> str:
    by = {(r["scenario"], r["side"]): r for r in results}
    lines = ["| scenario | side | rows ok | seconds (wall) | rows/s | vs baseline | of ceiling | requests | 429s | asked twice | peak RSS | CPU s (server's) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for sc in SCENARIOS:
        for side in ("capstream", "baseline", "bytes", "urls"):
            r = by.get((sc.name, side))
            if not r:
                continue
            base = by.get((sc.baseline_of or sc.name, "baseline"))
            vs = f"{r['rate'] / base['rate']:.2f}x" if base and side == "capstream" else ""
            if side == "urls":  # against the same rows as bytes
                vs = f"{r['rate'] / by[(sc.name, 'bytes')]['rate']:.2f}x of bytes"
            ceiling = f"{100 * r['rate'] / sc.ceiling:.0f}%" if sc.ceiling else ""
            lines.append(f"| {sc.name} | {side} | {r['ok']}/{r['rows']} | {r['seconds']:.1f} ({r['wall']:.1f}) | "
                         f"{r['rate']:.1f} | {vs} | {ceiling} | {r['requests']} | {r['r429']} "
                         f"({100 * r['r429'] / max(1, r['requests']):.1f}%) | {r['dups']} | {r['rss']:.0f} MB | "
                         f"{r['cpu']:.1f} ({r['server_cpu']:.1f}) |")
    return "\n".join(lines)


def machine() -> str:
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=[], help="run the scenarios whose name contains one of these")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "capstream-bench"))
    ap.add_argument("--bounds", action="store_true", help="print the best case of the heavy-tail scenarios")
    ap.add_argument("--baseline-side", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.baseline_side:
        print(json.dumps(asyncio.run(_baseline(**json.loads(args.baseline_side)))))
        return
    if args.bounds:
        for sc in SCENARIOS:
            if sc.server_args == HEAVY_TAIL:
                best = best_case_seconds(sc.rows, sc.concurrency)
                line = f"{sc.name}: no client time {best:.1f} s = {sc.rows / best:.1f} rows/s"
                if sc.baseline:
                    chunked = best_case_seconds(sc.rows, sc.concurrency, sc.chunk)
                    line += f"; the baseline's chunks {chunked:.1f} s; ratio {chunked / best:.2f}x"
                    # The same two bounds for other draws of the server's latencies.
                    ratios = sorted(best_case_seconds(sc.rows, sc.concurrency, sc.chunk, s)
                                    / best_case_seconds(sc.rows, sc.concurrency, None, s) for s in range(100))
                    line += (f"\n  server seeds 0-99: ratio median {ratios[50]:.2f}x, min {ratios[0]:.2f}x, "
                             f"max {ratios[-1]:.2f}x, >= 2.2x for {sum(r >= 2.2 for r in ratios)} of 100")
                print(line)
        return
    if args.list:
        for sc in SCENARIOS:
            print(f"{sc.name:24s} {sc.note}")
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    chosen = [sc for sc in SCENARIOS if not args.only or any(o in sc.name for o in args.only)]
    results = []
    for sc in chosen:
        print(f"{sc.name}: {sc.note}", file=sys.stderr, flush=True)
        results.extend(measure(sc, work))
    print(f"\n{machine()}, {time.strftime('%Y-%m-%d')}\n")
    print(table(results))
    for r in results:
        for name, value in r.get("checks", {}).items():
            print(f"- {r['scenario']}: {name}: {value}")
        if "same_as_local" in r:
            print(f"\n{r['scenario']}: output equals the local backend's: {'yes' if r['same_as_local'] else 'NO'}; "
                  f"{r['startup_s']:.1f} s of the {r['seconds']:.1f} s went to starting Ray, its first read and "
                  f"the actors; after that {r['requests'] / (r['seconds'] - r['startup_s']) * 60:.0f} requests/minute")


if __name__ == "__main__":
    main()
