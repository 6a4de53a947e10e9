"""Shared fixtures: an isolated HF cache, the fake OpenAI server, image datasets made on the spot."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# Keep datasets' cache out of the user's home and never reach the Hub (set before datasets loads).
_HF_HOME = tempfile.mkdtemp(prefix="capstream-tests-hf-")
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_HUB_OFFLINE"] = "1"
# Never the user's response cache, even for a subprocess started with an environment copied early
# (each test then gets its own folder: the response_cache fixture).
os.environ["CAPSTREAM_CACHE_DIR"] = tempfile.mkdtemp(prefix="capstream-tests-cache-")
os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
os.environ.pop("OPENAI_API_KEY", None)

import datasets  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402
from PIL import Image  # noqa: E402

from capstream.testing.openai_server import FakeOpenAI  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FEATURES = datasets.Features({"id": datasets.Value("int64"), "image": datasets.Image(), "alt": datasets.Value("string")})


def jpeg(width: int, height: int, colour=(200, 100, 50), **save) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, "JPEG", **save)
    return buf.getvalue()


def size_of_row(i: int) -> tuple[int, int]:
    """Every row's image has its own size, so the fake server's answer names the row."""
    return 64 + i % 400, 48 + i // 400 + (i % 7)


def expected_caption(i: int) -> str:
    w, h = size_of_row(i)
    return f"image {w}x{h}"


def broken_image(kind: str):
    if kind == "corrupt":
        return {"bytes": b"this is not an image", "path": None}
    if kind == "truncated":
        return {"bytes": jpeg(320, 240, (10, 200, 30))[:300], "path": None}
    if kind == "none":
        return None
    raise ValueError(kind)


BROKEN_KINDS = ("corrupt", "truncated", "none")


def make_rows(n: int, broken_every: int | None = None) -> tuple[list[dict], set[int]]:
    rows, broken = [], set()
    for i in range(n):
        if broken_every and i % broken_every == broken_every - 1:
            image = broken_image(BROKEN_KINDS[(i // broken_every) % len(BROKEN_KINDS)])
            broken.add(i)
        else:
            image = {"bytes": jpeg(*size_of_row(i), colour=(i % 256, 80, 160)), "path": None}
        rows.append({"id": i, "image": image, "alt": f"row {i}"})
    return rows, broken


def write_parquet(path: Path, rows: list[dict]) -> Path:
    datasets.Dataset.from_list(rows, features=FEATURES).to_parquet(str(path))
    return path


@pytest.fixture(autouse=True)
def response_cache(tmp_path, monkeypatch):
    """Each test its own response cache (CLI subprocesses inherit it): tests count requests, and a
    cache shared between tests would answer some of them."""
    monkeypatch.setenv("CAPSTREAM_CACHE_DIR", str(tmp_path / "response-cache"))
    return tmp_path / "response-cache"


@pytest.fixture
def server():
    with FakeOpenAI() as s:
        yield s


@pytest.fixture
def parquet_300(tmp_path_factory):
    """300 rows, every 10th image broken (corrupt, truncated or missing)."""
    folder = tmp_path_factory.mktemp("src300")
    rows, broken = make_rows(300, broken_every=10)
    return write_parquet(folder / "images.parquet", rows), broken


def write_config(path: Path, server_url: str | None, data_file: Path | str, out_dir: Path, **sections) -> Path:
    config = {
        "dataset": {"path": "parquet", "data_files": str(data_file)},
        "model": {"provider": "openai", "name": "fake-vlm", "base_url": server_url, "api_key_env": "FAKE_KEY",
                  "timeout_s": 5},
        "retry": {"max_attempts": 4, "max_wait_s": 1},
        "run": {"chunk_size": 64},
        "output": {"dir": str(out_dir)},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(config))
    return path


def run_cli(*args: str, env: dict | None = None, timeout: float = 240, cwd: Path = REPO) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "FAKE_KEY": "sk-test-secret-123", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "capstream.cli", *args, "--no-progress"] if args and args[0] == "run"
        else [sys.executable, "-m", "capstream.cli", *args],
        capture_output=True, text=True, env=full_env, timeout=timeout, cwd=cwd,
    )


def check_embedded(out_dir: Path, images: dict[int, bytes], missing: int, caption_of) -> None:
    """A run's output with ``output.embed_images`` (column ``image``): each row's downloaded bytes and
    its caption (``caption_of(i)``), except row ``missing``, whose URL answered 404."""
    out = datasets.load_dataset(str(out_dir), split="train", cache_dir=tempfile.mkdtemp(prefix="hf-load-"))
    out = out.cast_column("image", datasets.Image(decode=False))
    assert len(out) == len(images)
    for i, row in enumerate(out):
        if i == missing:
            assert row["image"] is None and row["error"].startswith("ImageError: download failed: HTTP 404")
        else:
            assert row["caption"] == caption_of(i) and row["image"]["bytes"] == images[i], i


def load_out(out_dir: Path, split: str = "train") -> datasets.Dataset:
    # A fresh cache: datasets 5.2 caches a local folder by its name, not its path or content, so two
    # output folders both called "out" would otherwise share one cached copy.
    ds = datasets.load_dataset(str(out_dir), split=split, cache_dir=tempfile.mkdtemp(prefix="hf-load-"))
    return ds.cast_column("image", datasets.Image(decode=False))


def check_output(out_dir: Path, source_rows: list[dict], broken: set[int], split: str = "train") -> datasets.Dataset:
    """Every good row has its own image's caption, broken rows an error, order and bytes kept."""
    ds = load_out(out_dir, split)
    assert len(ds) == len(source_rows)
    for i, (row, src) in enumerate(zip(ds, source_rows)):
        assert row["id"] == i
        assert row["alt"] == src["alt"]
        src_bytes = src["image"]["bytes"] if src["image"] else None
        assert (row["image"]["bytes"] if row["image"] else None) == src_bytes
        if i in broken:
            assert row["caption"] is None and row["error"].startswith("ImageError: "), row
        else:
            assert row["error"] is None and row["caption"] == expected_caption(i), row
    return ds
