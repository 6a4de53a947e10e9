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
