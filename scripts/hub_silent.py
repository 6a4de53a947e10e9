#!/usr/bin/env python
"""How long ``capstream run`` with ``output.push_to_hub`` takes to give up on a Hub that accepts
connections and never answers, with the default ``output.hub_timeout_s`` (or ``--timeout``).

Starts the fake Hub (capstream.testing.hub_server, hang mode) and fake OpenAI server on 127.0.0.1,
captions 100 rows into a temporary folder and prints the exit code, the seconds it took, how many
requests the Hub received, and whether the local output is complete.

    python scripts/hub_silent.py               # default hub_timeout_s
    python scripts/hub_silent.py --timeout 5
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import datasets
import yaml
from PIL import Image

from capstream.testing.hub_server import FakeHub
from capstream.testing.openai_server import FakeOpenAI

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--timeout", type=float, help="output.hub_timeout_s (default: the config's default)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="capstream-hub-silent-"))
    rows = []
    for i in range(100):
        buf = io.BytesIO()
        Image.new("RGB", (64 + i, 48), (i, 100, 200)).save(buf, "JPEG")
        rows.append({"id": i, "image": {"bytes": buf.getvalue(), "path": None}})
    features = datasets.Features({"id": datasets.Value("int64"), "image": datasets.Image()})
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(work / "src.parquet"))
    output = {"dir": str(work / "out"), "push_to_hub": "someone/silent"}
    if args.timeout is not None:
        output["hub_timeout_s"] = args.timeout
    with FakeHub() as hub, FakeOpenAI() as server:
        config = {"dataset": {"path": "parquet", "data_files": str(work / "src.parquet")},
                  "model": {"provider": "openai", "name": "fake-vlm", "base_url": server.url, "api_key_env": None},
                  "run": {"chunk_size": 25, "cache": False}, "output": output}
        (work / "c.yaml").write_text(yaml.safe_dump(config))
        hub.hang = True
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": "hf_x",
               "HF_HOME": str(work / "hf")}
        env.pop("HF_HUB_OFFLINE", None)
        started = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "capstream.cli", "run", str(work / "c.yaml"), "--no-progress"],
                                capture_output=True, text=True, env=env, cwd=REPO)
        seconds = time.monotonic() - started
        summary = json.loads((work / "out" / "summary.json").read_text())
        print(json.dumps({"exit_code": result.returncode, "seconds": round(seconds, 1), "hub_requests": dict(hub.calls),
                          "local_rows": summary["rows"], "local_complete": summary["complete"],
                          "message": result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""}, indent=2))


if __name__ == "__main__":
    main()
