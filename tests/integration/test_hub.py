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

from capstream.testing.hub_server import FakeHub

from conftest import (
    FEATURES,
    REPO,
    check_output,
    expected_caption,
    make_rows,
    run_cli,
    write_config,
    write_parquet,
)

pytestmark = pytest.mark.hub

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


def test_continuous_export_survives_a_kill(hub, server, source_rows, tmp_path):
    """push_every: 1 pushes shards while the run goes on; SIGKILL mid-run, rerun: complete, no duplicates."""
    rows, broken, parquet = source_rows
    hub.add_repo("alice/images", {"data/train.parquet": parquet}, private=True)
    server.latency = 0.05  # slow enough that the kill lands mid-run
    out = tmp_path / "out"
    config = hub_config(tmp_path, server.url, out, push_to_hub="alice/live", push_every=1)
    log = open(tmp_path / "run1.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "capstream.cli", "run", str(config), "--no-progress",
                             "--set", "limits.max_concurrency=2"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, "FAKE_KEY": KEY})
    try:
        shards_on_hub = lambda: "alice/live" in hub.repos and sum(  # noqa: E731
            p.endswith(".parquet") for p in hub.files("alice/live")) >= 2
        assert hub.wait_for(shards_on_hub, timeout=120), (tmp_path / "run1.log").read_text()
        assert proc.poll() is None, "the run ended before the kill"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        log.close()
    marker = json.loads((out / ".capstream" / "pushed.json").read_text())
    recorded = set(marker["alice/live@main:default/train"]["files"])
    assert recorded and recorded <= set(hub.files("alice/live"))  # recorded only once committed
    commits_before = len(hub.commits("alice/live"))

    server.latency = 0
    result = run_cli("run", str(config))
    assert result.returncode == 0, result.stderr
    check_rows(load_repo("alice/live"), rows, broken)  # every row exactly once
    # The rerun did not send again a shard the Hub already had from the killed run.
    added_after = [p for c in hub.commits("alice/live")[commits_before:] for p in c.added]
    assert not recorded & set(added_after), recorded & set(added_after)
    assert_no_secret(hub, "alice/live")


def test_a_card_pushed_during_a_run_shows_the_cost_so_far(hub, server, source_rows, tmp_path):
    """A card pushed while the run goes on prices the rows of the shards it describes (each chunk's
    cost is in the manifest); the last one, the whole run's."""
    rows, broken, parquet = source_rows
    hub.add_repo("alice/images", {"data/train.parquet": parquet}, private=True)
    server.latency = 0.05
    out = tmp_path / "out"
    config = hub_config(tmp_path, server.url, out, push_to_hub="alice/priced", push_every=1)
    priced = ["--set", "model.price_input_per_mtok=2", "--set", "model.price_output_per_mtok=8"]
    proc = subprocess.Popen([sys.executable, "-m", "capstream.cli", "run", str(config), "--no-progress",
                             "--set", "limits.max_concurrency=2", *priced],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO, env={**os.environ, "FAKE_KEY": KEY})
    try:
        def card(commit) -> str:
            return commit.files["README.md"].data.decode() if "README.md" in commit.files else ""

        priced_card = lambda: "alice/priced" in hub.repos and any(  # noqa: E731
            "Cost: $" in card(c) for c in hub.commits("alice/priced"))
        assert hub.wait_for(priced_card, timeout=120)
        assert proc.poll() is None, "the run ended before a card was pushed mid-run"
    finally:
        _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    manifest = json.loads((out / ".capstream" / "manifest.json").read_text())
    first = next(c for c in hub.commits("alice/priced") if "Cost: $" in card(c))
    on_hub = [int(p.split("-")[1].split(".")[0]) for p in first.files if p.endswith(".parquet")]
    assert 0 < len(on_hub) < len(manifest["done"])
    so_far = sum(manifest["done"][str(i)]["cost_usd"] for i in on_hub)
    assert f"Cost: ${so_far:.4f} for the answers received so far" in card(first)
    summary = json.loads((out / "summary.json").read_text())
    assert f"Cost: ${summary['cost_usd']:.4f} for every answer received, all runs" in card(hub.commits("alice/priced")[-1])


def test_push_command_of_a_finished_run(hub, server, source_rows, tmp_path):
    rows, broken, parquet = source_rows
    data_file = write_parquet(tmp_path / "src.parquet", rows)
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", server.url, data_file, out, run={"chunk_size": 40})
    assert run_cli("run", str(config)).returncode == 0
    assert not (out / ".capstream" / "pushed.json").exists()  # no push_to_hub: nothing pushed

    result = run_cli("push", str(out), "bob/pushed", "--public")
    assert result.returncode == 0, result.stderr
    assert "4 shard(s)" in result.stderr
    assert not hub.repos["bob/pushed"].private
    check_rows(load_repo("bob/pushed"), rows, broken)
    assert_no_secret(hub, "bob/pushed")
    # Pushing again sends nothing and makes no empty commit.
    commits = len(hub.commits("bob/pushed"))
    again = run_cli("push", str(out), "bob/pushed")
    assert again.returncode == 0 and "0 pushed now" in again.stderr, again.stderr
    assert len(hub.commits("bob/pushed")) == commits


@pytest.mark.slow
def test_push_names_config_split_and_branch(hub, server, source_rows, tmp_path):
    rows, broken, parquet = source_rows
    data_file = write_parquet(tmp_path / "src.parquet", rows[:50])
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", server.url, data_file, out, run={"chunk_size": 20})
    assert run_cli("run", str(config)).returncode == 0
    first = run_cli("push", str(out), "bob/multi")  # train of the default config, on main
    assert first.returncode == 0, first.stderr
    result = run_cli("push", str(out), "bob/multi", "--config-name", "short", "--split", "test",
                     "--commit-message", "short captions")
    assert result.returncode == 0, result.stderr
    files = hub.files("bob/multi")
    assert {"short/test-000000.parquet", "data/train-000000.parquet"} <= set(files)
    assert hub.commit_messages("bob/multi")[-1] == "short captions"
    # Both configs are in the card, so both load.
    assert [r["id"] for r in load_repo("bob/multi", "short", split="test")] == list(range(50))
    assert [r["id"] for r in load_repo("bob/multi", split="train")] == list(range(50))
    branch = run_cli("push", str(out), "bob/multi", "--revision", "dev", "--split", "validation")
    assert branch.returncode == 0, branch.stderr
    assert "data/validation-000002.parquet" in hub.files("bob/multi", "dev")
    assert "data/validation-000002.parquet" not in hub.files("bob/multi")
    assert len(load_repo("bob/multi", split="validation", revision="dev")) == 50


@pytest.mark.slow
def test_silent_hub_stops_the_run_with_the_local_output_complete(hub, server, source_rows, tmp_path):
    rows, broken, parquet = source_rows
    data_file = write_parquet(tmp_path / "src.parquet", rows)
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", server.url, data_file, out,
                          output={"push_to_hub": "alice/silent", "hub_timeout_s": 1})
    hub.hang = True  # accepts every connection, never answers
    result = run_cli("run", str(config), timeout=280)  # the bound is 300 s
    assert result.returncode == 1, result.stderr
    assert "did not answer within 1 s" in result.stderr and "capstream push" in result.stderr
    assert hub.calls["hang"] >= 4  # retried before giving up
    check_output(out, rows, broken)  # the local output is complete and loads
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] is True and "did not answer" in summary["hub"]["error"]

    hub.hang = False  # the Hub is back: the push is retried later
    pushed = run_cli("push", str(out), "alice/silent")
    assert pushed.returncode == 0, pushed.stderr
    check_rows(load_repo("alice/silent"), rows, broken)


@pytest.mark.slow
def test_transient_hub_errors_are_retried_and_refusals_explained(hub, server, source_rows, tmp_path):
    rows, broken, parquet = source_rows
    data_file = write_parquet(tmp_path / "src.parquet", rows[:40])
    out = tmp_path / "out"
    assert run_cli("run", str(write_config(tmp_path / "c.yaml", server.url, data_file, out))).returncode == 0

    hub.fail("commit", 503, times=2)
    hub.fail("preupload", 429, times=1)
    result = run_cli("push", str(out), "carol/retried")
    assert result.returncode == 0, result.stderr
    assert hub.calls["commit"] == 3 and len(hub.commits("carol/retried")) == 2  # creation + one push
    assert len(load_repo("carol/retried")) == 40

    refused = run_cli("push", str(out), "carol/other", env={"HF_TOKEN": "hf_wrong"})
    assert refused.returncode == 1
    assert "HTTP 401" in refused.stderr and "HF_TOKEN" in refused.stderr and "hf_wrong" not in refused.stderr
    assert "carol/other" not in hub.repos


def test_push_of_a_folder_that_is_not_a_run(hub, tmp_path):
    result = run_cli("push", str(tmp_path), "alice/x")
    assert result.returncode == 2 and "not a capstream output folder" in result.stderr
    bad = run_cli("push", str(tmp_path), "not-a-repo-id")
    assert bad.returncode == 2


@pytest.mark.parametrize("layout,streaming", [("imagefolder", False), ("imagefolder", True),
                                              ("relative-paths", False), ("relative-paths", True)])
def test_images_stored_as_files_in_the_repo(hub, server, tmp_path, layout, streaming):
    """Images as files of the repo: an imagefolder repo, or a table whose image paths are relative to the repo."""
    from conftest import jpeg, size_of_row

    n = 12
    images = {f"pics/{i}.jpg": jpeg(*size_of_row(i)) for i in range(n)}
    if layout == "imagefolder":
        meta = "".join(json.dumps({"file_name": f"{i}.jpg", "id": i}) + "\n" for i in range(n))
        files, dataset = {**images, "pics/metadata.jsonl": meta.encode()}, {"data_dir": "pics", "data_files": None}
    else:
        buf = io.BytesIO()
        datasets.Dataset.from_dict({"id": list(range(n)), "image": [{"bytes": None, "path": f"pics/{i}.jpg"}
                                                                    for i in range(n)]}).to_parquet(buf)
        files, dataset = {**images, "table/train.parquet": buf.getvalue()}, {"data_files": "table/train.parquet"}
    hub.add_repo("alice/files", files, private=True)
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", server.url, "unused", out, run={"chunk_size": 5},
                          dataset={"path": "alice/files", "streaming": streaming, **dataset})
    result = run_cli("run", str(config))
    assert result.returncode == 0, result.stderr
    ds = datasets.Dataset.from_parquet([str(p) for p in sorted((out / "data").glob("*.parquet"))])
    assert ds["id"][:] == list(range(n))
    assert ds["caption"][:] == [expected_caption(i) for i in range(n)], ds["error"][:]
    if layout == "imagefolder":  # the output stands alone: the repo's image files are embedded as bytes
        assert [img["bytes"] for img in ds.cast_column("image", datasets.Image(decode=False))["image"]] == \
            [images[f"pics/{i}.jpg"] for i in range(n)]
    # Each image file came from the Hub once: read to caption, and embedded from what was read.
    assert {path: hub.bytes_served[path] for path in images} == {path: len(data) for path, data in images.items()}


def test_card_reads_features_from_the_shards_and_tolerates_missing_keys(tmp_path):
    """The card's YAML comes from the shard's schema; absent summary keys do not break it."""
    from capstream.config import config_from_dict
    from capstream.io.card import CardLayout, render_card
    from capstream.io.hub import _front_matter
    from capstream.io.summary import RunSummary

    shard = tmp_path / "data" / "train-000000.parquet"
    shard.parent.mkdir()
    features = datasets.Features({"id": datasets.Value("int64"), "image": datasets.Image(),
                                  "tags": datasets.List(datasets.Value("string")),
                                  "caption": datasets.Value("string"), "error": datasets.Value("string")})
    datasets.Dataset.from_dict({"id": [1], "image": [None], "tags": [["a"]], "caption": ["a cat"], "error": [None]},
                               features=features).to_parquet(str(shard))
    config = config_from_dict({"model": {"name": "m1", "base_url": "https://user:pw@example.com/v1"},
                               "prompt": {"text": "Say what you see."}})
    layout = CardLayout(split="train", data_glob="data/train-*.parquet", repo_id="u/r",
                        other_configs=[{"config_name": "other", "data_files": "x/*.parquet"}])
    card = render_card(tmp_path, config, RunSummary(), layout)  # an empty summary
    header = _front_matter(card)
    assert [c["config_name"] for c in header["configs"]] == ["other", "default"]
    assert "a cat" in card and "Say what you see." in card and "example.com" in card and "pw" not in card
    solo = _front_matter(render_card(tmp_path, config, RunSummary(cost_usd=0.25, rows=1), CardLayout(
        split="train", data_glob="data/train-*.parquet")))
    assert solo["dataset_info"]["features"] == features._to_yaml_list()
    assert "Cost: $0.2500" in render_card(tmp_path, config, RunSummary(cost_usd=0.25), layout)


@pytest.fixture
def hub_factories():
    """huggingface_hub's installed client factories, put back after the test."""
    import huggingface_hub
    from huggingface_hub.utils import _http

    saved = (_http._GLOBAL_CLIENT_FACTORY, _http._GLOBAL_ASYNC_CLIENT_FACTORY)
    yield _http
    huggingface_hub.set_client_factory(saved[0])
    huggingface_hub.set_async_client_factory(saved[1])


def test_hub_timeouts_keep_the_callers_client_factory(hub_factories):
    """bound_hub_calls adds a timeout to the clients of the factory installed before it (a caller's
    proxies or headers survive), keeps a timeout the caller set, and does not wrap itself."""
    import httpx2
    import huggingface_hub

    from capstream.patches.hf_hub_clients import bound_hub_calls

    huggingface_hub.set_client_factory(lambda: httpx2.Client(headers={"x-mine": "1"}, timeout=None))
    huggingface_hub.set_async_client_factory(lambda: httpx2.AsyncClient(timeout=httpx2.Timeout(3.0, read=None)))
    bound_hub_calls(7)
    bound_hub_calls(9)  # a second run in the same process: the new timeout, not a second wrapper
    with hub_factories._GLOBAL_CLIENT_FACTORY() as client:
        assert client.headers["x-mine"] == "1"
        assert (client.timeout.connect, client.timeout.read, client.timeout.write, client.timeout.pool) == (9, 9, 9, 9)
    made = hub_factories._GLOBAL_ASYNC_CLIENT_FACTORY()
    assert (made.timeout.connect, made.timeout.read) == (3.0, 9)
    assert hub_factories._GLOBAL_CLIENT_FACTORY.capstream_wraps.__name__ == "<lambda>"


@pytest.mark.ray
def test_ray_backend_pushes_to_the_hub(hub, server, source_rows, tmp_path):
    """run.backend: ray with output.push_to_hub: the driver, which writes the shards, pushes them."""
    pytest.importorskip("ray")
    rows, broken, parquet = source_rows
    hub.add_repo("alice/images", {"data/train-00000-of-00001.parquet": parquet}, private=True)
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", server.url, "unused", out,
                          run={"chunk_size": 32, "backend": "ray", "workers": 2},
                          dataset={"path": "alice/images", "data_files": None},
                          output={"hub_timeout_s": 10, "push_to_hub": "alice/captions-ray", "push_every": 2})
    result = run_cli("run", str(config), timeout=400)
    assert result.returncode == 0, result.stderr
    check_output(out, rows, broken)
    check_rows(load_repo("alice/captions-ray", split="train"), rows, broken)
    shards = sorted(p.name for p in (out / "data").glob("*.parquet"))
    assert sorted(hub.files("alice/captions-ray")) == sorted([".gitattributes", "README.md"] + [f"data/{s}" for s in shards])
    assert_no_secret(hub, "alice/captions-ray")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["backend"] == "ray" and summary["hub"]["shards"] == len(shards)


def test_batch_backend_reads_from_and_pushes_to_the_hub(hub, source_rows, tmp_path):
    """run.backend: batch with a Hub dataset in and output.push_to_hub: the chunks are read again from
    the Hub to be written once their batches are collected, and pushed as they are written."""
    from capstream.testing.batch_server import FakeBatchOpenAI

    rows, broken, parquet = source_rows
    hub.add_repo("alice/images", {"data/train-00000-of-00001.parquet": parquet}, private=True)
    out = tmp_path / "out"
    with FakeBatchOpenAI(step_s=0.02) as server:
        config = write_config(tmp_path / "c.yaml", server.url, "unused", out, run={"chunk_size": 32, "backend": "batch"},
                              dataset={"path": "alice/images", "data_files": None, "streaming": True},
                              batch={"poll_s": 0.02, "max_requests": 50}, model={"name": "gpt-4o-mini"},
                              output={"hub_timeout_s": 10, "push_to_hub": "alice/captions-batch", "push_every": 2})
        result = run_cli("run", str(config))
        assert result.returncode == 0, result.stderr
        assert server.creates == 3
    check_output(out, rows, broken)
    check_rows(load_repo("alice/captions-batch", split="train"), rows, broken)
    shards = sorted(p.name for p in (out / "data").glob("*.parquet"))
    assert sorted(hub.files("alice/captions-batch")) == sorted(
        [".gitattributes", "README.md"] + [f"data/{s}" for s in shards])
    assert_no_secret(hub, "alice/captions-batch")
    assert "prices: table:2025-04-14, Batch API" in hub.files("alice/captions-batch")["README.md"].decode()
