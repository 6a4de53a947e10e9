"""``capstream estimate``: rows, requests, tokens and cost before a run, without a single request."""

from __future__ import annotations

import io
import json
import sys
import types

import datasets
import pytest
from PIL import Image, ImageDraw

from capstream.cli import main
from capstream.config import Config, config_from_dict
from capstream.cost.estimate import APPROXIMATION, estimate, prompt_tokens
from capstream.cost.pricing import (
    DEFAULT_IMAGE_RULE,
    PRICES,
    Patches,
    image_size_after_prep,
    model_billing,
    openai_image_tokens,
)

from conftest import FEATURES, make_rows, run_cli, write_config, write_parquet


@pytest.fixture(autouse=True)
def no_tiktoken(monkeypatch):
    # tiktoken downloads its encoding files on first use: never here (subprocesses inherit it too).
    monkeypatch.setenv("CAPSTREAM_NO_TIKTOKEN", "1")


@pytest.fixture(scope="module")
def big_parquet(tmp_path_factory):
    """300 JPEGs of 1600x1200 (larger than image.max_side, so a run shrinks them)."""
    rows = []
    for i in range(300):
        buf = io.BytesIO()
        img = Image.new("RGB", (1600, 1200), (i % 256, 90, 200 - i % 100))
        # A mark of its own, so no two images are alike once shrunk (identical ones cost one request).
        ImageDraw.Draw(img).rectangle([(i * 5) % 1500, (i * 3) % 1100, (i * 5) % 1500 + 80, (i * 3) % 1100 + 80], fill="white")
        img.save(buf, "JPEG", quality=30)
        rows.append({"id": i, "image": {"bytes": buf.getvalue(), "path": None}, "alt": f"row {i}"})
    return write_parquet(tmp_path_factory.mktemp("big") / "images.parquet", rows)


@pytest.fixture(scope="module")
def small_parquet(tmp_path_factory):
    """30 rows, every 10th image broken (corrupt, truncated, missing)."""
    rows, broken = make_rows(30, broken_every=10)
    return write_parquet(tmp_path_factory.mktemp("small") / "images.parquet", rows), broken


def one_json_object(stdout: str) -> dict:
    lines = stdout.strip().splitlines()
    assert len(lines) == 1, stdout  # exactly one JSON object on stdout
    return json.loads(lines[0])


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """``capstream ARGS`` in this process (a subprocess costs seconds of imports): (code, stdout, stderr)."""
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def estimate_json(capsys, config, *args: str) -> dict:
    code, out, err = cli(capsys, "estimate", str(config), "--json", *args)
    assert code == 0, err
    return one_json_object(out)


def corrupt_parquet(path, rows):
    """A parquet file whose footer is fine and whose data pages are not: it opens, then fails to read."""
    data = bytearray(write_parquet(path, rows).read_bytes())
    for i in range(len(data) // 4, len(data) // 2):
        data[i] = (data[i] * 7 + 13) % 256
    path.write_bytes(bytes(data))
    return path


@pytest.mark.slow
def test_estimate_sends_nothing_and_matches_the_run(server, big_parquet, tmp_path):
    config = write_config(tmp_path / "c.yaml", server.url, big_parquet, tmp_path / "out", image={"detail": "high"})
    result = run_cli("estimate", str(config), "--json")
    assert result.returncode == 0, result.stderr
    est = one_json_object(result.stdout)
    assert server.requests == 0
    assert (est["rows"], est["requests"], est["unusable_images"]) == (300, 300, 0)
    assert est["rows_exact"] is True and est["rows_source"] == "counted"
    assert est["prompt_token_method"] == APPROXIMATION
    assert est["image_tokens"] == 300 * 765  # 1600x1200 -> 1024x768 -> 4 tiles
    assert est["output_tokens"] == 300 * 300

    run = run_cli("run", str(config))
    assert run.returncode == 0, run.stderr
    assert server.ok == 300
    actual = server.prompt_tokens_total
    print(f"estimate {est['input_tokens']} vs server {actual} ({est['input_tokens'] / actual - 1:+.2%})")
    assert abs(est["input_tokens"] - actual) <= 0.15 * actual


def test_broken_images_are_unusable_rows_as_in_a_run(server, small_parquet, tmp_path, capsys):
    data, broken = small_parquet
    config = write_config(tmp_path / "c.yaml", server.url, data, tmp_path / "out")
    est = estimate_json(capsys, config)
    assert (est["rows"], est["requests"], est["unusable_images"]) == (30, 27, 3)
    assert run_cli("run", str(config)).returncode == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["errors"] == {"ImageError": len(broken)}
    assert server.requests == est["requests"]


def test_human_output_and_json(small_parquet, tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", None, small_parquet[0], tmp_path / "out")
    code, out, err = cli(capsys, "estimate", str(config))
    assert code == 0, err
    assert "rows              30" in out and "cost              unknown" in out
    est = estimate_json(capsys, config)
    for key in ("rows", "requests", "unusable_images", "input_tokens", "output_tokens", "cost_usd",
                "rows_exact", "prompt_token_method", "price_source"):
        assert key in est


def test_prices_from_the_config_the_table_or_unknown(small_parquet, tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", None, small_parquet[0], tmp_path / "out")
    unknown = estimate_json(capsys, config)  # model fake-vlm
    assert unknown["cost_usd"] is None and unknown["price_source"] == "unknown"
    assert not {"model.price_input_per_mtok", "model.price_output_per_mtok"} & set(Config.FINGERPRINT_KEYS)

    own = estimate_json(capsys, config, "--set", "model.price_input_per_mtok=2", "--set", "model.price_output_per_mtok=10")
    assert own["price_source"] == "config"
    assert own["cost_usd"] == pytest.approx((own["input_tokens"] * 2 + own["output_tokens"] * 10) / 1e6)

    table = estimate_json(capsys, config, "--set", "model.name=gpt-4o-2024-08-06", "--set", "model.price_output_per_mtok=0")
    assert table["price_source"].startswith("config+table:")
    assert table["cost_usd"] == pytest.approx(table["input_tokens"] * 2.5 / 1e6)


def test_streaming_rows_are_counted_or_reported_inexact(tmp_path, capsys):
    # A file of its own: once loaded without streaming, datasets' cache gives a stream its row count.
    data = write_parquet(tmp_path / "stream.parquet", make_rows(30, broken_every=10)[0])
    config = write_config(tmp_path / "c.yaml", None, data, tmp_path / "out", dataset={"streaming": True})
    full = estimate_json(capsys, config)
    assert (full["rows"], full["rows_exact"], full["unusable_images"]) == (30, True, 3)
    assert estimate_json(capsys, config, "--set", "dataset.limit=7")["rows"] == 7
    part = estimate_json(capsys, config, "--sample", "5")
    assert (part["rows"], part["rows_read"], part["rows_exact"], part["rows_source"]) == (5, 5, False, "sample")
    code, out, _ = cli(capsys, "estimate", str(config), "--sample", "5")
    assert code == 0 and "at least 5 (a stream with no row count" in out
    assert estimate_json(capsys, config, "--sample", "100")["rows_exact"] is True  # the stream ended first


def test_sample_scales_to_the_row_count_in_the_metadata():
    rows = make_rows(40)[0]
    stream = datasets.Dataset.from_list(rows, features=FEATURES).to_iterable_dataset()
    stream.info.splits = datasets.SplitDict({"train": datasets.SplitInfo("train", num_examples=40)})
    cfg = config_from_dict({"model": {"name": "fake-vlm"}})
    est = estimate(cfg, sample=10, data=stream)
    assert (est.rows, est.rows_exact, est.rows_source, est.rows_read, est.requests) == (40, True, "metadata", 10, 40)
    in_memory = estimate(cfg, sample=10, data=datasets.Dataset.from_list(rows, features=FEATURES))
    assert (in_memory.rows, in_memory.rows_source, in_memory.image_tokens) == (40, "metadata", est.image_tokens)


def test_config_error_exits_2_and_unreadable_dataset_exits_1(small_parquet, tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", None, small_parquet[0], tmp_path / "out")
    code, _, err = cli(capsys, "estimate", str(config), "--set", "model.price_input_per_mtok=-1")
    assert code == 2 and "price_input_per_mtok" in err
    assert cli(capsys, "estimate", str(config), "--set", "model.nope=1")[0] == 2
    assert cli(capsys, "estimate", str(config), "--sample", "0")[0] == 2
    bad = corrupt_parquet(tmp_path / "bad.parquet", make_rows(30)[0])
    for streaming in (False, True):
        broken = write_config(tmp_path / "b.yaml", None, bad, tmp_path / "out2", dataset={"streaming": streaming})
        code, out, err = cli(capsys, "estimate", str(broken), "--json")
        assert code == 1 and out == "", err
        assert "capstream: dataset: cannot read" in err and "bad.parquet" in err


def test_tiktoken_is_used_when_it_knows_the_model(monkeypatch):
    cfg = config_from_dict({"prompt": {"text": "one two three", "system": "be brief"}})
    assert prompt_tokens(cfg.prompt.text, cfg.prompt.system, "gpt-4o") == (4 + 4 + 2 + 4, APPROXIMATION)  # forced by the env var
    monkeypatch.delenv("CAPSTREAM_NO_TIKTOKEN")

    class Encoding:
        name = "fake_base"

        def encode(self, text):
            return text.split()

    def encoding_for_model(model):
        if model != "gpt-4o":
            raise KeyError(model)
        return Encoding()

    monkeypatch.setitem(sys.modules, "tiktoken", types.SimpleNamespace(encoding_for_model=encoding_for_model))
    assert prompt_tokens(cfg.prompt.text, cfg.prompt.system, "gpt-4o") == (3 + 3 + 2 + 3 + 3, "tiktoken (fake_base)")
    assert prompt_tokens(cfg.prompt.text, cfg.prompt.system, "my-local-model")[1] == APPROXIMATION


def test_image_rules():
    # OpenAI's published examples: 1024x1024 is 1024 patches, 1800x2400 is 1452 (shrunk under the cap).
    assert Patches(1.0).tokens(1024, 1024, "high") == 1024
    assert Patches(1.0).tokens(1800, 2400, "high") == 1452
    assert model_billing("gpt-4o-mini").image.tokens(128, 64, "high") == 2833 + 5667
    assert model_billing("GPT-4.1").image == DEFAULT_IMAGE_RULE and model_billing("llava") is None
    assert DEFAULT_IMAGE_RULE.tokens(1600, 1200, "high") == openai_image_tokens(1600, 1200, "high")
    # EXIF rotation is ignored on purpose: a transposed image costs the same under every rule.
    rules = [DEFAULT_IMAGE_RULE] + [b.image for b in PRICES.values()]
    for w, h in [(1600, 1200), (4000, 1474), (513, 2049), (3000, 17), (800, 801)]:
        for max_side in (512, 1024, 4096):
            a, b = image_size_after_prep(w, h, max_side), image_size_after_prep(h, w, max_side)
            assert a == b[::-1]
            for rule in rules:
                for detail in ("low", "high"):
                    assert rule.tokens(*a, detail) == rule.tokens(*b, detail)


def test_estimate_counts_one_request_per_prompt(server, small_parquet, tmp_path):
    small_parquet, _ = small_parquet
    config = write_config(tmp_path / "c.yaml", server.url, small_parquet, tmp_path / "out", image={"detail": "low"},
                          prompts={"short": {"text": "Short.", "max_tokens": 50}, "long": {"text": "Long caption."}})
    one = write_config(tmp_path / "one.yaml", server.url, small_parquet, tmp_path / "out1", image={"detail": "low"},
                       prompt={"text": "Short."})
    two, single = (one_json_object(run_cli("estimate", str(c), "--json").stdout) for c in (config, one))
    usable = single["requests"]
    assert (two["rows"], two["requests"], two["unusable_images"]) == (30, 2 * usable, 30 - usable)
    assert two["image_tokens"] == 2 * single["image_tokens"] == 2 * usable * 85
    assert two["output_tokens"] == usable * (50 + 300)
    assert server.requests == 0
