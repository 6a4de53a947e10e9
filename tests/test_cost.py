"""Cost control during a run: one image-token rule, image.max_tokens_per_image, live cost, run.max_cost_usd."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import threading

import pytest
from PIL import Image

from capstream.captioner import Captioner
from capstream.results import Stats
from capstream.config import Config, config_from_dict
from capstream.cost import CostMeter, Prices
from capstream.errors import ConfigError
from capstream.images import image_size_after_prep, prepare_image
from capstream.prices import (DEFAULT_IMAGE_RULE, Patches, Tiles, image_rule, image_tokens, min_image_tokens,
                              sent_size, size_within_budget)
from capstream.progress import ProgressBar
from conftest import check_output, jpeg, make_rows, run_cli, write_config, write_parquet
from fake_openai import image_tokens as server_image_tokens

RULES = {"tiles 85+170": DEFAULT_IMAGE_RULE, "tiles 2833+5667": Tiles(2833, 5667),
         "patches x1.62": Patches(1.62), "patches x2.46": Patches(2.46)}
SIZES = [(1600, 1200), (4000, 1474), (513, 2049), (3000, 17), (800, 801), (5000, 5000), (640, 480)]


@pytest.fixture(autouse=True)
def no_tiktoken(monkeypatch):
    monkeypatch.setenv("CAPSTREAM_NO_TIKTOKEN", "1")


def _largest_by_brute_force(rule, w, h, max_side, detail, budget):
    longest = max(image_size_after_prep(w, h, max_side))
    fits = [side for side in range(1, longest + 1)
            if rule.tokens(*image_size_after_prep(w, h, side), detail) <= budget]
    return image_size_after_prep(w, h, max(fits))


# ----------------------------------------------------------------------------- the size search


@pytest.mark.parametrize("name", list(RULES))
def test_size_search_finds_the_largest_size_within_the_budget(name):
    rule = RULES[name]
    for w, h in SIZES:
        for max_side in (512, 2048):
            full = image_size_after_prep(w, h, max_side)
            most = rule.tokens(*full, "high")
            smallest = min_image_tokens(rule, "high")
            budgets = {smallest, smallest + 1, (smallest + most) // 2, most - 1, most, most + 1000}
            for budget in sorted(b for b in budgets if b >= smallest):
                got = size_within_budget(rule, w, h, max_side=max_side, detail="high", budget=budget)
                assert rule.tokens(*got, "high") <= budget
                assert got == _largest_by_brute_force(rule, w, h, max_side, "high", budget), (w, h, max_side, budget)
                assert max(got) <= max_side and got[0] <= w and got[1] <= h  # never upscaled
                # aspect ratio kept: the other side is the source's ratio rounded to the pixel
                assert got == image_size_after_prep(w, h, max(got))
                assert abs(min(got) - min(w, h) * max(got) / max(w, h)) <= 0.5 or min(got) == 1
                if budget >= most:
                    assert got == full  # already within the budget: not shrunk


def test_size_search_examples():
    # 1024x768 counts 85 + 170 x 4 = 765; 500 tokens allow 2 tiles: the long side at 683 keeps the short at 512.
    assert size_within_budget(DEFAULT_IMAGE_RULE, 1600, 1200, max_side=1024, detail="high", budget=500) == (683, 512)
    assert size_within_budget(DEFAULT_IMAGE_RULE, 1600, 1200, max_side=1024, detail="high", budget=255) == (512, 384)
    # detail low: 85 whatever the size, so nothing is shrunk for the budget
    assert size_within_budget(DEFAULT_IMAGE_RULE, 1600, 1200, max_side=1024, detail="low", budget=85) == (1024, 768)
    # gpt-4.1-mini: 1024x1024 is 1024 patches x 1.62 = 1659; 400 tokens allow 246 patches: 15 x 15 of 32 px
    got = size_within_budget(image_rule("gpt-4.1-mini"), 1024, 1024, max_side=2048, detail="high", budget=400)
    assert got == (480, 480) and image_tokens("gpt-4.1-mini", *got, "high") == 365
    with pytest.raises(ValueError):
        size_within_budget(DEFAULT_IMAGE_RULE, 100, 100, max_side=1024, detail="high", budget=254)


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
    cfg = Config.model_validate({"image": {"max_tokens_per_image": 100}, "model": {"api_key_env": "FAKE_KEY"}})
    with pytest.raises(ConfigError, match="max_tokens_per_image"):
        Captioner(cfg)
    # The CLI: exit 2 naming the key, nothing sent.
    config = write_config(tmp_path / "c.yaml", server.url, tmp_path / "missing.parquet", tmp_path / "out",
                          image={"max_tokens_per_image": 200, "detail": "high"})
    for command in ("validate", "run", "estimate"):
        result = run_cli(command, str(config))
        assert result.returncode == 2 and "image.max_tokens_per_image: 200" in result.stderr, result.stderr
    assert server.requests == 0


def test_the_token_budget_is_part_of_the_resume_fingerprint():
    a = config_from_dict({"image": {"max_tokens_per_image": 9000}}).fingerprint()
    assert a["image.max_tokens_per_image"] == 9000 != Config().fingerprint()["image.max_tokens_per_image"]


def test_prepare_image_passes_through_what_fits_and_shrinks_the_rest():
    to_send = sent_size(config_from_dict({"model": {"name": "gpt-4o"}, "image": {"detail": "high", "max_tokens_per_image": 255}}).image, "gpt-4o")
    small = jpeg(500, 300)
    assert prepare_image(small, target_size=to_send).data == small  # one tile already: sent as it is
    big = prepare_image(jpeg(1600, 1200), target_size=to_send)
    assert (big.width, big.height) == (512, 384) and big.reencoded
    # EXIF-rotated: shrunk to the same budget, then turned upright
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (1600, 1200), (9, 9, 9)).save(buf, "JPEG", exif=exif)
    rotated = prepare_image(buf.getvalue(), target_size=to_send)
    assert (rotated.width, rotated.height) == (384, 512)


# ---------------------------------------------------------------- the token budget, end to end


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


# ------------------------------------------------------------------------------------ live cost


def test_progress_bar_shows_money_spent_and_projected():
    stats = Stats(input_tokens=400_000, output_tokens=50_000)
    meter = CostMeter(Prices(2.0, 10.0, "config"), stats, before=(100_000, 0))
    bar = ProgressBar(1000, stats, enabled=False, initial=250, meter=meter)
    # (500k x $2 + 50k x $10) / 1M = $1.50 spent over 250 rows of 1000: ~$6.00
    assert bar.money() == " $1.50 of ~$6.00"
    assert ProgressBar(None, stats, enabled=False, initial=250, meter=meter).money() == " $1.50"
    unknown = CostMeter(Prices(None, None, "unknown"), stats)
    assert ProgressBar(1000, stats, enabled=False, meter=unknown).money() == ""
    assert meter.projected_usd(0, 1000) is None


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
    config = write_config(tmp_path / "c.yaml", server.url, tmp_path / "none.parquet", tmp_path / "out",
                          run={"max_cost_usd": 1.0})
    result = run_cli("run", str(config))
    assert result.returncode == 2 and "run.max_cost_usd" in result.stderr and "price" in result.stderr
    assert server.requests == 0
    with_price = run_cli("validate", str(config), "--set", "model.price_input_per_mtok=1",
                         "--set", "model.price_output_per_mtok=1")
    assert with_price.returncode == 0, with_price.stderr
    assert run_cli("validate", str(config), "--set", "run.max_cost_usd=0").returncode == 2


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
