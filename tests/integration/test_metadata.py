"""``output.metadata: true``: per prompt, typed columns saying how each answer was bought; off by default."""

from __future__ import annotations

import datetime
import time

import datasets
import pyarrow.parquet as pq
import yaml

from conftest import FEATURES, expected_caption, load_out, make_rows, run_cli, write_config, write_parquet

COLUMNS = {"caption_model": "string", "caption_finish_reason": "string", "caption_input_tokens": "int64",
           "caption_output_tokens": "int64", "caption_latency_ms": "int64", "caption_attempts": "int64",
           "caption_answered_at": "timestamp[ms, tz=UTC]"}


def _card_features(out) -> dict[str, str]:
    header = (out / "README.md").read_text().split("---")[1]
    return {f["name"]: f.get("dtype") for f in yaml.safe_load(header)["dataset_info"]["features"]}


def test_metadata_columns_say_how_each_answer_was_bought(server, tmp_path):
    rows, broken = make_rows(40, broken_every=10)
    data = write_parquet(tmp_path / "d.parquet", rows)
    server.latency = 0.05
    failed_once = set()

    def first_attempt_fails(info):  # row 5's image: a 500, then the answer (two attempts)
        if (info.width, info.height) == (69, 53) and not failed_once:
            failed_once.add(1)
            return 500
        return None

    server.status_for = first_attempt_fails
    server.finish_reason = lambda info: "length" if (info.width, info.height) == (71, 48) else None  # row 7
    config = write_config(tmp_path / "c.yaml", server.url, data, tmp_path / "out", output={"metadata": True},
                          run={"chunk_size": 16})
    started = time.time()
    result = run_cli("run", str(config))
    assert result.returncode == 0, result.stderr
    finished = time.time()

    schema = pq.read_schema(sorted((tmp_path / "out" / "data").glob("*.parquet"))[0])
    assert {name: str(schema.field(name).type) for name in COLUMNS} == COLUMNS
    assert {k: v for k, v in _card_features(tmp_path / "out").items() if k in COLUMNS} == COLUMNS

    ds = load_out(tmp_path / "out")
    assert sum(n or 0 for n in ds["caption_input_tokens"][:]) == server.prompt_tokens_total
    assert sum(n or 0 for n in ds["caption_output_tokens"][:]) == server.completion_tokens_total
    for i, row in enumerate(ds):
        if i in broken:  # no request: no answer to describe
            assert all(row[name] is None for name in COLUMNS), row
            continue
        assert row["caption_model"] == "fake-vlm"
        assert row["caption_finish_reason"] == ("length" if i == 7 else "stop")
        assert row["caption_attempts"] == (2 if i == 5 else 1), i
        assert row["caption_latency_ms"] >= 50
        assert row["caption_input_tokens"] > 0 and row["caption_output_tokens"] == 2, row
        answered = row["caption_answered_at"]
        assert answered.tzinfo is not None and started - 1 <= answered.timestamp() <= finished + 1
        assert (row["caption"] == expected_caption(i)) == (i != 7)

    # A new folder with the same settings buys nothing: the cache's answers keep how they were bought.
    bought = {i: (row["caption_answered_at"], row["caption_input_tokens"]) for i, row in enumerate(ds)
              if i not in broken and i != 7}
    server.reset_counters()
    result = run_cli("run", str(config), "--set", f"output.dir={tmp_path / 'again'}")
    assert result.returncode == 0, result.stderr
    assert server.requests == 1  # only the truncated row (an error is never cached)
    again = load_out(tmp_path / "again")
    for i, (answered_at, input_tokens) in bought.items():
        assert again[i]["caption_model"] == "fake-vlm" and again[i]["caption_input_tokens"] == input_tokens
        assert abs(again[i]["caption_answered_at"] - answered_at) < datetime.timedelta(milliseconds=2)


def test_metadata_is_off_by_default(server, tmp_path):
    rows, _ = make_rows(5)
    data = write_parquet(tmp_path / "d.parquet", rows)
    config = write_config(tmp_path / "c.yaml", server.url, data, tmp_path / "out")
    assert run_cli("run", str(config)).returncode == 0
    assert load_out(tmp_path / "out").column_names == [*FEATURES, "caption", "error"]
    assert set(_card_features(tmp_path / "out")) == {*FEATURES, "caption", "error"}


def test_several_prompts_get_metadata_each_and_the_map_function_too(server, monkeypatch):
    from capstream import Captioner

    rows, _ = make_rows(3)
    monkeypatch.setenv("FAKE_KEY", "k")
    captioner = Captioner({"model": {"base_url": server.url, "name": "fake-vlm", "api_key_env": "FAKE_KEY"},
                           "prompts": {"short": {"text": "Short."}, "tags": {"text": "Tags.", "schema": {"tags": "list[string]"}}},
                           "output": {"metadata": True}})
    server.reply = lambda info: '{"tags": ["a"]}' if info.text == "Tags." else "short"
    ds = datasets.Dataset.from_list(rows, features=FEATURES).cast_column("image", datasets.Image(decode=False))
    out = ds.map(captioner, batched=True, input_columns=["image"])
    assert out[0]["short"] == "short" and out[0]["tags"] == ["a"]
    for prompt in ("short", "tags"):
        assert out[0][f"{prompt}_model"] == "fake-vlm" and out[0][f"{prompt}_finish_reason"] == "stop"
        assert out[0][f"{prompt}_attempts"] == 1 and out[0][f"{prompt}_input_tokens"] > 0
    captioner.close()
