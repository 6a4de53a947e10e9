"""The results log: a cut last line is repaired, sealed segments are read only while needed."""

from __future__ import annotations

import json
import time

from capstream.io.layout import OutputLayout
from capstream.io.results_log import LogRecord, ResultsLog, records
from capstream.io.store import RunStore
from capstream.row.results import PromptAnswer


def test_a_half_written_last_line_is_cut_and_earlier_answers_kept(tmp_path):
    store = RunStore(OutputLayout(tmp_path / "out", "train"))
    store.open({"x": 1}, 10)
    good = b'{"i": 0, "k": 0, "c": "short", "e": null, "ti": 1, "to": 1}\n'
    # The cut-off line is longer than one 64 KiB block read back from the end.
    store.log.path.write_bytes(good + b'{"i": 0, "k": 1, "c": "' + b"a" * 70000)
    RunStore(OutputLayout(tmp_path / "out", "train")).open({"x": 1}, 10)
    assert store.log.path.read_bytes() == good
    store.log.path.write_bytes(b'{"i": 0, "k": 1, "c": "half, no newline at all')
    RunStore(OutputLayout(tmp_path / "out", "train")).open({"x": 1}, 10)
    assert store.log.path.read_bytes() == b""


def _log_rows(store, chunks, rows_per_chunk=3):
    from capstream.row.results import PromptAnswer

    for chunk in chunks:
        for row in range(rows_per_chunk):
            key = chunk * rows_per_chunk + row
            store.log_answer(LogRecord.of(chunk, key, "caption", PromptAnswer(f"caption {key}", None, 10, 2)))


def test_sealed_log_segments_are_not_read_once_their_chunks_are_done(tmp_path, monkeypatch):
    """The results log is sealed into segments, each with a summary written last; a rerun reads no
    segment whose chunks are all done, and still counts every token paid."""
    monkeypatch.setattr(ResultsLog, "segment_bytes", 300)  # a segment holds about four answers
    for chunks in (range(3), range(3, 6)):  # two runs: the second appends to the first's open segment
        store = RunStore(OutputLayout(tmp_path / "out", "train"))
        store.open({"x": 1}, 3)
        _log_rows(store, chunks)
        store.close()
    state = tmp_path / "out" / ".capstream"
    segments = sorted(state.glob("results.0*.jsonl"))
    assert len(segments) >= 3 and all((state / (p.name + ".summary.json")).exists() for p in segments)
    summaries = {p: json.loads((state / (p.name + ".summary.json")).read_text()) for p in segments}
    active = list(records(store.log.path)) if store.log.path.exists() else []
    assert sum(s["paid"][0] for s in summaries.values()) + sum(r.input_tokens for r in active) == 18 * 10

    def resume(done):
        again = RunStore(OutputLayout(tmp_path / "out", "train"))
        again.open({"x": 1}, 3)
        found = again.logged_answers(done).answers
        return {key: by_prompt["caption"].value for key, by_prompt in found.items()}, again.paid_tokens()

    expected = {key: f"caption {key}" for key in range(9, 18)}  # chunks 3, 4, 5
    assert resume({0, 1, 2}) == (expected, (180, 36))
    # A segment of done chunks only is not read: emptying one changes nothing.
    done_only = next(p for p, s in summaries.items() if set(s["chunks"]) <= {0, 1, 2})
    done_only.write_bytes(b"")
    assert resume({0, 1, 2}) == (expected, (180, 36))
    # A segment whose summary is missing (killed between the rename and the summary) is read whole.
    needed = next(p for p, s in summaries.items() if set(s["chunks"]) & {3, 4, 5})
    (state / (needed.name + ".summary.json")).unlink()
    assert resume({0, 1, 2}) == (expected, (180, 36))


def test_a_record_keeps_its_provenance_and_old_lines_still_read():
    import json

    from capstream.row.results import Provenance

    bought = Provenance("m1", "stop", 840, 2, 1764600000.5, 120, 4)
    answer = PromptAnswer("a cat", None, 120, 4, provenance=bought)
    before = time.time()
    line = LogRecord.of(3, "k", "caption", answer).to_line()
    data = json.loads(line)
    assert before - 0.01 <= data.pop("w") <= time.time() + 0.01  # when it was logged (every record has it)
    # The tokens its purchase counted are those the line paid: not written twice.
    assert data == {"i": 3, "k": "k", "p": "caption", "v": "a cat", "e": None, "ti": 120, "to": 4,
                    "m": "m1", "f": "stop", "ms": 840, "n": 2, "t": 1764600000.5}
    again = LogRecord.from_json(json.loads(line)).answer()
    assert again.provenance == answer.provenance and again.source == "log" and again.value == "a cat"
    # An answer re-used from an identical image paid nothing, and keeps what its purchase counted.
    twin = PromptAnswer("a cat", None, 0, 0, source="dedup", provenance=bought)
    line = LogRecord.of(3, "k2", "caption", twin).to_line()
    assert json.loads(line)["ti"] == 0 and json.loads(line)["pi"] == 120 and json.loads(line)["po"] == 4
    again = LogRecord.from_json(json.loads(line)).answer()
    assert again.provenance == bought and (again.input_tokens, again.output_tokens) == (0, 0)
    # A line of a log written before provenance was kept: the answer reads, without provenance.
    old = LogRecord.from_json({"i": 0, "k": 1, "p": "caption", "v": "x", "e": None, "ti": 5, "to": 1})
    assert old.answer().provenance is None and old.to_line().count(b":") == 7
