"""The viewer's parts without a run: the report's time axis, thumbnails from every kind of image value,
and why a browser cannot be had."""

from __future__ import annotations

import io
import sys
import types

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from capstream.testing import browser
from capstream.view.site import answer_text
from capstream.view.thumbs import THUMB_SIDE, Thumbnails
from capstream.view.timeline import PAUSE_SHOWN_S, Timeline

from conftest import jpeg


def test_a_pause_is_cut_from_the_time_axis():
    t0 = 1_764_600_000.0
    timeline = Timeline([t0, t0 + 10, t0 + 3600, t0 + 3610])  # stopped, resumed an hour later
    assert timeline.at(t0 + 10) == 10 and timeline.at(t0 + 3600) == 10 + PAUSE_SHOWN_S
    assert timeline.span == 20 + PAUSE_SHOWN_S and timeline.resumptions() == [10 + PAUSE_SHOWN_S]
    assert Timeline([t0, t0 + 60]).pauses == [] and Timeline([t0, t0 + 60]).bin_s() == 1.0
    assert Timeline([]).span == 0.0


def _png_with_alpha(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGBA", size, (255, 0, 0, 0)).save(buf, "PNG")
    return buf.getvalue()


def test_thumbnails_from_bytes_paths_and_urls_never_fetched(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "on-disk.jpg").write_bytes(jpeg(40, 30))
    values = [{"bytes": jpeg(1200, 900), "path": "big.jpg"},  # shrunk, with a larger copy to open
              {"bytes": _png_with_alpha((20, 10)), "path": None},  # small: its thumbnail is all there is
              {"bytes": None, "path": "on-disk.jpg"},  # a path relative to the dataset's folder
              {"bytes": None, "path": "http://user:secret@127.0.0.1:9/never-fetched.jpg"},
              {"bytes": b"not an image", "path": "broken.jpg"},
              None]
    shard = tmp_path / "shard.parquet"
    pq.write_table(pa.table({"image": values}), shard)
    thumbs = Thumbnails(tmp_path / "view", "image", base_dirs=[str(images)], threads=2)
    made = thumbs.chunk(0, shard)
    big, small, on_disk, url, broken, none = made
    with Image.open(tmp_path / "view" / big.thumb) as thumb, Image.open(tmp_path / "view" / big.large) as large:
        assert max(thumb.size) == THUMB_SIDE and thumb.size == (256, 192) and large.size == (768, 576)
    assert small.thumb and small.large is None and on_disk.thumb and on_disk.name == "on-disk.jpg"
    with Image.open(tmp_path / "view" / small.thumb) as thumb:
        assert thumb.mode == "RGB" and thumb.getpixel((0, 0)) == (255, 255, 255)  # transparency onto white
    assert url.thumb is None and "not in the output folder" in url.note and "secret" not in url.note
    assert broken.thumb is None and broken.note.startswith("the image cannot be shown")
    assert none.note == "no image in this row"
    assert thumbs.made == 3
    assert Thumbnails(tmp_path / "view", "image").chunk(0, shard) == made  # re-used: the shard did not change
    thumbs.close(keep=set())  # no chunk is done any more (a run started again): its thumbnails go
    assert not list((tmp_path / "view" / "thumbs").iterdir())


def test_an_answer_as_text():
    assert answer_text({"tags": ["a", "bc"], "n": 3, "none": None}) == "a bc 3 "
    assert answer_text(None) == "" and answer_text("x") == "x"


def test_without_chromium_or_playwright_the_reason_is_given(monkeypatch):
    monkeypatch.delenv("CAPSTREAM_CHROMIUM", raising=False)
    monkeypatch.setattr(browser.shutil, "which", lambda name: None)
    installed = types.ModuleType("playwright")  # Playwright there or not: the reason is the missing Chromium
    installed.sync_api = types.ModuleType("playwright.sync_api")
    monkeypatch.setitem(sys.modules, "playwright", installed)
    monkeypatch.setitem(sys.modules, "playwright.sync_api", installed.sync_api)
    assert "apt-get install chromium" in browser.missing()
    monkeypatch.setitem(sys.modules, "playwright.sync_api", None)  # import fails
    assert "pip install -e '.[browser]'" in browser.missing()
