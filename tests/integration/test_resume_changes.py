"""What a rerun into the same folder may change: a larger (or no) ``dataset.limit`` goes on with the
same run; ``max_tokens`` may change with ``--retry-errors`` (a truncated answer's fix). Each change is
recorded in the manifest and the card; anything else is refused as before."""

from __future__ import annotations

import json

import pytest

from conftest import check_output, make_rows, run_cli, write_config, write_parquet


def _manifest(out) -> dict:
    return json.loads((out / ".capstream" / "manifest.json").read_text())


@pytest.mark.parametrize("streaming", [False, True])
def test_try_a_few_rows_then_run_everything_into_the_same_folder(server, tmp_path, streaming):
    rows, broken = make_rows(50, broken_every=25)
    data = write_parquet(tmp_path / "d.parquet", rows)
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", server.url, data, out, run={"chunk_size": 16},
                          dataset={"streaming": streaming})

    result = run_cli("run", str(config), "--set", "dataset.limit=10")
    assert result.returncode == 0, result.stderr
    assert server.requests == 10
    check_output(out, rows[:10], broken)

    server.reset_counters()
    result = run_cli("run", str(config), "--set", "dataset.limit=20")  # a larger limit goes on
    assert result.returncode == 0, result.stderr
    assert server.requests == 10  # rows 10..19: the first ten were answered already
    check_output(out, rows[:20], broken)

    server.reset_counters()
    result = run_cli("run", str(config))  # no limit: everything
    assert result.returncode == 0, result.stderr
    assert server.requests == 50 - 20 - len([i for i in broken if i >= 20])
    check_output(out, rows, broken)
    manifest = _manifest(out)
    assert manifest["complete"] and manifest["fingerprint"]["dataset.limit"] is None
    assert [c["changed"] for c in manifest["changes"]] == [{"dataset.limit": [10, 20]}, {"dataset.limit": [20, None]}]
    assert "changed by a rerun" in (out / "README.md").read_text()

    server.reset_counters()
    result = run_cli("run", str(config), "--set", "dataset.limit=30")  # a smaller one than the folder's: refused
    assert result.returncode == 2
    assert "dataset.limit" in result.stderr and "never shrink" in result.stderr
    assert server.requests == 0


def test_raise_max_tokens_and_retry_errors_fixes_truncated_answers(server, tmp_path):
    rows, broken = make_rows(40, broken_every=20)
    data = write_parquet(tmp_path / "d.parquet", rows)
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", server.url, data, out, model={"max_tokens": 20},
                          run={"chunk_size": 16})
    long_rows = {3, 17, 30}  # their answer needs more than 20 tokens
    sizes = {(64 + i % 400, 48 + i // 400 + i % 7) for i in long_rows}
    asked_with = []  # max_tokens of every request answered

    def cut_when_short(info):
        asked_with.append(info.body["max_completion_tokens"])
        return "length" if (info.width, info.height) in sizes and asked_with[-1] < 100 else None

    server.finish_reason = cut_when_short
    result = run_cli("run", str(config))
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["errors"] == {"TruncatedAnswer": 3, "ImageError": len(broken)}

    # The same max_tokens, without --retry-errors: refused, naming the way that works.
    server.reset_counters()
    result = run_cli("run", str(config), "--set", "model.max_tokens=400")
    assert result.returncode == 2
    assert "model.max_tokens" in result.stderr and "--retry-errors" in result.stderr
    assert server.requests == 0

    asked_with.clear()
    result = run_cli("run", str(config), "--set", "model.max_tokens=400", "--retry-errors")
    assert result.returncode == 0, result.stderr
    assert server.requests == len(long_rows) and asked_with == [400] * 3  # only the truncated rows, asked again
    check_output(out, rows, broken)
    manifest = _manifest(out)
    assert manifest["fingerprint"]["model.max_tokens"] == 400
    [change] = manifest["changes"]
    assert change["changed"] == {"model.max_tokens": [20, 400]} and change["retry_errors"] is True
    card = (out / "README.md").read_text()
    assert "changed by a rerun" in card and "`model.max_tokens` 20 → 400" in card and "max_tokens 400" in card

    # From now on the folder's max_tokens is 400: a plain rerun with it is the same run.
    server.reset_counters()
    assert run_cli("run", str(config), "--set", "model.max_tokens=400").returncode == 0
    assert server.requests == 0
