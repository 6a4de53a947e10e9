"""The Hub round trip through the real huggingface_hub / datasets HTTP clients against tests/fake_hub.py.

Every ``capstream`` command runs as a subprocess with ``HF_ENDPOINT`` pointing at the fake Hub on
127.0.0.1 (huggingface_hub reads its endpoint and offline flag once, on import), ``HF_TOKEN`` set and
``HF_HUB_DISABLE_XET=1`` (plain LFS uploads, which the fake Hub speaks). What was pushed is loaded
back with ``datasets.load_dataset(repo)`` in a subprocess too, and checked row by row.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import datasets
import pytest

from conftest import (FEATURES, REPO, check_output, expected_caption, make_rows, run_cli, write_config,
                      write_parquet)
from fake_hub import FakeHub

TOKEN = "hf_test_token_0123456789"
KEY = "sk-test-secret-123"  # conftest.run_cli's FAKE_KEY


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """The fake Hub, and this process's environment set for subprocesses that use it."""
    with FakeHub(tokens={TOKEN}) as server:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # conftest sets it for every other test
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no saved login, a fresh cache
        yield server


@pytest.fixture(scope="module")
def source_rows():
    rows, broken = make_rows(150, broken_every=10)
    buf = io.BytesIO()
    datasets.Dataset.from_list(rows, features=FEATURES).to_parquet(buf)
    return rows, broken, buf.getvalue()


def load_repo(repo: str, *args: str, split: str = "train", streaming: bool = False,
              revision: str | None = None) -> list[dict]:
    """Rows of a Hub repo as ``datasets.load_dataset(repo, ...)`` gives them (image bytes as sha256)."""
    code = f"""
import datasets, hashlib, json, sys
ds = datasets.load_dataset({repo!r}, *{list(args)!r}, split={split!r}, streaming={streaming},
                           revision={revision!r}, cache_dir=sys.argv[1])
ds = ds.cast_column("image", datasets.Image(decode=False))
for row in ds:
    img = row["image"]
    row["image"] = hashlib.sha256(img["bytes"]).hexdigest() if img and img["bytes"] else None
    print(json.dumps(row))
"""
    out = subprocess.run([sys.executable, "-c", code, tempfile.mkdtemp(prefix="hub-load-")], capture_output=True,
                         text=True, timeout=180, env=os.environ.copy())
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines()]


def check_rows(loaded: list[dict], rows: list[dict], broken: set[int]) -> None:
    """Every row once, in order, source columns unchanged, the right caption or error."""
    assert [r["id"] for r in loaded] == list(range(len(rows)))
    for got, src in zip(loaded, rows):
        i = got["id"]
        src_sha = hashlib.sha256(src["image"]["bytes"]).hexdigest() if src["image"] else None
        assert got["image"] == src_sha and got["alt"] == src["alt"]
        if i in broken:
            assert got["caption"] is None and got["error"].startswith("ImageError: "), got
        else:
            assert got["error"] is None and got["caption"] == expected_caption(i), got


def assert_no_secret(hub: FakeHub, repo: str) -> None:
    files = hub.files(repo)
    assert files, repo
    for path, data in files.items():
        assert not path.startswith(".capstream"), path
        assert TOKEN.encode() not in data and KEY.encode() not in data, path


def hub_config(tmp_path: Path, server_url: str, out: Path, dataset: dict | None = None, **output) -> Path:
    return write_config(tmp_path / "c.yaml", server_url, "unused", out, run={"chunk_size": 32},
                        dataset={"path": "alice/images", "data_files": None, **(dataset or {})},
                        output={"hub_timeout_s": 10, **output})


@pytest.mark.parametrize("streaming", [False, True])
def test_read_caption_push_round_trip(hub, server, source_rows, tmp_path, streaming):
    rows, broken, parquet = source_rows
    hub.add_repo("alice/images", {"data/train-00000-of-00001.parquet": parquet, "README.md": b"# images\n"},
                 private=True)
    out = tmp_path / "out"
    config = hub_config(tmp_path, server.url, out, dataset={"streaming": streaming}, push_to_hub="alice/captions")
    result = run_cli("run", str(config))
    assert result.returncode == 0, result.stderr
    check_output(out, rows, broken)  # the local copy
    assert server.requests == len(rows) - len(broken)

    check_rows(load_repo("alice/captions", split="train"), rows, broken)
    repo = hub.repos["alice/captions"]
    assert repo.private  # output.private defaults to true
    card = hub.files("alice/captions")["README.md"].decode()
    assert "fake-vlm" in card and "Describe this image in one detailed paragraph." in card
    assert "ImageError" in card and f"| {len(rows)} | {len(rows) - len(broken)} |" in card
    assert_no_secret(hub, "alice/captions")
    assert f"Bearer {TOKEN}" in hub.auth_seen  # the private source was read with the token
    assert TOKEN not in result.stderr + result.stdout
    # The pushed files are exactly the shards and the card (and the repo's .gitattributes).
    shards = sorted(p.name for p in (out / "data").glob("*.parquet"))
    assert sorted(hub.files("alice/captions")) == sorted([".gitattributes", "README.md"] + [f"data/{s}" for s in shards])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["hub"]["repo"] == "alice/captions" and summary["hub"]["shards"] == len(shards)
