"""The response cache and its in-memory stand-in, in-process."""

from __future__ import annotations

from capstream.row.cache import RecentAnswers, ResponseCache, content_key


def test_response_cache_keeps_answers_across_instances(tmp_path):
    key = content_key({"model": "m", "text": "Caption."}, "ab" * 32)
    assert key != content_key({"model": "m", "text": "Caption!"}, "ab" * 32)
    assert key != content_key({"model": "m", "text": "Caption."}, "cd" * 32)
    cache = ResponseCache(tmp_path)
    assert cache.get(key) is None
    cache.put(key, {"caption": "a dog", "tags": ["dog"]}, input_tokens=100, output_tokens=5)
    cache.close()
    again = ResponseCache(tmp_path)
    assert again.get(key) == {"caption": "a dog", "tags": ["dog"]} and len(again) == 1


def test_recent_answers_forget_the_oldest():
    recent = RecentAnswers(max_entries=2)
    for k in "abc":
        recent.put(k, k.upper())
    assert recent.get("a") is None and recent.get("b") == "B" and recent.get("c") == "C"


def test_an_unusable_cache_is_skipped_with_a_warning(tmp_path, caplog):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    cache = ResponseCache(blocker)  # its folder is a file: cannot be opened
    cache.put("k", "v")
    assert cache.get("k") is None and len(cache) == 0
    assert "going on without it" in caplog.text


def test_an_answer_keeps_how_it_was_bought_and_an_older_cache_file_still_reads(tmp_path):
    import sqlite3

    from capstream.row.results import Provenance

    # A cache file as the version before provenance wrote it: one table, five columns.
    db = sqlite3.connect(tmp_path / "responses.sqlite3")
    db.execute("CREATE TABLE answers (key TEXT PRIMARY KEY, value TEXT NOT NULL, input_tokens INTEGER, "
               "output_tokens INTEGER, created REAL)")
    db.execute("INSERT INTO answers VALUES ('old', '\"a cat\"', 90, 3, 1764600000.0)")
    db.commit()
    db.close()
    cache = ResponseCache(tmp_path)
    old = cache.get_answer("old")
    assert old.value == "a cat"
    assert old.provenance == Provenance(answered_at=1764600000.0, input_tokens=90, output_tokens=3)
    bought = Provenance("m1", "stop", 840, 2, 1764600001.5, 120, 4)
    cache.put("new", "a dog", input_tokens=120, output_tokens=4, provenance=bought)
    cache.close()
    again = ResponseCache(tmp_path)
    assert again.get_answer("new").provenance == bought and again.get("new") == "a dog"
    # The answers table keeps the shape the earlier version writes to.
    again._db.execute("INSERT INTO answers VALUES ('older', '\"x\"', 1, 1, 0.0)")
    assert again.get("older") == "x"
