"""Structured outputs (prompt.schema), several prompts per image (prompts:) and {column} templates, through real runs."""

from __future__ import annotations

import json

import datasets
from pydantic import BaseModel

from capstream import caption_dataset

from conftest import (
    load_out,
    make_rows,
    run_cli,
    size_of_row,
    write_config,
    write_parquet,
)

# -- unit: schemas, templates ----------------------------------------------------------------------

def _size(info) -> str:
    return f"{info.width}x{info.height}"


def _structured_reply(info) -> str:
    w, h = info.width, info.height
    return json.dumps({"caption": f"image {w}x{h}", "tags": [f"w{w}", f"h{h}"], "people": w % 5})


def test_schema_gives_typed_columns(server, tmp_path):
    rows, broken = make_rows(60, broken_every=20)
    data = write_parquet(tmp_path / "d.parquet", rows)
    server.reply = _structured_reply
    config = write_config(tmp_path / "c.yaml", server.url, data, tmp_path / "out", run={"chunk_size": 25},
                          prompt={"text": "Describe.", "schema": {"caption": "string", "tags": "list[string]",
                                                                   "people": "integer"}})
    result = run_cli("run", str(config))
    assert result.returncode == 0, result.stderr
    ds = load_out(tmp_path / "out")
    assert ds.features["people"] == datasets.Value("int64")
    assert ds.features["tags"] == datasets.List(datasets.Value("string"))
    assert ds.features["caption"] == datasets.Value("string")
    for i, row in enumerate(ds):
        if i in broken:
            assert row["error"].startswith("ImageError") and row["people"] is None and row["tags"] is None
            continue
        w, h = size_of_row(i)
        assert row == {**row, "caption": f"image {w}x{h}", "tags": [f"w{w}", f"h{h}"], "people": w % 5, "error": None}
    assert server.requests == 60 - len(broken)
    sent = server.stats()
    assert sent["requests"] == 60 - len(broken)


def test_schema_request_uses_structured_outputs(server, tmp_path):
    rows, _ = make_rows(3)
    data = write_parquet(tmp_path / "d.parquet", rows)
    seen = []

    def reply(info):
        seen.append(info.body["response_format"])
        return _structured_reply(info)

    server.reply = reply
    config = write_config(tmp_path / "c.yaml", server.url, data, tmp_path / "out",
                          prompt={"text": "Describe.", "schema": {"caption": "string", "tags": "list[string]",
                                                                   "people": "integer"}})
    assert run_cli("run", str(config)).returncode == 0
    fmt = seen[0]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["strict"] is True
    assert sorted(fmt["json_schema"]["schema"]["required"]) == ["caption", "people", "tags"]


def test_schema_violations_are_retried_then_kept_in_the_error(server, tmp_path):
    rows, _ = make_rows(30)
    data = write_parquet(tmp_path / "d.parquet", rows)
    never_valid = {size_of_row(i) for i in (4, 17)}
    calls: dict[tuple, int] = {}

    def reply(info):
        size = (info.width, info.height)
        calls[size] = calls.get(size, 0) + 1
        if size in never_valid:
            return '{"caption": "half an answer"'  # cut-off JSON, every time
        if size == size_of_row(9) and calls[size] == 1:
            return json.dumps({"caption": "no tags", "people": "several"})  # wrong shape, once
        return _structured_reply(info)

    server.reply = reply
    config = write_config(tmp_path / "c.yaml", server.url, data, tmp_path / "out",
                          prompt={"text": "Describe.", "schema": {"caption": "string", "tags": "list[string]",
                                                                   "people": "integer"}},
                          retry={"invalid_answer_attempts": 3})
    result = run_cli("run", str(config))
    assert result.returncode == 0, result.stderr
    ds = load_out(tmp_path / "out")
    for i in (4, 17):
        assert ds[i]["error"].startswith("InvalidAnswer: not valid JSON"), ds[i]["error"]
        assert '{"caption": "half an answer"' in ds[i]["error"]  # the raw answer is kept
        assert ds[i]["caption"] is None
        assert calls[size_of_row(i)] == 3
    assert ds[9]["error"] is None and ds[9]["people"] == size_of_row(9)[0] % 5
    assert server.requests == 30 + 2 * 2 + 1
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["errors"] == {"InvalidAnswer": 2}


def _two_prompts_reply(info):
    kind = "short" if info.text.startswith("Short") else "long"
    return f"{kind} {_size(info)}"


def test_two_prompts_fill_two_columns(server, tmp_path):
    rows, broken = make_rows(50, broken_every=25)
    data = write_parquet(tmp_path / "d.parquet", rows)
    server.reply = _two_prompts_reply
    config = write_config(tmp_path / "c.yaml", server.url, data, tmp_path / "out", run={"chunk_size": 20},
                          prompts={"short_caption": {"text": "Short caption."},
                                   "long_caption": {"text": "Long caption.", "max_tokens": 500}})
    result = run_cli("run", str(config))
    assert result.returncode == 0, result.stderr
    assert server.requests == 2 * (50 - len(broken))
    ds = load_out(tmp_path / "out")
    assert "caption" not in ds.column_names
    for i, row in enumerate(ds):
        if i in broken:
            assert row["short_caption"] is None and row["error"].startswith("ImageError: ")
            continue
        w, h = size_of_row(i)
        assert (row["short_caption"], row["long_caption"], row["error"]) == (f"short {w}x{h}", f"long {w}x{h}", None)


def test_one_prompt_fails_while_the_other_succeeds_then_retry_errors(server, tmp_path):
    rows, _ = make_rows(40)
    data = write_parquet(tmp_path / "d.parquet", rows)
    refused = {size_of_row(i) for i in (5, 21)}
    server.reply = _two_prompts_reply
    server.status_for = lambda info: 400 if info.text.startswith("Long") and (info.width, info.height) in refused else None
    config = write_config(tmp_path / "c.yaml", server.url, data, tmp_path / "out", run={"chunk_size": 20},
                          prompts={"short_caption": {"text": "Short caption."}, "long_caption": {"text": "Long caption."}})
    assert run_cli("run", str(config)).returncode == 0
    ds = load_out(tmp_path / "out")
    for i in (5, 21):
        w, h = size_of_row(i)
        assert ds[i]["short_caption"] == f"short {w}x{h}" and ds[i]["long_caption"] is None
        assert ds[i]["error"].startswith("long_caption: RequestError: HTTP 400"), ds[i]["error"]
    server.reset_counters()
    server.status_for = None
    result = run_cli("run", str(config), "--retry-errors")
    assert result.returncode == 0, result.stderr
    assert server.requests == 2  # only the failed prompt of the failed rows
    ds = load_out(tmp_path / "out")
    assert all(row["error"] is None for row in ds)
    assert ds[21]["long_caption"] == "long {}x{}".format(*size_of_row(21))


def test_template_fills_columns_and_a_missing_column_is_a_config_error(server, tmp_path):
    rows, _ = make_rows(10)
    data = write_parquet(tmp_path / "d.parquet", rows)
    server.reply = lambda info: info.text
    config = write_config(tmp_path / "c.yaml", server.url, data, tmp_path / "out",
                          prompt={"text": "Recaption. Alt text: {alt}. Keep {{braces}}."})
    assert run_cli("run", str(config)).returncode == 0
    ds = load_out(tmp_path / "out")
    assert [r["caption"] for r in ds] == [f"Recaption. Alt text: row {i}. Keep {{braces}}." for i in range(10)]

    server.reset_counters()
    bad = write_config(tmp_path / "bad.yaml", server.url, data, tmp_path / "out2", prompt={"text": "Title: {title}"})
    result = run_cli("run", str(bad))
    assert result.returncode == 2
    assert "placeholder {title} names no column" in result.stderr and "alt" in result.stderr
    assert server.requests == 0 and not (tmp_path / "out2" / "data").exists()


def test_pydantic_schema_from_python(server, tmp_path):
    class Answer(BaseModel):
        caption: str
        people: int

    rows, _ = make_rows(8)
    ds = datasets.Dataset.from_list(rows).cast_column("image", datasets.Image())
    server.reply = lambda info: json.dumps({"caption": _size(info), "people": 1})
    config = {"model": {"provider": "openai", "name": "fake-vlm", "base_url": server.url, "api_key_env": None},
              "prompt": {"text": "Describe.", "schema": Answer}, "output": {"dir": str(tmp_path / "out")}}
    out = caption_dataset(ds, config=config, show_progress=False)
    assert out.features["people"] == datasets.Value("int64")
    assert [r["caption"] for r in out] == ["{}x{}".format(*size_of_row(i)) for i in range(8)]
    saved = json.loads((tmp_path / "out" / ".capstream" / "config.json").read_text())
    assert saved["prompt"]["schema"]["pydantic_model"] == "Answer"
