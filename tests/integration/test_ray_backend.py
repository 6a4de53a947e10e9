"""``run.backend: ray`` on a local Ray (2 CPUs, started once for the module), through the real
ChatOpenAI HTTP path against the fake server (the limiter's own tests: test_global_limits.py).

Skipped when Ray is not installed (``pip install -e '.[ray]'``).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import capstream
from capstream.errors import BudgetReached, ConfigError, RunStopped

from conftest import (
    check_embedded,
    check_output,
    expected_caption,
    jpeg,
    load_out,
    make_rows,
    size_of_row,
    write_parquet,
)

pytestmark = [pytest.mark.ray, pytest.mark.slow]  # a local Ray takes seconds to start

KEY = "sk-test-secret-123"


ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():
    # Ray's worker processes import capstream: make it this checkout's, whatever the cwd.
    src = str(Path(capstream.__file__).resolve().parents[1])
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture
def key(monkeypatch):
    # Set after Ray started: its workers do not have it, the driver hands it to them.
    monkeypatch.setenv("FAKE_KEY", KEY)


def _config(server, data, out, backend="ray", **run):
    return {
        "dataset": {"path": "parquet", "data_files": str(data)},
        "model": {"provider": "openai", "name": "fake-vlm", "base_url": server.url, "api_key_env": "FAKE_KEY",
                  "timeout_s": 5},
        "retry": {"max_attempts": 3, "max_wait_s": 0.5},
        "limits": {"max_concurrency": 8},
        # No response cache: these tests count what each backend itself asks (the cache is tested alone).
        "run": {"chunk_size": 32, "backend": backend, "workers": 2, "cache": False, **run},
        "output": {"dir": str(out)},
    }


def test_ray_output_equals_the_local_backends(local_ray, key, server, tmp_path):
    rows, broken = make_rows(150, broken_every=10)
    data = write_parquet(tmp_path / "d.parquet", rows)
    local = capstream.run(_config(server, data, tmp_path / "local", backend="local", workers=1), show_progress=False)
    server.reset_counters()
    on_ray = capstream.run(_config(server, data, tmp_path / "ray"), show_progress=False)
    assert server.requests == 150 - len(broken)  # every good row asked once, over both workers

    check_output(tmp_path / "ray", rows, broken)
    local_shards = sorted(p.name for p in (tmp_path / "local" / "data").iterdir())
    assert sorted(p.name for p in (tmp_path / "ray" / "data").iterdir()) == local_shards  # 5 shards
    for name in local_shards:
        assert pq.read_table(tmp_path / "ray" / "data" / name).equals(pq.read_table(tmp_path / "local" / "data" / name))
    assert list(load_out(tmp_path / "ray")) == list(load_out(tmp_path / "local"))
    for k in ("rows", "ok", "errors", "input_tokens", "output_tokens", "complete"):
        assert getattr(on_ray.summary, k) == getattr(local.summary, k), k
    assert on_ray.summary.backend == "ray"
    card = (tmp_path / "ray" / "README.md").read_text()
    assert "dataset_info:" in card and "name: caption" in card and KEY not in card  # datasets finds data/train-*
    logs = sorted(p.name for p in (tmp_path / "ray" / ".capstream").glob("results*.jsonl"))
    assert logs == ["results-ray-0.jsonl", "results-ray-1.jsonl"]  # both workers did work
    for path in (tmp_path / "ray").rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


def test_a_stopped_ray_run_resumes_without_asking_twice(local_ray, key, server, tmp_path):
    rows, broken = make_rows(160, broken_every=40)
    data = write_parquet(tmp_path / "d.parquet", rows)
    config = _config(server, data, tmp_path / "out")
    answered = {"n": 0}

    def refuse_after_70(info):  # the key is revoked mid-run: 401 stops the run
        answered["n"] += 1
        return 401 if answered["n"] > 70 else None

    server.status_for = refuse_after_70
    with pytest.raises(RunStopped, match="401"):
        capstream.run(config, show_progress=False)
    state = tmp_path / "out" / ".capstream"
    logged = {}
    for log in state.glob("results-ray-*.jsonl"):
        for line in log.read_text().splitlines():
            record = json.loads(line)
            logged[record["k"]] = record
    paid = {k for k, r in logged.items() if r["e"] is None}
    assert 0 < len(paid) <= 70
    manifest = json.loads((state / "manifest.json").read_text())
    assert not manifest["complete"]

    server.status_for = None
    server.reset_counters()
    result = capstream.run(config, show_progress=False)
    good = 160 - len(broken)
    assert server.requests == good - len(paid)  # logged answers are not paid again
    done = {int(i) for i in manifest["done"]}
    assert result.summary.rows_from_log == sum(1 for r in logged.values() if r["i"] not in done)
    assert result.summary.complete
    check_output(tmp_path / "out", rows, broken)

    server.reset_counters()  # a finished run starts no Ray and sends nothing
    assert capstream.run(config, show_progress=False).summary.rows_this_run == 0
    assert server.requests == 0


def test_retry_errors_on_ray_asks_only_for_the_failed_rows(local_ray, key, server, tmp_path):
    rows, broken = make_rows(100, broken_every=50)
    data = write_parquet(tmp_path / "d.parquet", rows)
    config = _config(server, data, tmp_path / "out")
    refused = {3, 40, 41, 90}
    sizes = {expected_caption(i).split()[1] for i in refused}
    server.status_for = lambda info: 400 if f"{info.width}x{info.height}" in sizes else None
    capstream.run(config, show_progress=False)
    ds = load_out(tmp_path / "out")
    assert {i for i, e in enumerate(ds["error"]) if e and e.startswith("RequestError")} == refused

    server.status_for = None
    server.reset_counters()
    result = capstream.run(config, show_progress=False, retry_errors=True)
    assert server.requests == len(refused)
    check_output(tmp_path / "out", rows, broken)
    assert result.summary.errors == {"ImageError": len(broken)}

    # The local backend resumes a Ray run's folder the same way (it reads every worker's log).
    server.reset_counters()
    config["run"].update(backend="local", workers=1)
    capstream.run(config, show_progress=False, retry_errors=True)
    assert server.requests == 0
    check_output(tmp_path / "out", rows, broken)


def test_llm_in_code_is_refused_on_ray(key, server, tmp_path):
    rows, _ = make_rows(4)
    data = write_parquet(tmp_path / "d.parquet", rows)
    with pytest.raises(ConfigError, match="llm="):
        capstream.run(_config(server, data, tmp_path / "out"), llm=object(), show_progress=False)
    assert not (tmp_path / "out").exists()


def test_a_dataset_given_in_code_goes_through_ray_data(local_ray, key, server, tmp_path):
    """Not parquet files: what capstream opens (here a Dataset in code) reaches Ray via from_huggingface."""
    import datasets

    from conftest import FEATURES

    rows, broken = make_rows(40, broken_every=20)
    ds = datasets.Dataset.from_list(rows, features=FEATURES)
    config = _config(server, "unused", tmp_path / "out")
    del config["dataset"]
    out = capstream.caption_dataset(ds, config, show_progress=False)
    assert len(out) == 40 and server.requests == 40 - len(broken)
    check_output(tmp_path / "out", rows, broken)


def test_prompts_schema_and_templates_on_ray(local_ray, key, server, tmp_path):
    rows, broken = make_rows(40, broken_every=20)
    data = write_parquet(tmp_path / "d.parquet", rows)

    def reply(info):
        size = f"{info.width}x{info.height}"
        return json.dumps({"people": info.width % 3}) if "Count" in info.text else f"{size} / {info.text}"

    server.reply = reply
    prompts = {"caption": {"text": "Caption. Alt: {alt}"}, "meta": {"text": "Count people.", "schema": {"people": "integer"}}}
    local = _config(server, data, tmp_path / "local", backend="local", workers=1)
    on_ray = _config(server, data, tmp_path / "ray")
    for config in (local, on_ray):
        config["prompts"] = prompts
        capstream.run(config, show_progress=False)
    assert server.requests == 2 * 2 * (40 - len(broken))
    ray_out, local_out = load_out(tmp_path / "ray"), load_out(tmp_path / "local")
    assert list(ray_out) == list(local_out)
    assert ray_out[3]["caption"] == f"{expected_caption(3).split()[1]} / Caption. Alt: row 3"
    assert ray_out[3]["people"] == int(expected_caption(3).split()[1].split("x")[0]) % 3


def test_max_cost_usd_on_ray_stops_cleanly_and_a_higher_budget_resumes(local_ray, key, server, tmp_path):
    """The cluster's one budget (the limit broker holds it): every actor stops sending once the money
    spent, all runs into the folder, reaches it; a rerun with the same budget sends nothing, a higher
    one finishes without buying anything twice."""
    n = 150
    rows, broken = make_rows(n, broken_every=50)
    data = write_parquet(tmp_path / "d.parquet", rows)
    server.latency = 0.05  # requests are in flight when the budget is reached
    config = _config(server, data, tmp_path / "out", chunk_size=16, max_cost_usd=10.0)
    # $1000 per million tokens: each request (~270 tokens) costs about $0.27
    config["model"].update(price_input_per_mtok=1000.0, price_output_per_mtok=1000.0)
    config["limits"]["max_concurrency"] = 4
    with pytest.raises(BudgetReached, match="run.max_cost_usd reached") as stopped:
        capstream.run(config, show_progress=False)
    sent = server.requests
    spent = (server.prompt_tokens_total + server.completion_tokens_total) * 1000.0 / 1e6
    per_request = spent / server.ok
    assert 10.0 <= spent and 0 < sent < n - len(broken)
    # Over by at most what the two actors had in flight (4 each) and had not reported yet (4 each).
    assert spent < 10.0 + 2 * 2 * 4 * per_request + 1e-9
    summary = stopped.value.summary
    assert summary.backend == "ray" and not summary.complete and summary.cost_usd == pytest.approx(spent)
    assert "run.max_cost_usd reached" in summary.stopped

    with pytest.raises(BudgetReached):  # the same budget, already spent: no request at all
        capstream.run(config, show_progress=False)
    assert server.requests == sent

    config["run"]["max_cost_usd"] = 1000.0
    result = capstream.run(config, show_progress=False)
    assert result.summary.complete and server.requests == n - len(broken)  # nothing received paid again
    assert max(server.image_requests.values()) == 1
    check_output(tmp_path / "out", rows, broken)
    total = (server.prompt_tokens_total + server.completion_tokens_total) * 1000.0 / 1e6
    assert result.summary.cost_usd == pytest.approx(total)


def test_image_urls_on_ray_are_downloaded_once_and_embedded(local_ray, key, server, tmp_path):
    """The actors' sessions download URLs as a local run's do (the host is on 127.0.0.1: allowed
    explicitly), and the downloads come back with the results for the driver's shards."""
    import datasets

    from capstream.testing.image_host import FakeImageHost

    with FakeImageHost() as host:
        images = {i: jpeg(*size_of_row(i), colour=(i % 256, 80, 160)) for i in range(80)}
        host.images.update({f"/img/{i}.jpg": data for i, data in images.items()})
        host.missing.add("/img/9.jpg")
        host.fail_first.add("/img/20.jpg")
        features = datasets.Features({"id": datasets.Value("int64"), "url": datasets.Value("string")})
        data = tmp_path / "urls.parquet"
        datasets.Dataset.from_dict({"id": list(images), "url": [host.url(f"/img/{i}.jpg") for i in images]},
                                   features=features).to_parquet(str(data))
        config = _config(server, data, tmp_path / "ray")
        config["dataset"]["image_column"] = "url"
        config["image"] = {"allow_private_urls": True}
        config["output"]["embed_images"] = True
        capstream.run(config, show_progress=False)
        requests = dict(host.requests)
    assert requests == {f"/img/{i}.jpg": 2 if i == 20 else 1 for i in images}  # the shards took no second download
    check_embedded(tmp_path / "ray", images, 9, expected_caption)


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="the report's plots need the view extra")
def test_a_ray_run_keeps_its_events_for_the_report(local_ray, key, server, tmp_path):
    """Each actor logs its failed attempts, the broker the cluster's limit, the driver the run's start
    and stop; ``capstream view`` reads them all."""
    from capstream.io.events_log import read_events
    from capstream.io.layout import OutputLayout
    from capstream.view import build_view

    rows, _ = make_rows(96)
    data = write_parquet(tmp_path / "d.parquet", rows)
    server.p429 = 0.15
    config = _config(server, data, tmp_path / "ray")
    config["limits"]["requests_per_minute"] = 6000
    config["retry"]["max_attempts"] = 10  # no request fails every attempt: the run finishes
    capstream.run(config, show_progress=False)
    layout = OutputLayout(tmp_path / "ray", "train")
    assert {p.name for p in layout.events_logs()} >= {"events.jsonl", "events-ray-broker.jsonl"}
    events = read_events(layout.events_logs())
    assert [m.what for m in events.marks] == ["started", "stopped"] and events.marks[0].backend == "ray"
    assert events.limits[0].reason == "configured" and events.limits[0].per_minute == pytest.approx(6000 * 0.98)
    assert sum(1 for a in events.attempts if a.status == 429) == server.by_status[429]
    site = build_view(tmp_path / "ray")
    report = site.report.read_text()
    assert 'src="report/retries.svg"' in report and 'src="report/limits.svg"' in report
