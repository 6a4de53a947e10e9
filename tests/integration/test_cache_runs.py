"""Never paying twice, through real runs: identical images in one run (dedup) and answers bought by earlier runs (cache)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from capstream.row.cache import ResponseCache

from conftest import (
    REPO,
    check_output,
    load_out,
    make_rows,
    run_cli,
    size_of_row,
    write_config,
    write_parquet,
)

_WRITER = """
import sys
from capstream.row.cache import ResponseCache
cache = ResponseCache(sys.argv[1])
for i in range(300):
    cache.put(f"{sys.argv[2]}-{i}", f"answer {i}")
    cache.get(f"other-{i}")
"""

def test_two_processes_write_one_cache_at_once(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), name], stderr=subprocess.PIPE)
             for name in ("one", "two")]
    for proc in procs:
        assert proc.wait(timeout=60) == 0, proc.stderr.read().decode()
    cache = ResponseCache(tmp_path)
    assert len(cache) == 600 and cache.get("two-299") == "answer 299"


def _repeating(n_unique: int):
    """2 * n_unique rows whose second half repeats the first byte for byte (ids differ)."""
    rows, _ = make_rows(n_unique)
    return rows + [{**row, "id": n_unique + i, "alt": f"row {n_unique + i}"} for i, row in enumerate(rows)]


def _check_repeated(out_dir, n_unique):
    ds = load_out(out_dir)
    assert len(ds) == 2 * n_unique
    for i, row in enumerate(ds):
        w, h = size_of_row(i % n_unique)
        assert row["caption"] == f"image {w}x{h}" and row["error"] is None, row


def test_identical_images_cost_one_request(server, tmp_path):
    data = write_parquet(tmp_path / "d.parquet", _repeating(100))
    for cache in (True, False):
        server.reset_counters()
        out = tmp_path / f"out-{cache}"
        config = write_config(tmp_path / "c.yaml", server.url, data, out, run={"chunk_size": 30, "cache": cache,
                              "cache_dir": str(tmp_path / f"cache-{cache}")})
        result = run_cli("run", str(config))
        assert result.returncode == 0, result.stderr
        assert server.requests == 100, (cache, server.requests)
        _check_repeated(out, 100)
        summary = json.loads((out / "summary.json").read_text())
        assert summary["requests"] == 100 and summary["reused"].get("dedup", 0) + summary["reused"].get("cache", 0) == 100


@pytest.mark.slow
def test_a_new_output_dir_buys_nothing_already_bought(server, tmp_path):
    rows, broken = make_rows(80, broken_every=20)
    data = write_parquet(tmp_path / "d.parquet", rows)
    refused = {size_of_row(i) for i in (3, 44)}
    server.status_for = lambda info: 400 if (info.width, info.height) in refused else None
    first = write_config(tmp_path / "a.yaml", server.url, data, tmp_path / "out-a")
    assert run_cli("run", str(first)).returncode == 0
    assert server.requests == 80 - len(broken)

    server.reset_counters()
    server.status_for = None
    second = write_config(tmp_path / "b.yaml", server.url, data, tmp_path / "out-b")
    result = run_cli("run", str(second))
    assert result.returncode == 0, result.stderr
    assert server.requests == 2  # only the two rows whose answer was an error (errors are not cached)
    check_output(tmp_path / "out-b", rows, broken)

    server.reset_counters()
    other_prompt = write_config(tmp_path / "c.yaml", server.url, data, tmp_path / "out-c",
                                prompt={"text": "Describe this image briefly."})
    assert run_cli("run", str(other_prompt)).returncode == 0
    assert server.requests == 80 - len(broken)  # a different prompt asks every image again

    server.reset_counters()
    off = write_config(tmp_path / "d.yaml", server.url, data, tmp_path / "out-d", run={"cache": False})
    assert run_cli("run", str(off)).returncode == 0
    assert server.requests == 80 - len(broken)


def test_two_runs_at_once_share_the_cache(server, tmp_path):
    rows, broken = make_rows(150, broken_every=50)
    data = write_parquet(tmp_path / "d.parquet", rows)
    server.latency = 0.02
    configs = [write_config(tmp_path / f"{n}.yaml", server.url, data, tmp_path / f"out-{n}", run={"chunk_size": 40})
               for n in ("one", "two")]
    env = {"FAKE_KEY": "sk-test-secret-123"}
    procs = [subprocess.Popen([sys.executable, "-m", "capstream.cli", "run", str(c), "--no-progress"], cwd=REPO,
                              stderr=subprocess.PIPE, text=True, env={**__import__("os").environ, **env})
             for c in configs]
    for proc in procs:
        assert proc.wait(timeout=240) == 0, proc.stderr.read()
    for n in ("one", "two"):
        check_output(tmp_path / f"out-{n}", rows, broken)
    assert 150 - len(broken) <= server.requests <= 2 * (150 - len(broken))
    server.reset_counters()
    third = write_config(tmp_path / "three.yaml", server.url, data, tmp_path / "out-three")
    assert run_cli("run", str(third)).returncode == 0
    assert server.requests == 0


def test_a_model_given_in_code_finds_its_answers_in_a_later_run(server, tmp_path):
    """A chat model built again for a new run (new client objects, so a new repr) with the same
    parameters is the same model to the cache; other parameters make another. Every run in the same
    process works, although langchain-openai's shared HTTP client belongs to the first run's loop."""
    from langchain_openai import ChatOpenAI

    from capstream import run

    rows, broken = make_rows(30, broken_every=10)
    data = write_parquet(tmp_path / "d.parquet", rows)

    def chat_model(temperature: float) -> ChatOpenAI:
        return ChatOpenAI(model="fake-vlm", base_url=server.url, api_key="k", temperature=temperature, max_retries=0)

    def run_with(llm: ChatOpenAI, out: str, **prompt) -> None:
        server.reset_counters()
        config = write_config(tmp_path / f"{out}.yaml", server.url, data, tmp_path / out, **prompt)
        run(str(config), llm=llm, show_progress=False)
        check_output(tmp_path / out, rows, broken)

    first = chat_model(0.0)
    run_with(first, "first")
    assert server.requests == 30 - len(broken)
    run_with(chat_model(0.0), "again")
    assert server.requests == 0
    run_with(chat_model(0.5), "warmer")
    assert server.requests == 30 - len(broken)
    run_with(first, "same-object", prompt={"text": "Describe this image briefly."})
    assert server.requests == 30 - len(broken)
