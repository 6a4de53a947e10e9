#!/usr/bin/env python
"""The batch backend's done-when scenario, tried as a new user would, against the fake Files + Batches server.

1,200 rows (every 50th image broken), 3 prompts, ``batch.max_requests: 1000``. The server fails some
lines with a 500 the first time they are asked, refuses one prompt of some rows with a 400, lets its
first batch expire part way and refuses a batch for the enqueued-token limit while two are unfinished.

1. An online run (``run.backend: local``) against the same server: the reference output.
2. A batch run killed three times at random moments (SIGKILL), then run again until it ends.
3. Checks: the output equals the online one shard for shard; each request file within both limits;
   the cost at half the online price; every request in exactly one batch, except the lines the server
   failed or expired, each in exactly one later batch per failure; a rerun of the finished run uploads
   nothing; ``--retry-errors`` (the 400s lifted) submits only the error rows' failed prompts.

    python scripts/batch_scenario.py            # the report, then one line per check
    python scripts/batch_scenario.py --json     # one JSON object

Exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import yaml
from PIL import Image

from capstream.testing.batch_server import FakeBatchOpenAI

KEY = "sk-scenario-key"
PROMPTS = {
    "caption": {"text": "Describe the image. Alt text: {alt}"},
    "short": {"text": "One line for the image ({alt}).", "max_tokens": 40},
    "facts": {"text": "Facts about the image: {alt}", "schema": {"width": "integer", "wide": "boolean"}},
}
FEATURES = datasets.Features({"id": datasets.Value("int64"), "image": datasets.Image(),
                             "alt": datasets.Value("string")})


def jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64 + i % 400, 48 + i // 400 + i % 7), (i % 256, 80, 160)).save(buf, "JPEG")
    return buf.getvalue()


def make_source(folder: Path, n: int) -> Path:
    rows = [{"id": i, "alt": f"row {i}",
             "image": {"bytes": b"not an image" if i % 50 == 49 else jpeg(i), "path": None}} for i in range(n)]
    path = folder / "images.parquet"
    datasets.Dataset.from_list(rows, features=FEATURES).to_parquet(str(path))
    return path


def row_of(text: str) -> int:
    return int(re.search(r"row (\d+)", text).group(1))


class Faults:
    """What the server does to the lines: a 500 the first time for rows 7, 107, ...; a 400 for the
    `short` prompt of rows 13, 113, ... (until lifted)."""

    def __init__(self):
        self.asked = collections.Counter()
        self.refuse = True

    def status_for(self, info) -> int | None:
        row = row_of(info.text)
        self.asked[info.text] += 1
        if self.refuse and row % 100 == 13 and info.text.startswith("One line"):
            return 400
        if row % 100 == 7 and self.asked[info.text] == 1:
            return 500
        return None

    @staticmethod
    def reply(info) -> str:
        if (info.body or {}).get("response_format"):
            return json.dumps({"width": info.width, "wide": info.width > info.height})
        return f"image {info.width}x{info.height}"


def write_config(path: Path, url: str, data: Path, out: Path, backend: str, cache: Path) -> Path:
    config = {"dataset": {"path": "parquet", "data_files": str(data)},
              "model": {"name": "gpt-4o-mini", "base_url": url, "api_key_env": "SCENARIO_KEY", "timeout_s": 10},
              "prompts": PROMPTS, "retry": {"max_attempts": 4, "max_wait_s": 1},
              "run": {"backend": backend, "chunk_size": 250, "cache_dir": str(cache)},
              "batch": {"max_requests": 1000, "poll_s": 0.05}, "output": {"dir": str(out)}}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def capstream(config: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "capstream.cli", "run", str(config), "--no-progress", *extra],
                            env={**os.environ, "SCENARIO_KEY": KEY}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def run_to_end(config: Path, *extra: str) -> None:
    proc = capstream(config, *extra)
    _, err = proc.communicate(timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"capstream run {' '.join(extra)} exited {proc.returncode}:\n{err}")


def shards(out: Path) -> dict:
    return {p.name: pq.read_table(p) for p in sorted((out / "data").glob("*.parquet"))}


def base_id(custom_id: str) -> str:
    return re.sub(r"-a\d+$", "", custom_id)


def scenario(rows: int, seed: int, folder: Path) -> dict:
    rng = random.Random(seed)
    data = make_source(folder, rows)
    faults = Faults()
    with FakeBatchOpenAI(step_s=0.1, reply=faults.reply, status_for=faults.status_for, api_key=KEY,
                         expire_after=400, expire_batches=1, max_unfinished=2) as server:
        online = write_config(folder / "online.yaml", server.url, data, folder / "online", "local", folder / "c1")
        started = time.time()
        run_to_end(online)
        online_s = time.time() - started
        online_requests = server.requests
        faults.asked.clear()

        batch = write_config(folder / "batch.yaml", server.url, data, folder / "batch", "batch", folder / "c2")
        kills = []
        started = time.time()
        for _ in range(3):
            # A random moment once this run is at the provider: uploading, making batches, polling, collecting.
            # A random moment once this run is at the provider: a random share of the lines left
            # answered, and a little more (uploading, making batches, polling or collecting).
            uploads, proc = server.uploads, capstream(batch)
            while server.uploads == uploads and proc.poll() is None:
                time.sleep(0.01)
            answered = server.requests - online_requests
            target = answered + rng.uniform(0.0, 0.8) * max(0, len(PROMPTS) * (rows - rows // 50) - answered)
            while server.requests - online_requests < target and proc.poll() is None:
                time.sleep(0.01)
            try:
                proc.wait(rng.uniform(0.0, 0.5))  # it may finish first: then the kill is at its end
            except subprocess.TimeoutExpired:
                pass
            state = {"uploads": server.uploads, "batches": len(server.batches),
                     "lines_answered": server.requests - online_requests,
                     "exit": proc.poll()}
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                state["exit"] = "killed"
            proc.communicate()
            kills.append(state)
        run_to_end(batch)
        batch_s = time.time() - started

        report: dict = {"rows": rows, "prompts": len(PROMPTS), "max_requests": 1000, "kills": kills,
                        "online_s": round(online_s, 1), "batch_s_with_kills": round(batch_s, 1)}
        a, b = shards(folder / "online"), shards(folder / "batch")
        checks = {"output_equals_online_shard_for_shard": a.keys() == b.keys() and all(b[k].equals(a[k]) for k in a)}
        report["shards"] = len(b)

        files = [server.uploaded[x.input_file_id] for x in server.batches.values()]
        report["request_files"] = [{"lines": f.count(b"\n"), "bytes": len(f)} for f in dict.fromkeys(files)]
        checks["files_within_both_limits"] = all(f.count(b"\n") <= 1000 and len(f) <= 190_000_000 for f in files)

        s_online = json.loads((folder / "online/summary.json").read_text())
        s_batch = json.loads((folder / "batch/summary.json").read_text())
        report["cost_usd"] = {"online": s_online["cost_usd"], "batch": s_batch["cost_usd"],
                              "batch_prices": s_batch["prices"]}
        checks["cost_at_half_the_online_price"] = abs(s_batch["cost_usd"] - s_online["cost_usd"] / 2) < 1e-6

        ran = [x for x in server.batches.values() if x.custom_ids]  # past validation: their lines were run
        in_batches = collections.Counter(base_id(c) for x in ran for c in x.custom_ids)
        troubles = collections.Counter(base_id(c) for c in [*server.failed_ids, *server.expired_ids])
        report["requests"] = len(in_batches)
        report["failed_lines"], report["expired_lines"] = len(server.failed_ids), len(server.expired_ids)
        report["batches"] = {"made": len(server.batches), "ran": len(ran),
                             "refused_for_the_token_limit": sum(x.status == "failed" for x in server.batches.values())}
        checks["each_request_in_one_batch_and_one_more_per_failure"] = in_batches == collections.Counter(
            {c: 1 + troubles[c] for c in in_batches})
        checks["every_request_asked"] = len(in_batches) == (rows - rows // 50) * len(PROMPTS)

        uploads = server.uploads
        run_to_end(batch)
        checks["a_finished_rerun_uploads_nothing"] = server.uploads == uploads

        faults.refuse = False
        error_rows = {i for i in range(rows) if i % 100 == 13 and i % 50 != 49}
        before = set(server.batches)
        run_to_end(batch, "--retry-errors")
        retried = [c for x in server.batches.values() if x.id not in before for c in x.custom_ids]
        report["retry_errors_submitted"] = len(retried)
        report["retried"] = sorted(retried)
        checks["retry_errors_submits_only_the_error_rows"] = sorted(
            (int(re.search(r"-c(\d+)-o(\d+)-p(\d+)", c).group(1)) * 250 + int(re.search(r"-o(\d+)", c).group(1)),
             int(re.search(r"-p(\d+)", c).group(1))) for c in retried) == sorted((i, 1) for i in error_rows)
        after = json.loads((folder / "batch/summary.json").read_text())
        checks["no_error_left_but_the_broken_images"] = after["errors"] == {"ImageError": rows // 50}
        report["checks"] = checks
        return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1200)
    parser.add_argument("--seed", type=int, default=16)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="capstream-batch-scenario-") as folder:
        os.environ["CAPSTREAM_CACHE_DIR"] = str(Path(folder) / "cache")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ["HF_HOME"] = str(Path(folder) / "hf")
        report = scenario(args.rows, args.seed, Path(folder))
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            if key != "checks":
                print(f"{key}: {value}")
        for name, ok in report["checks"].items():
            print(f"{'ok  ' if ok else 'FAIL'} {name}")
    sys.exit(0 if all(report["checks"].values()) else 1)


if __name__ == "__main__":
    main()
