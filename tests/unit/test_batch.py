"""The batch backend's parts on their own: the ledger and its request files, result lines, batch
prices, the ``batch`` config section, the bodies and answers LangChain builds and reads."""

from __future__ import annotations

import json

import pytest

from capstream.config import config_from_dict
from capstream.cost.meter import Prices
from capstream.cost.pricing import PRICES, prices
from capstream.errors import ConfigError, RunStopped
from capstream.io.batch_ledger import (
    BatchLedger,
    BatchTry,
    Follower,
    IndexEntry,
    RequestWriter,
    read_index,
    request_lines,
)
from capstream.io.layout import OutputLayout
from capstream.model.batch_api import BatchState, ResultLine, request_line
from capstream.model.call import answer_of
from capstream.model.chat_models import build_chat_model, build_messages, request_body, response_message
from capstream.model.settings import ModelConfig


def entry(chunk: int, offset: int, prompt: int = 0, **kw) -> IndexEntry:
    return IndexEntry(1, chunk, offset, prompt, f"ck-{chunk}-{offset}-{prompt}", **kw)


def line_of(e: IndexEntry, size: int) -> bytes:
    return request_line(e.custom_id, "/v1/chat/completions", json.dumps({"pad": "x" * size}).encode())


# -- the ledger and the request files ---------------------------------------------------------------


def test_request_files_are_cut_by_count_and_by_bytes(tmp_path):
    ledger = BatchLedger.open(OutputLayout(tmp_path, "train"))
    recorded = []
    writer = RequestWriter(ledger, max_requests=3, max_bytes=1_000, on_file=recorded.append)
    sizes = [100, 100, 100, 100, 600, 600, 50]  # 3 | 100 + 600 | 600 + 50
    for i, size in enumerate(sizes):
        writer.add(entry(0, i), line_of(entry(0, i), size), (10, 5), position=(0, i, 0))
    writer.finish()
    files = [(r.name, r.requests) for r in recorded]
    assert files == [("requests-000001.jsonl", 3), ("requests-000002.jsonl", 2), ("requests-000003.jsonl", 2)]
    for record in recorded:
        data = (tmp_path / ".capstream/batch" / record.name).read_bytes()
        assert len(data) == record.bytes <= 1_000 and data.count(b"\n") == record.requests <= 3
        assert record.tokens == (10 * record.requests, 5 * record.requests)
        lines = [json.loads(line) for line in data.splitlines()]
        assert [line["custom_id"] for line in lines] == list(read_index(ledger.index_path(record)))
    assert ledger.planned_through == (0, 6, 0)
    with pytest.raises(RunStopped, match="more than batch.max_bytes"):
        writer.add(entry(1, 0), line_of(entry(1, 0), 2_000), (1, 1))


def test_the_ledger_is_read_back_and_a_kill_leaves_no_stray_file(tmp_path):
    layout = OutputLayout(tmp_path, "train")
    ledger = BatchLedger.open(layout)
    ledger.start_round()
    writer = RequestWriter(ledger, max_requests=10, max_bytes=10_000)
    writer.add(entry(0, 0), line_of(entry(0, 0), 10), (1, 1), position=(0, 0, 0))
    assert writer.follow("ck-0-0-0", Follower(0, 5, 0), (0, 5, 0))  # the same request: no second line
    record = writer.finish()
    record.uploaded("file-1", 1.0)
    record.creating(2.0)
    record.created(BatchTry("batch_1", 3.0))
    ledger.save()
    writer.add(entry(1, 0), line_of(entry(1, 0), 10), (1, 1), position=(1, 0, 0))  # being written at the "kill"
    stray = layout.request_file(7)
    stray.write_text("{}\n")
    again = BatchLedger.open(layout)
    assert [f.name for f in again.files] == ["requests-000001.jsonl"] and again.run_id == ledger.run_id
    assert again.files[0].batch.id == "batch_1" and again.files[0].state == "validating"
    assert again.planned_through == (0, 5, 0) and again.round == 1
    assert sorted(p.name for p in layout.batch_dir.iterdir() if p.is_file()) == [
        "requests-000001.index.jsonl", "requests-000001.jsonl"]
    [indexed] = read_index(again.index_path(again.files[0])).values()
    assert [row[:2] for row in indexed.rows()] == [(0, 0), (0, 5)]
    assert again.touched_chunks() == {0}
    again.settle(again.files[0], {"answered": 2}, [])
    again.remove_files_of(again.files[0])
    assert not again.open_files and not list(layout.batch_dir.glob("requests-*"))


def test_an_entry_asked_again_keeps_what_it_paid_and_counts_its_attempts():
    first = entry(3, 7, 2, row_key="img-7")
    assert first.custom_id == "r1-c3-o7-p2-a0"
    later = first.again(invalid=True, paid=(100, 20)).again(invalid=False, paid=(0, 0))
    assert later.custom_id == "r1-c3-o7-p2-a2" and later.invalid == 1 and later.paid == (100, 20)
    assert IndexEntry.from_json(json.loads(later.to_line())) == later


def test_request_lines_are_found_by_custom_id(tmp_path):
    path = tmp_path / "requests.jsonl"
    path.write_bytes(b"".join(line_of(entry(0, i), 30) for i in range(5)))
    assert [cid for cid, _ in request_lines(path, {"r1-c0-o1-p0-a0", "r1-c0-o4-p0-a0"})] == [
        "r1-c0-o1-p0-a0", "r1-c0-o4-p0-a0"]


# -- result lines and batch states ------------------------------------------------------------------


def test_result_lines_of_every_kind():
    ok = ResultLine.parse(json.dumps({"id": "b1", "custom_id": "a", "error": None,
                                      "response": {"status_code": 200, "body": {"choices": []}}}))
    assert (ok.status, ok.body, ok.error_code) == (200, {"choices": []}, None)
    refused = ResultLine.parse(json.dumps({"custom_id": "b", "response": {
        "status_code": 400, "body": {"error": {"code": "invalid_image", "message": "bad image"}}}, "error": None}))
    assert (refused.status, refused.error_code, refused.error_message) == (400, "invalid_image", "bad image")
    expired = ResultLine.parse(json.dumps({"custom_id": "c", "response": None,
                                           "error": {"code": "batch_expired", "message": "not run"}}))
    assert (expired.status, expired.error_code) == (None, "batch_expired")
    assert ResultLine.parse(b'{"custom_id": "d", "resp') is None and ResultLine.parse(b"[1]") is None


def test_a_batch_refused_for_the_token_limit_says_so():
    class Errors:
        data = [type("E", (), {"code": "token_limit_exceeded", "message": "Enqueued token limit reached"})()]

    batch = type("B", (), {"id": "b", "status": "failed", "created_at": 1, "output_file_id": None,
                           "error_file_id": None, "request_counts": None, "metadata": {}, "errors": Errors()})()
    state = BatchState.of(batch)
    assert state.done and state.refusal == "token_limit_exceeded"
    assert "Enqueued token limit" in state.refusal_text()
    assert BatchState.refused("token_limit_exceeded", "x").refusal == "token_limit_exceeded"


# -- prices and the config ---------------------------------------------------------------------------


def test_batch_prices_are_half_the_list_prices():
    for name, billing in PRICES.items():
        assert billing.batch_input_per_mtok == pytest.approx(billing.input_per_mtok / 2), name
        assert billing.batch_output_per_mtok == pytest.approx(billing.output_per_mtok / 2), name
    model = ModelConfig(name="gpt-4o-2024-08-06")
    assert prices(model, batch=True) == (1.25, 5.0, "table:2025-04-14")
    assert Prices.of(model, batch=True).as_dict()["batch"] is True and "batch" not in Prices.of(model).as_dict()
    given = ModelConfig(name="gpt-4o", price_input_per_mtok=0.5, price_output_per_mtok=1.0)
    assert prices(given, batch=True) == (0.5, 1.0, "config")  # a price in the config is what is paid


def test_the_batch_section_is_checked():
    config = config_from_dict({"run": {"backend": "batch"}, "batch": {"max_requests": 1000}})
    assert (config.batch.max_requests, config.batch.max_bytes, config.batch.completion_window) == (1000, 190_000_000,
                                                                                                  "24h")
    for bad, key in [({"completion_window": "1 day"}, "batch.completion_window"), ({"max_requests": 0}, "max_requests"),
                     ({"poll_s": 0}, "poll_s"), ({"surprise": 1}, "unknown key 'batch.surprise'")]:
        with pytest.raises(ConfigError, match=key):
            config_from_dict({"batch": bad})
    with pytest.raises(ConfigError, match="run.backend: batch .*'mock' has none"):
        config_from_dict({"run": {"backend": "batch"}, "model": {"provider": "mock"}})
    assert "batch.max_requests" not in config.fingerprint()  # how answers are bought, not what they are


# -- bodies and answers, built and read by LangChain -------------------------------------------------


def test_a_body_and_an_answer_round_trip_through_the_chat_model(monkeypatch):
    monkeypatch.setenv("K", "sk-x")
    llm = build_chat_model(ModelConfig(name="gpt-4o-mini", base_url="http://127.0.0.1:9/v1", api_key_env="K",
                                       temperature=0.3))
    body = request_body(llm, build_messages("Caption.", "Be brief.", "data:image/jpeg;base64,AAAA", "low"),
                        {"max_tokens": 20})
    assert body["model"] == "gpt-4o-mini" and body["temperature"] == 0.3 and body["max_completion_tokens"] == 20
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    reply = {"id": "c", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini-2024-07-18",
             "choices": [{"index": 0, "finish_reason": "length",
                          "message": {"role": "assistant", "content": " a cat "}}],
             "usage": {"prompt_tokens": 120, "completion_tokens": 20, "total_tokens": 140}}
    answer = answer_of(response_message(llm, reply))
    assert (answer.text, answer.input_tokens, answer.output_tokens, answer.finish_reason, answer.model) == (
        "a cat", 120, 20, "length", "gpt-4o-mini-2024-07-18")
