"""``run.backend: batch`` against the fake Files + Batches server: the same output as an online run,
request files within the limits, batch prices, lines failed or expired submitted once more, the
enqueued-token limit, refusals, the budget, the response cache, offline files, status and cancel."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pyarrow.parquet as pq
import pytest

from capstream.api import batch_status, cancel_batches, run
from capstream.config import load_config
from capstream.errors import BudgetReached, ConfigError, RunStopped
from capstream.testing.batch_server import FakeBatchOpenAI
from capstream.testing.openai_server import image_tokens as server_image_tokens

from conftest import (
    REPO,
    check_embedded,
    check_output,
    jpeg,
    load_out,
    make_rows,
    run_cli,
    size_of_row,
    write_config,
    write_parquet,
)

PROMPTS = {  # two prompts: free text, and a schema with its own max_tokens; {alt} makes each row's text its own
    "caption": {"text": "Describe the image. Alt text: {alt}"},
    "facts": {"text": "Facts about the image ({alt}).", "schema": {"width": "integer", "shape": "string"},
              "max_tokens": 50},
}


def reply(info) -> str:
    """The fake's answer: the image's size, as JSON for the schema prompt."""
    if (info.body or {}).get("response_format"):
        return json.dumps({"width": info.width, "shape": "square" if info.width == info.height else "oblong"})
    return f"image {info.width}x{info.height}"


def start_run(config: Path) -> subprocess.Popen:
    """``capstream run CONFIG`` in the background (stderr kept for the assertion messages)."""
    return subprocess.Popen([sys.executable, "-m", "capstream.cli", "run", str(config), "--no-progress"],
                            env={**os.environ, "FAKE_KEY": "sk-test-secret-123"}, cwd=REPO,
                            stderr=subprocess.PIPE, text=True)


def base_id(custom_id: str) -> str:
    """A request's id across the batches it went into (its attempt number dropped)."""
    return re.sub(r"-a\d+$", "", custom_id)


def shards(out: Path) -> dict[str, object]:
    return {p.name: pq.read_table(p) for p in sorted((out / "data").glob("*.parquet"))}


@pytest.fixture
def batch_server(monkeypatch):
    monkeypatch.setenv("FAKE_KEY", "sk-test-secret-123")
    with FakeBatchOpenAI(step_s=0.02, reply=reply) as server:
        yield server


@pytest.fixture
def rows_300(tmp_path):
    rows, broken = make_rows(300, broken_every=10)
    return write_parquet(tmp_path / "src.parquet", rows), rows, broken


def configs(tmp_path: Path, server, data: Path, name: str, *, prompts=None, **sections) -> Path:
    """A config for the fake server; ``run.backend`` from ``sections`` (its own response cache)."""
    run_keys = {"chunk_size": 64, "cache_dir": str(tmp_path / f"cache-{name}"), **sections.pop("run", {})}
    batch = {"poll_s": 0.02, **sections.pop("batch", {})}
    extra = {"prompts": prompts} if prompts else {"prompt": {"text": "Caption. Alt text: {alt}"}}
    return write_config(tmp_path / f"{name}.yaml", server.url, data, tmp_path / name, run=run_keys, batch=batch,
                        model={"name": "gpt-4o-mini", **sections.pop("model", {})}, **{**extra, **sections})


def test_batch_output_equals_the_online_output_shard_for_shard(batch_server, rows_300, tmp_path):
    data, rows, broken = rows_300
    online = run(load_config(configs(tmp_path, batch_server, data, "online", prompts=PROMPTS)), show_progress=False)
    asked_online = batch_server.requests
    batch = run(load_config(configs(tmp_path, batch_server, data, "batch", prompts=PROMPTS,
                                    run={"backend": "batch"}, batch={"max_requests": 30, "max_bytes": 45_000})),
                show_progress=False)
    assert shards(tmp_path / "online").keys() == shards(tmp_path / "batch").keys()
    assert len(shards(tmp_path / "batch")) == 5
    for name, table in shards(tmp_path / "online").items():
        assert shards(tmp_path / "batch")[name].equals(table), name
    # Every request was answered once through a batch: the same requests, and the same tokens.
    assert batch_server.requests - asked_online == asked_online == 2 * (300 - len(broken))
    assert batch.summary.paid_input_tokens == online.summary.paid_input_tokens > 0
    # Half the price: the table's batch price for gpt-4o-mini, named as such.
    assert batch.summary.prices == {"input_per_mtok": 0.075, "output_per_mtok": 0.3, "source": "table:2025-04-14",
                                    "batch": True}
    assert batch.summary.cost_usd == pytest.approx(online.summary.cost_usd / 2, abs=1e-6)  # summaries round to 1e-6
    assert "Batch API" in (tmp_path / "batch" / "README.md").read_text()
    # Request files within both limits, split by count and by bytes.
    uploaded = [batch_server.uploaded[b.input_file_id] for b in batch_server.batches.values()]
    assert len(uploaded) == batch_server.uploads
    cut_by = set()
    for data, following in zip(uploaded, uploaded[1:]):  # each file within both limits, and cut only when full
        assert len(data) <= 45_000 and data.count(b"\n") <= 30
        next_line = following.split(b"\n", 1)[0] + b"\n"
        cut_by |= {"count"} if data.count(b"\n") == 30 else set()
        cut_by |= {"bytes"} if len(data) + len(next_line) > 45_000 else set()
        assert data.count(b"\n") == 30 or len(data) + len(next_line) > 45_000
    assert cut_by == {"count", "bytes"}
    assert sorted(c for b in batch_server.batches.values() for c in b.custom_ids) == sorted(
        {c for b in batch_server.batches.values() for c in b.custom_ids})  # no request twice
    assert batch.summary.backend == "batch" and batch.summary.requests == 540


def test_a_batch_line_is_the_body_the_online_path_sends(batch_server, rows_300, tmp_path):
    data, rows, broken = rows_300
    sent = {}

    def recording(info):
        sent[info.text] = info.body
        return reply(info)

    batch_server.reply = recording
    run(load_config(configs(tmp_path, batch_server, data, "online", prompts=PROMPTS, image={"detail": "low"})),
        show_progress=False)
    # submit: false keeps the request files: compare every line with the request of the same row and prompt.
    with pytest.raises(RunStopped, match="wait for their results"):
        run(load_config(configs(tmp_path, batch_server, data, "files", prompts=PROMPTS, image={"detail": "low"},
                                run={"backend": "batch"}, batch={"submit": False})), show_progress=False)
    lines = [json.loads(line) for path in sorted((tmp_path / "files/.capstream/batch").glob("requests-*[0-9].jsonl"))
             for line in path.read_text().splitlines()]
    assert len(lines) == len(sent) == 540 and batch_server.uploads == 0
    for line in lines:
        assert line["method"] == "POST" and line["url"] == "/v1/chat/completions"
        text = next(p["text"] for p in line["body"]["messages"][-1]["content"] if p["type"] == "text")
        assert line["body"] == sent[text]
    assert any("response_format" in line["body"] and line["body"]["max_completion_tokens"] == 50 for line in lines)


def test_result_files_put_back_by_hand_are_read_in(batch_server, rows_300, tmp_path):
    """batch.submit: false, then a tool that runs the files (here: each body posted to the chat
    endpoint, as `vllm run-batch` would answer it) and writes its result files into results/."""
    data, rows, broken = rows_300
    config = configs(tmp_path, batch_server, data, "files", run={"backend": "batch"},
                     batch={"submit": False, "max_requests": 120})
    result = run_cli("run", str(config))
    assert result.returncode == 1 and "put the result files into" in result.stderr, result.stderr
    folder = tmp_path / "files/.capstream/batch"
    requests = sorted(folder.glob("requests-*[0-9].jsonl"))
    assert len(requests) == 3  # 270 requests, 120 per file
    answered = asyncio.run(answer_files(batch_server.url, requests))
    (folder / "results" / "part-1.jsonl").write_text("".join(answered[:200]))
    result = run_cli("run", str(config))  # one file and a half answered: the whole first file is read in
    assert result.returncode == 1 and "2 request file(s)" in result.stderr, result.stderr
    (folder / "results" / "part-2.jsonl").write_text("".join(answered[200:]))
    result = run_cli("run", str(config))
    assert result.returncode == 0, result.stderr
    check_output(tmp_path / "files", rows, broken)
    assert batch_server.uploads == 0 and not list(folder.glob("requests-*"))


async def answer_files(url: str, requests: list[Path]) -> list[str]:
    out = []
    async with aiohttp.ClientSession() as session:
        for path in requests:
            for line in path.read_text().splitlines():
                request = json.loads(line)
                async with session.post(url + "/chat/completions", json=request["body"],
                                        headers={"Authorization": "Bearer sk-test-secret-123"}) as response:
                    body = await response.json()
                    out.append(json.dumps({"id": "x", "custom_id": request["custom_id"], "error": None,
                                           "response": {"status_code": response.status, "body": body}}) + "\n")
    return out


def test_failed_and_expired_lines_go_into_one_later_batch_each(batch_server, rows_300, tmp_path):
    data, rows, broken = rows_300
    first_try = collections.Counter()

    def status_for(info):
        row = int(info.text.rsplit(" ", 1)[1])
        first_try[row] += 1
        if row % 10 == 3:
            return 400  # this row's request: an error row, never sent again
        if row % 10 == 5 and first_try[row] == 1:
            return 500  # the server's trouble: submitted again, answered then
        return None

    batch_server.status_for = status_for
    batch_server.expire_after, batch_server.expire_batches = 30, 1  # the first batch expires after 30 lines
    result = run(load_config(configs(tmp_path, batch_server, data, "out", run={"backend": "batch"},
                                     batch={"max_requests": 100})), show_progress=False)
    assert len(batch_server.expired_ids) == 70 and len(batch_server.failed_ids) == 30  # rows 5, 15, ... 295
    # Each request in one batch, and in one more for each time the server failed or expired it (a line
    # expired first and failed next went into three: within batch.max_resubmits, 2).
    in_batches = collections.Counter(base_id(c) for b in batch_server.batches.values() for c in b.custom_ids)
    troubles = collections.Counter(base_id(c) for c in [*batch_server.failed_ids, *batch_server.expired_ids])
    assert in_batches == collections.Counter({c: 1 + troubles[c] for c in in_batches})
    assert sorted(set(in_batches.values())) == [1, 2, 3]
    ds = load_out(tmp_path / "out")
    errors = {i for i, row in enumerate(ds) if row["error"]}
    assert errors == broken | {i for i in range(300) if i % 10 == 3}
    assert all(ds[i]["error"].startswith("RequestError: HTTP 400") for i in range(3, 300, 10))
    assert result.summary.errors == {"ImageError": len(broken), "RequestError": 30}


def test_lines_still_failing_after_max_resubmits_are_error_rows(batch_server, rows_300, tmp_path):
    data, rows, broken = rows_300
    batch_server.status_for = lambda info: 503 if info.text.endswith(" 7") else None
    result = run(load_config(configs(tmp_path, batch_server, data, "out", run={"backend": "batch"},
                                     batch={"max_resubmits": 1})), show_progress=False)
    assert result.summary.errors == {"ImageError": len(broken), "RequestError": 1}
    in_batches = collections.Counter(base_id(c) for b in batch_server.batches.values() for c in b.custom_ids)
    assert sorted(in_batches.values())[-1] == 2  # the first batch and one more


def test_the_enqueued_token_limit_waits_and_submits_again(batch_server, rows_300, tmp_path):
    data, rows, broken = rows_300
    batch_server.token_limit_refusals = 2
    batch_server.max_unfinished = 1  # and a batch made while another is unfinished is refused too
    run(load_config(configs(tmp_path, batch_server, data, "out", run={"backend": "batch"},
                            batch={"max_requests": 100})), show_progress=False)
    check_output(tmp_path / "out", rows, broken)
    refused = [b for b in batch_server.batches.values() if b.status == "failed"]
    assert len(refused) >= 2 and all(b.errors[0]["code"] == "token_limit_exceeded" for b in refused)
    assert batch_server.uploads == 3 and batch_server.creates == 3 + len(refused)  # a file is uploaded once
    ledger = json.loads((tmp_path / "out/.capstream/batches.json").read_text())
    assert sum(t["refusal"] == "token_limit_exceeded" for f in ledger["files"] for t in f["tries"]) == len(refused)


def test_a_batch_made_but_its_reply_lost_is_found_not_made_twice(batch_server, rows_300, tmp_path):
    """The provider made the batch and the answer was lost (a 500): the next attempt finds it by its
    metadata instead of paying for the same requests twice."""
    data, rows, broken = rows_300
    batch_server.lose_create_replies = 2
    run(load_config(configs(tmp_path, batch_server, data, "out", run={"backend": "batch"},
                            batch={"max_requests": 100})), show_progress=False)
    check_output(tmp_path / "out", rows, broken)
    assert batch_server.uploads == batch_server.creates == len(batch_server.batches) == 3
    assert max(collections.Counter(c for b in batch_server.batches.values() for c in b.custom_ids).values()) == 1


def test_a_line_refused_for_the_key_stops_the_run_after_its_file_is_collected(batch_server, rows_300, tmp_path):
    """A 401 line would refuse every line: the run stops with one message, but only once every other
    answer of the file is logged, and the rerun submits the refused lines alone."""
    data, rows, broken = rows_300
    batch_server.status_for = lambda info: 401 if int(info.text.rsplit(" ", 1)[1]) % 50 == 1 else None
    config = configs(tmp_path, batch_server, data, "out", run={"backend": "batch"})
    with pytest.raises(RunStopped, match="refused model .* in a batch: .*HTTP 401"):
        run(load_config(config), show_progress=False)
    batch_server.status_for = None
    run(load_config(config), show_progress=False)
    check_output(tmp_path / "out", rows, broken)
    batches = list(batch_server.batches.values())
    assert len(batches) == 2

    def row_of(custom_id: str) -> int:  # r<round>-c<chunk>-o<offset>-...: chunks of 64 rows
        chunk, offset = re.match(r"r\d+-c(\d+)-o(\d+)-", custom_id).groups()
        return 64 * int(chunk) + int(offset)

    assert sorted(row_of(c) for c in batches[1].custom_ids) == [i for i in range(1, 300, 50) if i not in broken]


def test_a_batch_refused_for_another_reason_stops_the_run_with_one_message(batch_server, rows_300, tmp_path):
    data, rows, broken = rows_300
    batch_server.refuse_code = "invalid_model"
    config = configs(tmp_path, batch_server, data, "out", run={"backend": "batch"})
    result = run_cli("run", str(config))
    assert result.returncode == 1
    assert result.stderr.count("refused batch") == 1 and "invalid_model" in result.stderr, result.stderr
    assert "sk-test-secret-123" not in result.stderr
    result = run_cli("run", str(config))  # the provider takes it now: the same file, a new batch
    assert result.returncode == 0, result.stderr
    check_output(tmp_path / "out", rows, broken)
    assert batch_server.uploads == 1 and batch_server.creates == 2


def test_the_budget_is_checked_before_each_batch(batch_server, rows_300, tmp_path):
    """At $1 per million tokens a file of 100 requests is expected to cost about $0.058 (its output at
    the cap) and costs about $0.027: with $0.08, the second file would go past the budget, even once
    the first is paid."""
    data, rows, broken = rows_300
    config = configs(tmp_path, batch_server, data, "out", run={"backend": "batch", "max_cost_usd": 0.08},
                     batch={"max_requests": 100},
                     model={"name": "fake-vlm", "price_input_per_mtok": 1.0, "price_output_per_mtok": 1.0})
    with pytest.raises(BudgetReached, match="requests-000002.jsonl .* was not submitted") as stopped:
        run(load_config(config), show_progress=False)
    assert batch_server.creates == 1 and 0.02 < stopped.value.summary.cost_usd < 0.08
    assert stopped.value.summary.rows == 64  # the chunk the first file answered whole is written
    # --retry-errors before the round is over would find rows without answers: refused, nothing changed.
    with pytest.raises(ConfigError, match="not finished .* without --retry-errors to collect its batches first"):
        run(load_config(config, overrides=["run.max_cost_usd=1"]), retry_errors=True, show_progress=False)
    run(load_config(config, overrides=["run.max_cost_usd=1"]), show_progress=False)
    check_output(tmp_path / "out", rows, broken)
    assert batch_server.creates == 3  # the files held back went, none twice
    run(load_config(config, overrides=["run.max_cost_usd=1"]), retry_errors=True, show_progress=False)
    assert batch_server.creates == 3  # the round is over: only the broken images are errors, nothing to ask


def test_a_finished_run_uploads_nothing_and_retry_errors_submits_only_the_error_rows(batch_server, rows_300, tmp_path):
    data, rows, broken = rows_300
    batch_server.status_for = lambda info: 400 if int(info.text.rsplit(" ", 1)[1]) % 25 == 0 else None
    config = configs(tmp_path, batch_server, data, "out", run={"backend": "batch"})
    run(load_config(config), show_progress=False)
    assert batch_server.uploads == 1
    run(load_config(config), show_progress=False)
    assert batch_server.uploads == 1  # nothing to do: nothing read, nothing uploaded
    batch_server.status_for = None
    run(load_config(config), retry_errors=True, show_progress=False)
    retried = batch_server.lines_of(list(batch_server.batches.values())[-1].input_file_id)
    assert batch_server.uploads == 2
    assert sorted(int(line["body"]["messages"][-1]["content"][0]["text"].rsplit(" ", 1)[1]) for line in retried) == [
        i for i in range(0, 300, 25) if i not in broken]
    check_output(tmp_path / "out", rows, broken)


def test_the_response_cache_answers_first_and_identical_requests_are_one_line(batch_server, tmp_path):
    rows, broken = make_rows(80)
    for row in rows[40:]:
        row["image"], row["alt"] = rows[row["id"] - 40]["image"], rows[row["id"] - 40]["alt"]  # 40 pairs
    data = write_parquet(tmp_path / "src.parquet", rows)
    run(load_config(configs(tmp_path, batch_server, data, "first",
                            run={"backend": "batch", "cache_dir": str(tmp_path / "c")})), show_progress=False)
    assert batch_server.requests == 40  # one line per pair
    second = run(load_config(configs(tmp_path, batch_server, data, "second",
                                     run={"backend": "batch", "cache_dir": str(tmp_path / "c")})), show_progress=False)
    assert batch_server.uploads == 1 and second.summary.reused == {"cache": 80}
    assert shards(tmp_path / "first").keys() == shards(tmp_path / "second").keys()
    for name, table in shards(tmp_path / "first").items():
        assert shards(tmp_path / "second")[name].equals(table)


def test_status_and_cancel(batch_server, rows_300, tmp_path):
    data, rows, broken = rows_300
    config = configs(tmp_path, batch_server, data, "out", run={"backend": "batch"}, batch={"max_requests": 100})
    batch_server.hold.add("progress")  # the batches stay in progress until the test lets them go
    proc = start_run(config)
    try:
        deadline = time.time() + 60
        while batch_server.creates < 3 and time.time() < deadline:
            time.sleep(0.05)
        assert batch_server.creates == 3
        status = run_cli("status", str(tmp_path / "out"))
        assert status.returncode == 0 and status.stdout.count("  in_progress (0 done") == 3, status.stdout
        assert status.stdout.splitlines()[-1] == "3 request file(s): 3 in_progress"
        cancel = run_cli("cancel", str(tmp_path / "out"))
        assert cancel.returncode == 0 and cancel.stdout.count("cancelled batch_") == 3, cancel.stdout
        batch_server.hold.discard("progress")
        assert proc.wait(60) == 0, proc.communicate()[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    # The cancelled lines went into new batches; the output is whole.
    assert {b.status for b in list(batch_server.batches.values())[:3]} == {"cancelled"}
    check_output(tmp_path / "out", rows, broken)
    assert [f.state for f in batch_status(tmp_path / "out")] == ["collected"] * len(batch_status(tmp_path / "out"))


def test_another_backend_or_overwrite_refuses_a_folder_with_batches_in_flight(batch_server, rows_300, tmp_path):
    data, rows, broken = rows_300
    config = configs(tmp_path, batch_server, data, "out", run={"backend": "batch"})
    batch_server.hold.add("progress")
    proc = start_run(config)
    try:
        while batch_server.creates < 1:
            time.sleep(0.05)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)  # Ctrl-C: the batch stays at the provider
        assert proc.wait(30) == 130, proc.communicate()[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    with pytest.raises(ConfigError, match="not collected yet"):
        run(load_config(config, overrides=["run.backend=local"]), show_progress=False)
    with pytest.raises(ConfigError, match="capstream cancel"):
        run(load_config(config), overwrite=True, show_progress=False)
    assert cancel_batches(tmp_path / "out") and batch_server.creates == 1


def test_an_answer_not_matching_the_schema_is_asked_again_in_a_later_batch(batch_server, rows_300, tmp_path):
    data, rows, broken = rows_300
    asked = collections.Counter()

    def sloppy(info):
        asked[info.text] += 1
        if info.text.endswith("row 4).") and asked[info.text] == 1:
            return "not JSON at all"  # the first answer of row 4's facts
        if info.text.endswith("row 6)."):
            return "never JSON"  # row 6's facts: never right
        return reply(info)

    batch_server.reply = sloppy
    out = tmp_path / "out"
    result = run(load_config(configs(tmp_path, batch_server, data, "out", prompts=PROMPTS, run={"backend": "batch"},
                                     retry={"invalid_answer_attempts": 2})), show_progress=False)
    ds = load_out(out)
    assert ds[4]["width"] == 68 and ds[4]["error"] is None
    assert ds[6]["width"] is None and ds[6]["error"].startswith("facts: InvalidAnswer: not valid JSON")
    assert asked["Facts about the image (row 4)."] == 2 and asked["Facts about the image (row 6)."] == 2
    assert result.summary.errors == {"ImageError": len(broken), "InvalidAnswer": 1}
    # Both requests of row 4 are paid, and counted in its answer, as online.
    log = [json.loads(line) for line in (out / ".capstream/results.jsonl").read_text().splitlines()]
    [row4] = [r for r in log if r["k"] == 4 and r["p"] == "facts"]
    one_request = len("Facts about the image (row 4).") // 4 + 4 + server_image_tokens(*size_of_row(4), "auto")
    assert row4["ti"] == 2 * one_request and row4["n"] == 2  # n: the batches it took
    assert result.summary.paid_input_tokens == batch_server.prompt_tokens_total


@pytest.mark.parametrize("streaming", [False, True])
def test_rows_by_key_and_a_streamed_dataset(batch_server, rows_300, tmp_path, streaming):
    data, rows, broken = rows_300
    config = configs(tmp_path, batch_server, data, "out", run={"backend": "batch"}, batch={"max_requests": 70},
                     dataset={"key_column": "id", "streaming": streaming})
    run(load_config(config), show_progress=False)
    check_output(tmp_path / "out", rows, broken)
    log = [json.loads(line) for line in (tmp_path / "out/.capstream/results.jsonl").read_text().splitlines()]
    assert sorted(r["k"] for r in log) == list(range(300))  # each row's key, as dataset.key_column has it
    assert batch_server.creates == 4


def test_a_streamed_input_is_read_twice_whatever_the_number_of_batches(batch_server, rows_300, tmp_path,
                                                                      monkeypatch):
    """Planning reads the input once, writing once more, in order: not again from the start for every
    group of chunks whose answers came in (a streamed dataset would be read once per chunk)."""
    from capstream.io.source import Source

    data, rows, broken = rows_300
    passes, rows_read = [], []
    chunks = Source.chunks

    def counted(self, chunk_size, skip=frozenset()):
        passes.append(sorted(skip))
        for chunk in chunks(self, chunk_size, skip):
            rows_read.append(len(chunk))
            yield chunk

    monkeypatch.setattr(Source, "chunks", counted)
    asked = collections.Counter()

    def status_for(info):  # rows 5, 105, 205 fail their first time: answered in a later batch
        asked[info.text] += 1
        return 500 if int(info.text.rsplit(" ", 1)[1]) % 100 == 5 and asked[info.text] == 1 else None

    batch_server.status_for = status_for
    config = configs(tmp_path, batch_server, data, "out", run={"backend": "batch", "chunk_size": 32},
                     batch={"max_requests": 25}, dataset={"streaming": True})
    run(load_config(config), show_progress=False)
    check_output(tmp_path / "out", rows, broken)
    assert batch_server.creates > 10  # many groups of chunks answered at different times
    assert len(passes) == 2 and sum(rows_read) == 2 * 300


def test_estimate_prices_for_batch(batch_server, rows_300, tmp_path):
    data, rows, broken = rows_300
    online = configs(tmp_path, batch_server, data, "online")
    batch = configs(tmp_path, batch_server, data, "batch", run={"backend": "batch"})
    estimates = [json.loads(run_cli("estimate", str(c), "--json").stdout) for c in (online, batch)]
    assert estimates[0]["priced_for_batch"] is False and estimates[1]["priced_for_batch"] is True
    assert estimates[1]["cost_usd"] == pytest.approx(estimates[0]["cost_usd"] / 2)
    text = run_cli("estimate", str(batch)).stdout
    assert "Batch API price of 2025-04-14" in text and "priced for run.backend batch" in text


def test_batches_are_looked_at_less_often_while_nothing_changes(batch_server, rows_300, tmp_path):
    """poll_s 0.05: a batch held in progress for 4 s is looked at after 0.05, 0.075, 0.11 ... s, then
    every 1 s (20 x poll_s): about 10 times, where a fixed interval would look 80 times."""
    data, rows, broken = rows_300
    batch_server.hold.add("progress")
    proc = start_run(configs(tmp_path, batch_server, data, "out", run={"backend": "batch"},
                             batch={"poll_s": 0.05}))
    try:
        deadline = time.time() + 60
        while batch_server.creates < 1 and time.time() < deadline:
            time.sleep(0.01)
        first = batch_server.retrieves
        time.sleep(4)
        looks = batch_server.retrieves - first
        batch_server.hold.discard("progress")
        assert proc.wait(60) == 0, proc.communicate()[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert 5 <= looks <= 20, looks


def test_image_urls_in_a_batch_run_are_downloaded_and_embedded(batch_server, tmp_path):
    """URL rows go through the same downloads as online (404 an error row, never in a request file);
    the answers come back later, so ``output.embed_images`` downloads each image again for its shard."""
    import datasets

    from capstream.testing.image_host import FakeImageHost

    with FakeImageHost() as host:
        images = {i: jpeg(*size_of_row(i), colour=(i % 256, 60, 120)) for i in range(40)}
        host.images.update({f"/img/{i}.jpg": data for i, data in images.items()})
        host.missing.add("/img/7.jpg")
        features = datasets.Features({"id": datasets.Value("int64"), "url": datasets.Value("string"),
                                      "alt": datasets.Value("string")})
        data = tmp_path / "urls.parquet"
        datasets.Dataset.from_dict({"id": list(images), "url": [host.url(f"/img/{i}.jpg") for i in images],
                                    "alt": [f"alt {i}" for i in images]}, features=features).to_parquet(str(data))
        config = configs(tmp_path, batch_server, data, "batch", run={"backend": "batch"},
                         dataset={"path": "parquet", "data_files": str(data), "image_column": "url"},
                         image={"allow_private_urls": True}, output={"dir": str(tmp_path / "batch"),
                                                                      "embed_images": True})
        result = run(load_config(config), show_progress=False)
        requests = dict(host.requests)
    assert result.summary.complete and batch_server.requests == 39
    assert requests == {f"/img/{i}.jpg": 1 if i == 7 else 2 for i in images}  # planned, then embedded
    check_embedded(tmp_path / "batch", images, 7, lambda i: "image {}x{}".format(*size_of_row(i)))
