"""Cost control during real runs: one image-token rule for limiter and estimate, the budget checks, live cost, run.max_cost_usd."""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading

import pytest

from capstream.captioner import Captioner
from capstream.config import Config, config_from_dict
from capstream.cost.pricing import (
    image_tokens,
)
from capstream.errors import ConfigError
from capstream.row.images import prepare_image
from capstream.testing.openai_server import image_tokens as server_image_tokens

from conftest import check_output, jpeg, make_rows, run_cli, write_config, write_parquet


def test_one_image_rule_for_the_limiter_and_the_estimate(monkeypatch):
    monkeypatch.setenv("FAKE_KEY", "sk-test")
    for model, tokens in [("gpt-4o-mini", 2833 + 5667 * 4), ("gpt-4o", 85 + 170 * 4), ("my-vlm", 85 + 170 * 4),  # nano: 32 x 24 patches x 2.46
                          ("gpt-4.1-nano", 1890)]:
        assert image_tokens(model, 1024, 768, "high") == tokens
        captioner = Captioner({"model": {"name": model, "base_url": "http://127.0.0.1:9/v1", "api_key_env": "FAKE_KEY",
                                         "max_tokens": 100}, "image": {"detail": "high"}})

        async def limiter_count():
            session = captioner.session()
            try:
                return session.estimated_tokens(prepare_image(jpeg(1024, 768)), captioner.config.prompt.text, None)
            finally:
                await session.aclose()

        assert asyncio.run(limiter_count()) == tokens + session_text_tokens(captioner.config) + 100
        captioner.close()


def session_text_tokens(config: Config) -> int:
    return (len(config.prompt.text) + len(config.prompt.system or "")) // 4 + 10


def test_budget_below_the_rules_minimum_is_a_config_error(server, tmp_path, monkeypatch):
    for model, detail, smallest in [("fake-vlm", "high", 255), ("fake-vlm", "low", 85), ("gpt-4o-mini", "auto", 8500),
                                    ("gpt-4.1-mini", "high", 2)]:
        with pytest.raises(ConfigError, match=r"image\.max_tokens_per_image: .*\({}:".format(smallest)):
            config_from_dict({"model": {"name": model}, "image": {"detail": detail, "max_tokens_per_image": smallest - 1}})
        config_from_dict({"model": {"name": model}, "image": {"detail": detail, "max_tokens_per_image": smallest}})
    # A Config built in code is checked too, before anything is read.
    monkeypatch.setenv("FAKE_KEY", "sk-test")
    with pytest.raises(ConfigError, match="max_tokens_per_image"):
        Captioner(Config.model_validate({"image": {"max_tokens_per_image": 100}, "model": {"api_key_env": "FAKE_KEY"}}))
    # The CLI: exit 2 naming the key, nothing sent.
    config = write_config(tmp_path / "c.yaml", server.url, tmp_path / "missing.parquet", tmp_path / "out",
                          image={"max_tokens_per_image": 200, "detail": "high"})
    for command in ("validate", "run", "estimate"):
        result = run_cli(command, str(config))
        assert result.returncode == 2 and "image.max_tokens_per_image: 200" in result.stderr, result.stderr
    assert server.requests == 0


@pytest.fixture(scope="module")
def mixed_sizes(tmp_path_factory):
    """40 JPEGs: large (shrunk for a budget), small (sent as they are), tall and wide."""
    sizes = [(1600, 1200), (400, 300), (3000, 700), (900, 2400), (1024, 1024)]
    rows = [{"id": i, "image": {"bytes": jpeg(*sizes[i % len(sizes)], colour=(i * 5, 80, 160)), "path": None},
             "alt": f"row {i}"} for i in range(40)]
    return write_parquet(tmp_path_factory.mktemp("mixed") / "images.parquet", rows), rows


@pytest.mark.parametrize("model, budget, server_max", [
    ("fake-vlm", 500, 500),  # not in the table: OpenAI's tile rule, the one the fake server counts by
    ("gpt-4o", 255, 255),
    # gpt-4o-mini counts 2833 + 5667 per tile: 14167 tokens are 2 tiles, which the server counts as 85 + 170 x 2
    ("gpt-4o-mini", 14167, 425),
])
def test_server_counted_image_tokens_stay_within_the_budget(server, mixed_sizes, tmp_path, model, budget, server_max):
    data, rows = mixed_sizes
    counted, lock = {}, threading.Lock()

    def reply(info):
        with lock:
            counted[info.image_sha256] = server_image_tokens(info.width, info.height, info.detail)
        return f"image {info.width}x{info.height}"

    server.reply = reply
    config = write_config(tmp_path / "c.yaml", server.url, data, tmp_path / "out", model={"name": model},
                          image={"detail": "high", "max_tokens_per_image": budget})
    estimated = run_cli("estimate", str(config), "--json")
    assert estimated.returncode == 0, estimated.stderr
    result = run_cli("run", str(config))
    assert result.returncode == 0, result.stderr
    assert server.requests == 40 and len(counted) == len({r["image"]["bytes"] for r in rows})
    assert max(counted.values()) <= server_max
    assert min(counted.values()) < server_max or server_max == 255  # not everything shrunk to the minimum
    # An image already within the budget went as it was (same bytes); the others were shrunk.
    sha = [hashlib.sha256(r["image"]["bytes"]).hexdigest() for r in rows]
    assert all(sha[i] in counted for i in range(1, 40, 5))  # 400x300: one tile, within every budget here
    assert not any(sha[i] in counted for i in range(0, 40, 5))  # 1600x1200: over every budget here
    # The estimate applies the same sizing: its image tokens are what the server counted, for the
    # models whose rule the server uses.
    est = json.loads(estimated.stdout)
    if model in ("fake-vlm", "gpt-4o"):
        assert est["image_tokens"] == sum(counted.values())


def test_summary_and_card_record_the_cost_the_server_counted(server, tmp_path):
    rows, broken = make_rows(60, broken_every=20)
    data = write_parquet(tmp_path / "d.parquet", rows)
    config = write_config(tmp_path / "c.yaml", server.url, data, tmp_path / "out",
                          model={"price_input_per_mtok": 3.0, "price_output_per_mtok": 12.0})
    result = run_cli("run", str(config))
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    expected = (server.prompt_tokens_total * 3.0 + server.completion_tokens_total * 12.0) / 1e6
    assert summary["cost_usd"] == pytest.approx(expected) and summary["cost_usd_this_run"] == pytest.approx(expected)
    assert summary["paid_input_tokens"] == server.prompt_tokens_total
    assert summary["prices"] == {"input_per_mtok": 3.0, "output_per_mtok": 12.0, "source": "config"}
    assert "cost: $" in result.stderr
    assert f"Cost: ${expected:.4f}" in (tmp_path / "out" / "README.md").read_text()
    # Unknown price: null cost, no cost line in the card.
    unknown = write_config(tmp_path / "u.yaml", server.url, data, tmp_path / "out2")
    assert run_cli("run", str(unknown)).returncode == 0
    summary = json.loads((tmp_path / "out2" / "summary.json").read_text())
    assert summary["cost_usd"] is None and summary["prices"]["source"] == "unknown"
    assert "Cost:" not in (tmp_path / "out2" / "README.md").read_text()


def test_max_cost_usd_needs_a_known_price(server, tmp_path):
    data = write_parquet(tmp_path / "d.parquet", make_rows(2)[0])  # validate checks the files exist
    config = write_config(tmp_path / "c.yaml", server.url, data, tmp_path / "out",
                          run={"max_cost_usd": 1.0})
    result = run_cli("run", str(config))
    assert result.returncode == 2 and "run.max_cost_usd" in result.stderr and "price" in result.stderr
    assert server.requests == 0
    with_price = run_cli("validate", str(config), "--set", "model.price_input_per_mtok=1",
                         "--set", "model.price_output_per_mtok=1")
    assert with_price.returncode == 0, with_price.stderr
    assert run_cli("validate", str(config), "--set", "run.max_cost_usd=0").returncode == 2


@pytest.mark.slow
def test_max_cost_usd_stops_cleanly_and_a_higher_budget_resumes(server, tmp_path):
    n = 150
    rows, broken = make_rows(n, broken_every=50)
    data = write_parquet(tmp_path / "d.parquet", rows)
    out = tmp_path / "out"
    server.latency = 0.05  # requests are in flight when the budget is reached
    # $1000 per million input tokens: each request (~270 tokens) costs about $0.27
    config = write_config(tmp_path / "c.yaml", server.url, data, out,
                          model={"price_input_per_mtok": 1000.0, "price_output_per_mtok": 1000.0},
                          limits={"max_concurrency": 4}, run={"chunk_size": 16, "max_cost_usd": 10.0})
    first = run_cli("run", str(config))
    assert first.returncode == 1, first.stderr
    assert first.stderr.count("run.max_cost_usd reached") == 1 and "rerun" in first.stderr
    sent = server.requests
    spent = (server.prompt_tokens_total + server.completion_tokens_total) * 1000.0 / 1e6
    assert 10.0 <= spent and 0 < sent < n - len(broken)
    per_request = spent / server.ok
    assert spent < 10.0 + 4 * per_request + 1e-9  # at most the requests in flight (max_concurrency) over
    # Every answer received, in flight at the stop included, is in the results log.
    assert len((out / ".capstream" / "results.jsonl").read_text().splitlines()) >= server.ok
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] is False and summary["cost_usd"] == pytest.approx(spent)
    assert "run.max_cost_usd reached" in summary["stopped"]

    again = run_cli("run", str(config))  # same budget, already spent: stops before any request
    assert again.returncode == 1 and "run.max_cost_usd reached" in again.stderr
    assert server.requests == sent

    final = run_cli("run", str(config), "--set", "run.max_cost_usd=1000")
    assert final.returncode == 0, final.stderr
    assert server.requests == n - len(broken)  # nothing received was paid for again
    assert len(server.image_requests) == n - len(broken) and max(server.image_requests.values()) == 1
    check_output(out, rows, broken)
    summary = json.loads((out / "summary.json").read_text())
    total = (server.prompt_tokens_total + server.completion_tokens_total) * 1000.0 / 1e6
    assert summary["complete"] is True and summary["cost_usd"] == pytest.approx(total)
    assert summary["cost_usd_this_run"] == pytest.approx(total - spent)
