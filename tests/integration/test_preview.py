"""``capstream preview``: a few rows asked, their answers, tokens and cost, the whole dataset's cost
projected; nothing written into output.dir, and the run does not pay for those rows again."""

from __future__ import annotations

import re

import pytest

from conftest import expected_caption, make_rows, run_cli, write_config, write_parquet

PRICES = {"price_input_per_mtok": 2.0, "price_output_per_mtok": 8.0}


def _setup(server, tmp_path, **dataset):
    rows, broken = make_rows(120, broken_every=10)
    data = write_parquet(tmp_path / "d.parquet", rows)
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", server.url, data, out, model=PRICES,
                          dataset={"key_column": "id", **dataset})
    return config, out, broken


def _labels(stdout: str) -> list[str]:
    return re.findall(r"^row (\d+) \(id (\d+)\)$", stdout, re.M)


def test_preview_shows_rows_and_projects_the_cost_and_the_run_pays_for_them_once(server, tmp_path):
    config, out, broken = _setup(server, tmp_path)
    result = run_cli("preview", str(config), "-n", "5")
    assert result.returncode == 0, result.stderr
    assert [int(key) for _, key in _labels(result.stdout)] == [0, 1, 2, 3, 4]
    for i in range(5):
        assert f"  caption: {expected_caption(i)}" in result.stdout
    assert server.requests == 5
    paid_in, paid_out = server.prompt_tokens_total, server.completion_tokens_total
    assert f"5 rows: 5 requests, {paid_in}+{paid_out} tokens paid now" in result.stdout
    projected = (paid_in * 2.0 + paid_out * 8.0) / 1e6 / 5 * 120
    whole = re.search(r"whole dataset: 120 rows, ~\$([\d.]+) at the rate of these 5", result.stdout)
    assert whole and float(whole.group(1)) == pytest.approx(projected, abs=1e-4), result.stdout
    assert not out.exists()  # nothing written into output.dir

    server.reset_counters()  # the same rows again: from the response cache, at the same projected cost
    again = run_cli("preview", str(config), "-n", "5")
    assert server.requests == 0
    assert again.stdout.count("(from the response cache: not paid again)") == 5
    assert whole.group(0) in again.stdout

    server.reset_counters()
    assert run_cli("run", str(config)).returncode == 0
    assert server.requests == 120 - len(broken) - 5  # the previewed rows are not paid again


@pytest.mark.parametrize("streaming", [False, True])
def test_preview_sample_picks_rows_at_random_the_same_with_a_seed(server, tmp_path, streaming):
    config, out, _ = _setup(server, tmp_path, streaming=streaming)
    picks = []
    for seed in ("7", "7", "8"):
        result = run_cli("preview", str(config), "-n", "4", "--sample", "--seed", seed)
        assert result.returncode == 0, result.stderr
        labels = _labels(result.stdout)
        assert all(position == key for position, key in labels)  # positions known, in a stream too
        picks.append(sorted(int(key) for _, key in labels))
    assert picks[0] == picks[1] and picks[0] != picks[2] and len(picks[0]) == 4
    assert picks[0] != [0, 1, 2, 3]
    assert not out.exists()
